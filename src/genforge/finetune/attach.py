"""An adapter directory put on a loaded model, whatever its kind: what decoding with
`--adapter DIR` needs. The kind is read from `adapter_config.json` (PEFT's `peft_type`). LoRA,
DoRA and IA3 fold exactly into the base weights, so the adapted model decodes at the base
model's speed; prompt methods and bottleneck adapters cannot fold and run as loaded."""

from __future__ import annotations

import json
from pathlib import Path

from ..model import Transformer
from .adapters import ADAPTER_FORMAT, AdapterError, load_adapters
from .ia3 import load_ia3_adapter, merge_and_unload_ia3
from .lora import load_adapter, merge_and_unload
from .peft_format import ADAPTER_CONFIG
from .prompts import load_prompt_adapter

MERGEABLE = ("LORA", "IA3")
RUN_AS_LOADED = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", ADAPTER_FORMAT)


def adapter_kind(directory: str | Path) -> str:
    """The `peft_type` in the directory's adapter_config.json."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{directory} has no {ADAPTER_CONFIG}; expected a PEFT adapter directory")
    try:
        kind = json.loads(path.read_text()).get("peft_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise AdapterError(f"{path} is not a JSON object: {err}") from None
    if not isinstance(kind, str):
        raise AdapterError(f"{path} names no peft_type")
    return kind


def merge_adapter_dir(model: Transformer, directory: str | Path) -> Transformer:
    """Load the adapter in `directory` onto `model` and merge it into the weights, leaving plain
    linear layers (the model `checkpoint.save_model` exports and inference packs)."""
    kind = adapter_kind(directory)
    if kind == "LORA":
        return merge_and_unload(load_adapter(model, directory))
    if kind == "IA3":
        return merge_and_unload_ia3(load_ia3_adapter(model, directory))
    raise AdapterError(
        f"{directory} holds a {kind} adapter, which does not merge into the weights; accepted here: "
        f"{', '.join(MERGEABLE)}"
    )


def attach_adapter(model: Transformer, directory: str | Path):
    """`model` with the adapter in `directory`: merged where it can be (`merge_adapter_dir`), else
    loaded as it runs in training (prompt methods wrap the model; bottleneck adapters wrap
    linear layers). The result decodes with `genforge.generate` as the model does."""
    kind = adapter_kind(directory)
    if kind in MERGEABLE:
        return merge_adapter_dir(model, directory)
    if kind == ADAPTER_FORMAT:
        return load_adapters(model, directory).requires_grad_(False)
    if kind in RUN_AS_LOADED:
        return load_prompt_adapter(model, directory).requires_grad_(False)
    raise AdapterError(f"{directory} holds a {kind} adapter; accepted: {', '.join(MERGEABLE + RUN_AS_LOADED)}")


__all__ = ["MERGEABLE", "RUN_AS_LOADED", "AdapterError", "adapter_kind", "attach_adapter", "merge_adapter_dir"]
