"""An adapter directory merged into a loaded model, whatever its kind: what decoding and
serving with `--adapter DIR` need. The kind is read from `adapter_config.json` (PEFT's
`peft_type`); LoRA, DoRA and IA3 fold exactly into the base weights, so the adapted model
decodes at the base model's speed."""

from __future__ import annotations

import json
from pathlib import Path

from ..model import Transformer
from .ia3 import load_ia3_adapter, merge_and_unload_ia3
from .lora import load_adapter, merge_and_unload
from .peft_format import ADAPTER_CONFIG

MERGEABLE = ("LORA", "IA3")


class AdapterError(ValueError):
    """An adapter directory that cannot be merged into the model."""


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


def merge_adapter(model: Transformer, directory: str | Path) -> Transformer:
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


__all__ = ["MERGEABLE", "AdapterError", "adapter_kind", "merge_adapter"]
