"""What the LoRA and DoRA tests share: the token batch, the tiny saved base models, and
randomized adapter tensors."""

import reference_models
import torch

TOKENS = torch.tensor([[5, 17, 3, 44, 90, 12, 8, 61, 33], [7, 7, 21, 80, 2, 45, 19, 66, 4]])


def saved_families(tmp_path_factory):
    """family -> directory of its tiny random transformers model (rebuilt identically by
    reference_models.build), each saved once: the body of a test module's `base_dir` fixture."""
    saved = {}

    def get(family: str):
        if family not in saved:
            directory = tmp_path_factory.mktemp(family)
            reference_models.build(family).save_pretrained(directory)
            saved[family] = directory
        return saved[family]

    return get


def randomize(named_parameters, seed: int = 1) -> None:
    """Random non-zero A and B, so every part's update shows in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in named_parameters:
            if "lora_A" in name or "lora_B" in name:
                parameter.normal_(0, 0.1)
