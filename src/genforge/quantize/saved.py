"""Saved quantized models: one directory format for every quantized layer kind.

A quantized model is the genforge model with some linear layers replaced, through the Linear
seam (`swap.swap_linears`), by quantized layers (NF4, INT8, INT4, ...). Each such layer kind
follows one contract (docs/compression.md): a class attribute `kind`, tensors named `weight*`
(and an optional fp `bias`) so that its state-dict keys keep the layer's name, `settings()`
(its JSON settings beyond the shapes) and `empty(in_features, out_features, bias, **settings)`
(a shell of correctly shaped zero tensors). That is enough to save and load any of them the
same way:

    config.json              the model's Hugging Face config, plus
                             "quantization_config": {"quant_method": "genforge", "format": 1,
                               "method": "nf4", "layers": {"blocks.0.attn.qkv": {"kind": "nf4",
                               "blocksize": 64, ...}, ...}, "details": {...}}
    model.safetensors        `model.state_dict()` under genforge's names (sharded past 5 GiB,
                             with model.safetensors.index.json, as checkpoint.save_model shards)
    generation_config.json   and the tokenizer's files, as checkpoint.save_model writes them

The loader builds the model from config.json on the meta device, puts `LAYER_KINDS[kind].empty`
in place of each listed layer and assigns the saved tensors, checked by name, shape and dtype.
The tensors are genforge's own (fused `qkv`, `gate_up`), not Hugging Face's: transformers does
not read this directory, and its `quant_method` says so. `genforge export gguf` is the way to
hand a model to llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..atomic import staged_directory
from ..checkpoint import DTYPES, CheckpointError, _weight_files, _write_shards, read_config
from ..config import ConfigError
from ..model import RotaryEmbedding, Transformer
from ..swap import linear_names, swap_linears
from .llm_int8 import Int8MixedLinear
from .nf4 import NF4Linear
from .w8a8 import DynamicInt8Linear, StaticInt8Linear
from .weight_only import Int4Linear, Int8Linear

__all__ = [
    "FORMAT_VERSION",
    "LAYER_KINDS",
    "QUANT_METHOD",
    "QuantizedCheckpointError",
    "is_quantized",
    "load_quantized",
    "quantized_layers",
    "read_quantization_config",
    "register_layer_kind",
    "save_quantized",
]

# The `quant_method` of genforge's block in config.json, and the version of the layout it describes.
QUANT_METHOD = "genforge"
FORMAT_VERSION = 1

# Quantized layer kinds by their `kind`: what the loader builds for each saved layer.
LAYER_KINDS: dict[str, type[nn.Module]] = {}


class QuantizedCheckpointError(CheckpointError):
    """A quantized model directory genforge cannot write or read; the message says what was wrong."""


def register_layer_kind(cls: type[nn.Module]) -> type[nn.Module]:
    """Make the quantized layer class `cls` loadable under `cls.kind`, and return it (so that it
    also serves as a class decorator). Registering the same class again changes nothing; another
    class under a kind already taken is refused."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} needs a class attribute `kind` (a non-empty str) to be registered")
    for method in ("empty", "settings"):
        if not callable(getattr(cls, method, None)):
            raise TypeError(f"{cls.__name__} lacks `{method}`, which the saved format needs (see quantize.saved)")
    if LAYER_KINDS.get(kind, cls) is not cls:
        raise ValueError(f"layer kind {kind!r} is already registered by {LAYER_KINDS[kind].__name__}")
    LAYER_KINDS[kind] = cls
    return cls


# Every quantized layer kind genforge ships: adding one is one entry here.
for _kind in (NF4Linear, Int8Linear, Int4Linear, DynamicInt8Linear, StaticInt8Linear, Int8MixedLinear):
    register_layer_kind(_kind)


