"""What `genforge vision` needs from each model family: one `VisionKind` per family.

A trained model is a directory holding `vision.json` (`{"kind": ..., ...settings}`) and
`model.safetensors`; `sample`, `eval` and `ask` read the kind from it and dispatch here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_CONFIG = "vision.json"
MODEL_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class VisionKind:
    """One trainable family. `sample` is None for models that do not generate images (CLIP, the
    VLM); `ask` is set only for models that answer questions about an image."""

    name: str
    help: str
    add_train_arguments: Callable[[argparse.ArgumentParser], None]
    train: Callable[[argparse.Namespace], Path]  # trains from parsed flags into args.out; returns it
    evaluate: Callable[[Path, argparse.Namespace], dict[str, float]]  # metrics on the test split
    sample: Callable[[Path, int, float | None, int], torch.Tensor] | None = None  # (dir, num, guidance, seed)
    ask: Callable[[Path, torch.Tensor, str], str] | None = None  # (dir, image [C,H,W] in [0,1], question)


def read_kind(model_dir: str | Path) -> str:
    """The `kind` a saved vision model declares, with a clear error when it is not one."""
    path = Path(model_dir) / MODEL_CONFIG
    if not path.is_file():
        raise ValueError(
            f"{model_dir} is not a genforge vision model (no {MODEL_CONFIG}); train one with `genforge vision train`"
        )
    return json.loads(path.read_text())["kind"]
