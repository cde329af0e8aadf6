"""PEFT's adapter directory, shared by every adapter kind: `adapter_config.json` beside
`adapter_model.safetensors`, tensors named after the transformers model's modules under
`base_model.model.`. Reading checks each file before anything is loaded; writing is atomic."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import staged_directory

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def write_adapter(directory: str | Path, adapter_config: Mapping, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write an adapter directory, assembled beside `directory` and renamed into place."""
    directory = Path(directory)
    with staged_directory(directory) as staging:
        save_file(dict(tensors), staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return directory


def read_adapter_config(
    directory: Path, peft_type: str | tuple[str, ...], loader: str, error: type[Exception], hint: str = ""
) -> dict:
    """The adapter's config, refused unless it is valid JSON of `peft_type` (or of one of a tuple
    of types; `loader` names the function that loads them, for the message; `hint` points
    elsewhere for other types)."""
    path = directory / ADAPTER_CONFIG
    if not path.exists():
        raise error(f"{directory} has no {ADAPTER_CONFIG}; expected a PEFT adapter directory")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON: {err}") from None
    accepted = (peft_type,) if isinstance(peft_type, str) else peft_type
    if saved.get("peft_type") not in accepted:
        names = " or ".join(map(repr, accepted))
        raise error(f"{path} is a {saved.get('peft_type')!r} adapter; {loader} loads peft_type {names}{hint}")
    return saved


def adapter_weights_path(directory: Path, error: type[Exception]) -> Path:
    """The adapter's safetensors file, refused when only pickled weights are there."""
    weights = directory / ADAPTER_WEIGHTS
    if not weights.exists():
        pickled = (
            " (only the pickled adapter_model.bin, which genforge does not unpickle)"
            if any(directory.glob("*.bin"))
            else ""
        )
        raise error(f"{directory} has no {ADAPTER_WEIGHTS}{pickled}; save the adapter with safetensors")
    return weights


def read_adapter_tensors(weights: Path) -> dict[str, torch.Tensor]:
    with safe_open(weights, framework="pt", device="cpu") as reader:
        return {key: reader.get_tensor(key) for key in reader.keys()}


def check_adapter_fits(
    directory: Path,
    expected: Mapping[str, tuple[int, ...]],
    stored: Mapping[str, torch.Tensor],
    what: str,
    error: type[Exception],
    optional: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Refuse an adapter whose tensors are not the `expected` ones (names and shapes); tensors
    named in `optional` may be absent."""
    missing = sorted(set(expected) - set(stored) - set(optional))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise error(
            f"the adapter in {directory} does not fit this model: its config selects {len(expected)} {what}"
            + (f"; missing from {ADAPTER_WEIGHTS}: {', '.join(missing[:6])}" if missing else "")
            + (f"; in {ADAPTER_WEIGHTS} but not placed on this model: {', '.join(extra[:6])}" if extra else "")
        )


def check_adapter_shapes(
    directory: Path, expected: Mapping[str, tuple[int, ...]], stored: Mapping[str, torch.Tensor], error: type[Exception]
) -> None:
    wrong = [
        f"{key} is {tuple(stored[key].shape)}, this model needs {shape}"
        for key, shape in expected.items()
        if key in stored and tuple(stored[key].shape) != shape
    ]
    if wrong:
        raise error(f"the adapter in {directory} does not fit this model: {'; '.join(wrong[:6])}")