def _registered(module: nn.Module) -> bool:
    """Whether `module` is of the class registered under its `kind` (a subclass is a kind of its own)."""
    return LAYER_KINDS.get(getattr(type(module), "kind", None)) is type(module)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """`model`'s quantized layers (of a registered kind) by module name, in module order."""
    return {name: module for name, module in model.named_modules() if _registered(module)}


def _layer_entries(model: nn.Module) -> dict[str, dict]:
    """quantization_config's "layers": each quantized layer's kind and settings, checked to be JSON."""
    entries = {}
    for name, layer in quantized_layers(model).items():
        settings = layer.settings()
        if "kind" in settings:
            raise QuantizedCheckpointError(f"{type(layer).__name__}.settings() must not name a setting 'kind'")
        try:
            json.dumps(settings)
        except TypeError as err:
            raise QuantizedCheckpointError(
                f"{name}: the settings of layer kind {layer.kind!r} are not JSON ({err}); settings() returns "
                "str, int, float, bool, lists and dicts of them"
            ) from None
        entries[name] = {"kind": layer.kind, **settings}
    return entries


def _refuse_unsaveable(model: nn.Module) -> None:
    """A model the format cannot describe: packed, wrapped by adapters, or with an unregistered kind."""
    if getattr(model, "packed_for_inference", False):
        raise QuantizedCheckpointError(
            "this model was packed for CPU inference (inference.pack_for_cpu_inference) and its remaining linear "
            "weights are opaque; save the quantized model before packing it"
        )
    if not isinstance(model, Transformer):
        raise QuantizedCheckpointError(f"save_quantized saves a genforge Transformer; got {type(model).__name__}")
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") or hasattr(module, "ia3_l"):
            raise QuantizedCheckpointError(
                f"{name} carries an adapter; save the adapter on its own (finetune.save_adapter), or merge it into "
                "the fp model and quantize after"
            )
        kind = getattr(type(module), "kind", None)
        if isinstance(kind, str) and not _registered(module):
            raise QuantizedCheckpointError(
                f"{name} is a {type(module).__name__} (kind {kind!r}), which is not a registered layer kind; "
                f"register it with quantize.saved.register_layer_kind (registered: {', '.join(sorted(LAYER_KINDS))})"
            )


def _tied_fp_head(model: Transformer, layers: dict) -> bool:
    """Whether the LM head stays a floating-point layer tied to the embeddings: written once."""
    return (
        model.config.tie_word_embeddings
        and model.lm_head is not None
        and "lm_head" not in layers
        and model.lm_head.weight is model.embed_tokens.weight
    )


def save_quantized(
    model: Transformer,
    directory: str | Path,
    tokenizer=None,
    generation_config: dict | None = None,
    *,
    method: str,
    details: dict | None = None,
) -> Path:
    """Write the quantized `model` to `directory` in the saved format (module docstring): config.json
    with a `quantization_config` naming `method`, each quantized layer's kind and settings and
    the JSON `details` of the run (bits, calibration, ...); the state dict as safetensors; the
    generation config and the tokenizer's files. Assembled beside `directory` and renamed into
    place, as `checkpoint.save_model` does. The result is checked against the shell the loader
    will build before anything is written, so a directory that would not load is never written.

    Refused (QuantizedCheckpointError): a model packed for CPU inference, one carrying
    adapters, one with a quantized layer of an unregistered kind."""
    _refuse_unsaveable(model)
    if not isinstance(method, str) or not method:
        raise QuantizedCheckpointError(f"method names how the model was quantized (e.g. 'nf4'); got {method!r}")
    layers = _layer_entries(model)
    details = dict(details or {})
    try:
        json.dumps(details)
    except TypeError as err:
        raise QuantizedCheckpointError(f"details must be JSON: {err}") from None
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    if _tied_fp_head(model, layers):
        del state["lm_head.weight"]  # the embeddings' weight: written once, tied again on load
    shell = _shell(model.config, layers, device="meta")
    _check_state(state, _expected(shell, layers), "the model being saved")

    hf_config = model.config.to_hf()
    hf_config["dtype"] = {v: k for k, v in DTYPES.items()}.get(model.dtype, "float32")
    hf_config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format": FORMAT_VERSION,
        "method": method,
        "layers": layers,
        "details": details,
    }
    directory = Path(directory)
    with staged_directory(directory) as staging:
        _write_shards({name: t.contiguous().cpu() for name, t in state.items()}, staging, 5 * 2**30)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
        generation.update(generation_config or {})
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if tokenizer is not None:
            tokenizer.save(staging)
    return directory


