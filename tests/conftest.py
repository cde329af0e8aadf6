import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))

import reference_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """A function: family name -> (transformers model, directory it was saved to)."""
    built = {}

    def get(name: str):
        if name not in built:
            model = reference_models.build(name)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            built[name] = (model, directory)
        return built[name]

    return get
