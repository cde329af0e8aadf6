"""ONNX export: a genforge decoder as one ONNX graph with a key/value cache, for onnxruntime.

ONNX (Open Neural Network Exchange, onnx.ai) describes a model as a graph of standard
operators over named, typed tensors, with the weights stored as initializers; onnxruntime and
other runtimes execute it without Python or torch. A decoder needs its key/value cache
(Pope et al. 2022, "Efficiently Scaling Transformer Inference") to decode in linear time, and
ONNX graphs hold no state, so the cache travels through the graph's inputs and outputs, as in
Hugging Face Optimum's decoder exports:

    inputs   input_ids                      int64  (batch, sequence)
             attention_mask                 int64  (batch, past_sequence + sequence)
             past_key_values.{i}.key/value  float  (batch, kv_heads, past_sequence, head_dim)
    outputs  logits                         float  (batch, sequence or 1, vocab)
             present.{i}.key/value          float  (batch, kv_heads, past_sequence + sequence, head_dim)

Batch, sequence and past lengths are dynamic, so one graph serves the prefill (past length 0:
tensors of shape (batch, kv_heads, 0, head_dim)) and every decode step (sequence 1, fed the
previous step's presents). Positions are counted along `attention_mask` inside the graph, as
genforge's model counts them, so left-padded batches give each row the logits it gets alone.

The graph is traced from genforge's own modules: `DecoderWithPast` runs the embeddings, every
`Block` and the head of a `Transformer`, with a cache object (`ConcatenatingCache`) that joins
the past and new keys/values and collects the presents. Only the top of `Transformer.forward`
is restated there, without its data-dependent shortcuts (an all-ones mask needs none, a
position past the learned table is refused), which a traced graph cannot hold: the general
masked path computes the same logits for every input.

Exporter. torch.onnx's dynamo exporter (`torch.export` then onnxscript's torchlib) is used:
it keeps the dynamic dimensions symbolic from declared `Dim`s and translates every operator
genforge uses. The TorchScript exporter (`dynamo=False`, deprecated in torch 2.9) cannot
translate `aten::rms_norm` at its highest opset (20) and records Python-side shape
arithmetic as constants, so it is not used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_model, read_config
from ..config import Config, ConfigError
from ..model import MLP, Attention, Transformer, build_attention_mask

__all__ = [
    "SUPPORTED_ONNX_FAMILIES",
    "ConcatenatingCache",
    "DecoderWithPast",
    "ONNXExport",
    "ONNXExportError",
    "export_onnx",
    "onnx_input_names",
    "onnx_output_names",
]

# The dense decoder families; each one's graph is checked against genforge in the tests.
# Mixtral's expert routing loops over the experts chosen at run time, which a graph cannot hold.
SUPPORTED_ONNX_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")
# protobuf cannot serialize a message of 2 GiB or more; weights past this go to a data file.
_SINGLE_FILE_LIMIT = 2**31 - 2**26  # 64 MiB left for the graph itself
# Example sizes for tracing: distinct and above 1, so that no dynamic dimension is merged
# with another or specialised to 0 or 1 (the graph still runs with a past of length 0).
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 3, 5


class ONNXExportError(ValueError):
    """A model or path that ONNX export cannot take; the message says why and what is accepted."""


@dataclass(frozen=True)
class ONNXExport:
    """What `export_onnx` wrote: the .onnx file (and its external data file, when the
    weights were written beside it), the family, the graph's input and output names, the
    ONNX opset, the bytes written, and whether logits come for every position or the last."""

    path: Path
    family: str
    num_layers: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    num_bytes: int
    external_data: Path | None
    last_logits_only: bool


def onnx_input_names(num_layers: int) -> list[str]:
    """input_ids, attention_mask, then past_key_values.{i}.key and .value per layer."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", *past]