# ------------------------------------------------------------------------------------ load
def read_quantization_config(directory: str | Path) -> dict | None:
    """The genforge `quantization_config` of `directory`'s config.json, or None where the
    directory holds no genforge-quantized model (a floating-point one, or no model at all)."""
    path = Path(directory) / "config.json"
    try:
        block = json.loads(path.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(block, dict) and block.get("quant_method") == QUANT_METHOD:
        return block
    return None


def is_quantized(directory: str | Path) -> bool:
    """Whether `directory` holds a model saved by `save_quantized` (`genforge quantize`)."""
    return read_quantization_config(directory) is not None


def _checked_layers(block: dict, where: Path) -> dict[str, dict]:
    """quantization_config's "layers", each with a registered kind; bad entries are refused by name."""
    if block.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise QuantizedCheckpointError(
            f"{where} is in quantized format {block.get('format')!r}; this genforge reads format {FORMAT_VERSION}"
        )
    layers = block.get("layers")
    if not isinstance(layers, dict):
        raise QuantizedCheckpointError(
            f"{where}: quantization_config lacks its 'layers' (module name -> kind, settings)"
        )
    for name, entry in layers.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
            raise QuantizedCheckpointError(f"{where}: quantization_config's entry for {name} lacks its 'kind'")
        if entry["kind"] not in LAYER_KINDS:
            raise QuantizedCheckpointError(
                f"{where}: layer {name} is of kind {entry['kind']!r}, which this genforge does not know; "
                f"known kinds: {', '.join(sorted(LAYER_KINDS))}"
            )
    return layers


def _shell(config, layers: dict[str, dict], device: str | torch.device) -> Transformer:
    """The model `config` describes, its fp tensors on the meta device, with an empty layer of
    each listed kind (zero tensors on `device`) in place of each listed linear layer."""
    with torch.device("meta"):
        model = Transformer(config)
    if not layers:
        return model
    present = set(linear_names(model))
    absent = [name for name in layers if name not in present]
    if absent:
        raise QuantizedCheckpointError(
            f"quantization_config names {', '.join(absent[:4])}, which this config's model does not have as a "
            f"linear layer (it has {', '.join(sorted(present)[:4])}, ...)"
        )

    def empty(linear: nn.Linear, name: str) -> nn.Module:
        entry = layers[name]
        settings = {key: value for key, value in entry.items() if key != "kind"}
        try:
            with torch.device(device):
                return LAYER_KINDS[entry["kind"]].empty(
                    linear.in_features, linear.out_features, linear.bias is not None, **settings
                )
        except (TypeError, ValueError) as err:
            raise QuantizedCheckpointError(f"layer {name} ({entry['kind']}, settings {settings}): {err}") from None

    # Exact names, escaped so that no character of a name is read as a glob.
    swap_linears(model, empty, include=[_literal(name) for name in layers])
    return model


def _literal(name: str) -> str:
    """A glob that matches `name` only."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _expected(shell: Transformer, layers: dict) -> dict[str, tuple[torch.Size, torch.dtype | None]]:
    """Each tensor a saved model holds, with its shape and, in quantized layers, its dtype (the
    fp tensors may be saved in any float dtype)."""
    quantized = tuple(f"{name}." for name in layers)
    expected = {
        name: (tensor.shape, tensor.dtype if name.startswith(quantized) else None)
        for name, tensor in shell.state_dict().items()
    }
    if _tied_fp_head(shell, layers):
        del expected["lm_head.weight"]
    return expected


def _check_state(state: dict[str, torch.Tensor], expected: dict, what: str) -> None:
    """Refuse tensors missing from, or not expected in, `state`, and any of the wrong shape or dtype."""
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:6])}")
        if unexpected:
            parts.append(f"has {len(unexpected)} tensor(s) the model does not place: {', '.join(unexpected[:6])}")
        raise QuantizedCheckpointError(f"{what} {'; and '.join(parts)}")
    for name, (shape, dtype) in expected.items():
        tensor = state[name]
        if tensor.shape != shape:
            raise QuantizedCheckpointError(
                f"{what}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} from config.json"
            )
        if dtype is not None and tensor.dtype != dtype:
            raise QuantizedCheckpointError(f"{what}: tensor {name} has dtype {tensor.dtype}, expected {dtype}")
        if dtype is None and not tensor.is_floating_point():
            raise QuantizedCheckpointError(f"{what}: tensor {name} has dtype {tensor.dtype}; expected a float dtype")


def load_quantized(directory: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Load a directory `save_quantized` wrote: the model built from config.json, each listed
    layer an empty layer of its kind, every tensor checked by name, shape and dtype and then
    assigned. The floating-point tensors (embeddings, norms, unquantized layers) come back as
    float32, since quantized layers compute in float32; rotary tables are rebuilt and a
    floating-point LM head is tied to the embeddings, as `checkpoint.load_model` does.

    Refused (QuantizedCheckpointError), before any tensor is read where it can be: a directory
    that is not a genforge-quantized model, an unknown layer kind (the known ones are listed),
    tensors missing or unexpected, a shape or dtype that does not match config.json.
    """
    directory = Path(directory)
    block = read_quantization_config(directory)
    if block is None:
        raise QuantizedCheckpointError(
            f"{directory} holds no genforge-quantized model (config.json has no quantization_config with "
            f"quant_method {QUANT_METHOD!r}); quantize one with `genforge quantize`, or load it with "
            "checkpoint.load_model"
        )
    layers = _checked_layers(block, directory)
    try:
        config = read_config(directory)
    except ConfigError as err:
        raise QuantizedCheckpointError(str(err)) from None
    # The block describes these weights, not the architecture: a model saved from this config
    # in floating point must not claim to be quantized.
    config.hf_extra.pop("quantization_config", None)
    files = _weight_files(directory)
    model = _shell(config, layers, device)
    expected = _expected(model, layers)

    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as reader:
            keys = list(reader.keys())
            # Shapes and dtypes are checked from the headers, before a tensor is read.
            headers = {key: reader.get_slice(key) for key in keys}
            _check_headers(headers, expected, directory)
            for key in keys:
                state[key] = reader.get_tensor(key)
    _check_state(state, expected, str(directory))
    quantized = tuple(f"{name}." for name in layers)
    state = {
        name: tensor.to(device) if name.startswith(quantized) else tensor.to(device=device, dtype=torch.float32)
        for name, tensor in state.items()
    }
    if _tied_fp_head(model, layers):
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if "lm_head" not in layers:
        model.tie_weights()
    model.rotary = RotaryEmbedding(config).to(device) if config.position == "rope" else None
    return model.eval()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _check_headers(headers: dict, expected: dict, directory: Path) -> None:
    """Shape and dtype of each tensor in one file, from its header (no data read)."""
    for name, tensor_slice in headers.items():
        if name not in expected:
            continue  # reported with the others once every file is read
        shape, dtype = expected[name]
        if tuple(tensor_slice.get_shape()) != tuple(shape):
            raise QuantizedCheckpointError(
                f"{directory}: tensor {name} has shape {tuple(tensor_slice.get_shape())}, expected {tuple(shape)} "
                "from config.json"
            )
        saved = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
        if dtype is not None and saved is not None and saved != dtype:
            raise QuantizedCheckpointError(f"{directory}: tensor {name} has dtype {saved}, expected {dtype}")