def onnx_output_names(num_layers: int) -> list[str]:
    """logits, then present.{i}.key and .value per layer."""
    return ["logits", *(f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value"))]


class ConcatenatingCache:
    """A KV cache (`cache.KVCache`) over plain tensors: each layer's past keys/values joined
    with the new ones. The joined tensors are the graph's presents, kept in `present`."""

    row_runs = None  # every row attends over all of its keys

    def __init__(self, past_key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past_key_values = past_key_values
        self.length = past_key_values[0][0].shape[2]
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_keys, past_values = self.past_key_values[layer]
        keys, values = torch.cat((past_keys, keys), dim=2), torch.cat((past_values, values), dim=2)
        self.present.append((keys, values))
        return keys, values

    def advance(self, num_new: int) -> None:
        self.length += num_new


class DecoderWithPast(nn.Module):
    """A genforge decoder with its cache as tensors: (input_ids, attention_mask, past) ->
    (logits, *presents), the signature of the exported graph (module docstring).

    It runs the model's own embeddings, blocks, final norm and head; what it restates of
    `Transformer.forward` is the top of it: positions counted along the mask, and an additive
    mask per attention window, built on every call (an all-ones mask gives the logits of no
    mask, and the graph cannot skip it by looking at the values).
    """

    def __init__(self, model: Transformer, last_logits_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.last_logits_only = last_logits_only

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, ...]:
        model, config = self.model, self.model.config
        cache = ConcatenatingCache(past_key_values)
        attention_mask = attention_mask.long()
        key_positions = attention_mask.cumsum(-1) - 1
        position_ids = key_positions[:, cache.length :].clamp(min=0)

        x = model.embed_tokens(input_ids)
        if config.embedding_multiplier != 1.0:
            x = x * torch.tensor(config.embedding_multiplier, dtype=x.dtype)
        if model.embed_positions is not None:
            x = x + model.embed_positions(position_ids)
        rope = model.rotary(position_ids, x.dtype) if model.rotary is not None else None
        masks = {}
        for window in {config.window_of_layer(i) for i in range(config.num_layers)}:
            allowed = build_attention_mask(position_ids, key_positions, attention_mask, True, window)
            masks[window] = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, float("-inf"))
        for i, block in enumerate(model.blocks):
            x = block(x, rope, masks[config.window_of_layer(i)], False, cache, [])
        x = model.final_norm(x)
        logits = model.lm_head(x[:, -1:] if self.last_logits_only else x)
        return (logits, *(tensor for pair in cache.present for tensor in pair))


def export_onnx(
    model_dir_or_model: str | os.PathLike | Transformer,
    out_path: str | os.PathLike,
    *,
    last_logits_only: bool = False,
    external_data: bool | None = None,
) -> ONNXExport:
    """Write a genforge decoder as the ONNX graph `out_path` (the module docstring says what it
    takes and returns). `model_dir_or_model` is a Hugging Face model directory, loaded in
    float32, or a float32 `Transformer`. Families: llama, mistral, qwen2, qwen3, gemma, phi3, gpt2.

    last_logits_only: logits for the last position only, (batch, 1, vocab), which is all that
        generation reads (the vocabulary product over a whole prompt is then skipped);
        False (default) gives every position's, for scoring text.
    external_data: weights in a data file beside the graph (`<name>.data`); None (default)
        does so only when they would pass protobuf's 2 GiB limit on one file.

    The file is written into a temporary directory beside `out_path` and renamed into place.
    """
    out_path = Path(out_path)
    _check_out_path(out_path)
    model = _load(model_dir_or_model)
    config = model.config
    _check_model(model)
    if external_data is None:
        external_data = _weight_bytes(model) > _SINGLE_FILE_LIMIT

    program = _trace(model, last_logits_only)
    program.model.metadata_props.update(
        {
            "genforge.family": config.family,
            "genforge.config": json.dumps(config.to_dict()),
            "genforge.logits": "last" if last_logits_only else "all",
        }
    )
    data_path = out_path.with_name(out_path.name + ".data") if external_data else None
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        staged = staging / out_path.name
        program.save(staged, external_data=external_data)
        written = sorted(staging.iterdir())
        expected = sorted([staged] + ([staging / data_path.name] if data_path else []))
        if written != expected:
            raise AssertionError(f"the ONNX writer wrote {[p.name for p in written]}, expected {expected}")
        for path in written:
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
        num_bytes = sum(path.stat().st_size for path in written)
        # The data file first: the graph that names it appears only once it is in place.
        if data_path is not None:
            os.replace(staging / data_path.name, data_path)
        os.replace(staged, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ONNXExport(
        path=out_path,
        family=config.family,
        num_layers=config.num_layers,
        input_names=tuple(onnx_input_names(config.num_layers)),
        output_names=tuple(onnx_output_names(config.num_layers)),
        opset=program.model.opset_imports[""],
        num_bytes=num_bytes,
        external_data=data_path,
        last_logits_only=last_logits_only,
    )


def _check_out_path(out_path: Path) -> None:
    if out_path.is_dir():
        raise ONNXExportError(f"{out_path} is a directory; give the path of the .onnx file to write")
    if not out_path.parent.is_dir():
        raise ONNXExportError(f"the directory of {out_path} does not exist; create {out_path.parent} first")


def _load(model_dir_or_model) -> Transformer:
    if isinstance(model_dir_or_model, Transformer):
        return model_dir_or_model
    directory = Path(model_dir_or_model)
    config_path = directory / "config.json"
    if config_path.is_file():
        try:
            quantization = json.loads(config_path.read_text()).get("quantization_config")
        except json.JSONDecodeError as err:
            raise ONNXExportError(f"{config_path} is not valid JSON: {err}") from None
        if quantization is not None:
            method = quantization.get("method") or quantization.get("quant_method") or "unnamed"
            raise ONNXExportError(
                f"{directory} holds a quantized model ({method}); ONNX export writes float weights: "
                "export the unquantized model it was made from"
            )
    try:
        _check_config(read_config(directory))
        return load_model(directory, dtype=torch.float32)
    except (CheckpointError, ConfigError) as err:
        raise ONNXExportError(str(err)) from None


def _check_config(config: Config) -> None:
    """Refuse, before any weight is read, a model the exported graph would not compute."""
    if config.family not in SUPPORTED_ONNX_FAMILIES:
        raise ONNXExportError(
            f"ONNX export does not support the {config.family!r} family; supported: "
            f"{', '.join(SUPPORTED_ONNX_FAMILIES)} (dense decoders)"
        )
    problems = []
    if config.num_experts:
        problems.append(f"{config.num_experts} experts (routing chosen at run time)")
    if not config.causal or config.post_norm or config.masked_lm_head:
        problems.append("an encoder layout (bidirectional, post-norm or a masked-LM head)")
    if config.type_vocab_size or config.embedding_norm:
        problems.append("segment embeddings or an embedding norm")
    if config.position == "alibi":
        problems.append("ALiBi attention biases (not written into the graph)")
    if config.rope_type == "dynamic":
        problems.append("dynamic NTK RoPE scaling (frequencies recomputed from each row's length at run time)")
    if problems:
        raise ONNXExportError(
            f"this {config.family} model has {'; '.join(problems)}; ONNX export takes dense causal decoders"
        )


def _check_model(model: Transformer) -> None:
    _check_config(model.config)
    if model.lm_head is None:
        raise ONNXExportError("the model has no LM head; ONNX export writes a graph that returns logits")
    float_types = {p.dtype for p in model.parameters()} | {b.dtype for b in model.buffers() if b.is_floating_point()}
    if float_types != {torch.float32}:
        raise ONNXExportError(
            f"the model holds {', '.join(sorted(str(t) for t in float_types))} tensors; ONNX export writes a "
            "float32 graph: convert the model first (model.float())"
        )
    # Quantized, packed or adapter-wrapped layers replace nn.Linear under the same names
    # (swap.swap_linears); the graph is written from plain float products only.
    linears = {"lm_head": model.lm_head}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            linears |= {f"{name}.qkv": module.qkv, f"{name}.o": module.o}
        elif isinstance(module, MLP):
            for part in ("gate_up", "up", "down"):
                if getattr(module, part) is not None:
                    linears[f"{name}.{part}"] = getattr(module, part)
    swapped = {name: type(layer).__name__ for name, layer in linears.items() if type(layer) is not nn.Linear}
    if swapped:
        name, kind = next(iter(swapped.items()))
        raise ONNXExportError(
            f"{len(swapped)} linear layer(s) are not plain nn.Linear ({name} is a {kind}: quantized, packed for CPU "
            "inference or wrapped by an adapter); ONNX export writes float weights: export the float model "
            "(merge adapters first, `genforge merge-adapter`)"
        )


def _weight_bytes(model: Transformer) -> int:
    # A tied head shares the embedding's storage and is written once.
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(unique.values())


def _trace(model: Transformer, last_logits_only: bool):
    """The ONNX program of `DecoderWithPast(model)`, with dynamic batch, sequence and past."""
    from torch.export import Dim

    config = model.config
    batch, sequence, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    total = Dim("past_sequence_plus_sequence")
    kv_shape = (_EXAMPLE_BATCH, config.num_kv_heads, _EXAMPLE_PAST, config.head_dim)
    example = (
        torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, dtype=torch.long),
        torch.ones(_EXAMPLE_BATCH, _EXAMPLE_PAST + _EXAMPLE_SEQUENCE, dtype=torch.long),
        [(torch.zeros(kv_shape), torch.zeros(kv_shape)) for _ in range(config.num_layers)],
    )
    dynamic_shapes = (
        {0: batch, 1: sequence},
        {0: batch, 1: total},
        [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(config.num_layers)],
    )
    was_training = model.training
    model.eval()  # no dropout in the graph
    # The exporter logs a line per torchvision operator it finds missing and warns that the
    # shared Dims repeat a name: noise to someone exporting a language model.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                DecoderWithPast(model, last_logits_only).eval(),
                example,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=onnx_input_names(config.num_layers),
                output_names=onnx_output_names(config.num_layers),
                optimize=True,
                verbose=False,
            )
    finally:
        registration_log.setLevel(level)
        model.train(was_training)
