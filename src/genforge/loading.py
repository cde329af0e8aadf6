"""A checkpoint made ready to decode: the model packed for the CPU, its tokenizer, its end ids.

Every command and server that decodes from a model directory starts the same way: read
generation_config.json, load the tokenizer and the weights, gather the end-of-sequence ids
(Llama 3 instruct models, for one, end turns with an id only generation_config.json lists)
and pack the linear layers for CPU inference. `load_for_inference` is that start.

A directory `genforge quantize` wrote (`quantize.saved`) loads through `quantize.load_quantized`
instead of `checkpoint.load_model`, so every command that decodes runs a quantized model as
it is; packing then packs the linear layers that stayed in floating point (the LM head, say)
and leaves the quantized ones alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_model, read_config, read_generation_config
from .generate.request import end_of_sequence_ids
from .inference import pack_for_cpu_inference
from .model import Transformer
from .quantize.saved import QuantizedCheckpointError, is_quantized, load_quantized
from .seq2seq import refuse_encoder_decoder
from .tokenizer import Tokenizer

__all__ = ["LoadedModel", "load_for_inference", "load_packed_model"]


@dataclass
class LoadedModel:
    """What `load_for_inference` returns."""

    model: Transformer
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]  # sorted: the model config's, the tokenizer's and generation_config's
    generation_config: dict[str, Any] = field(default_factory=dict)  # generation_config.json, or {}


def load_for_inference(
    directory: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    adapter: str | Path | None = None,
    pack: bool = True,
    context_limit: int | None = None,
) -> LoadedModel:
    """Load a Hugging Face model directory (config.json, *.safetensors, tokenizer.json and an
    optional generation_config.json) for decoding, with a fine-tuned `adapter` directory put on
    it (see `load_packed_model`). The small files are read first, so that a broken one fails
    before the weights are loaded. `pack=False` leaves the packing
    (`inference.pack_for_cpu_inference`) to the caller, who has something to do before it.
    `context_limit` caps prompt plus generation (`Config.context_limit`; past the trained
    context only for a model with dynamic RoPE scaling), checked before the weights load."""
    generation_config = read_generation_config(directory)
    tokenizer = Tokenizer.from_dir(directory)
    if context_limit is not None:
        read_config(directory).with_context_limit(context_limit)  # a ConfigError now, not after the weights
    model = _load_adapted(directory, dtype, device, adapter)
    if context_limit is not None:
        model.config = model.config.with_context_limit(context_limit)
    if pack:
        model = pack_for_cpu_inference(model)
    eos = end_of_sequence_ids(model.config, tokenizer, generation_config.get("eos_token_id"))
    return LoadedModel(model, tokenizer, tuple(sorted(eos)), generation_config)


def load_packed_model(
    directory: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    adapter: str | Path | None = None,
) -> Transformer:
    """`checkpoint.load_model`, with an adapter directory put on it when `adapter` is given
    (`finetune.attach.attach_adapter`: LoRA, DoRA, IA3 merged into the weights), packed by `inference.pack_for_cpu_inference` (which leaves
    a model unchanged where packing does not apply: off the CPU, in half precision). Enough for
    a second model of a strategy, such as a speculative draft."""
    return pack_for_cpu_inference(_load_adapted(directory, dtype, device, adapter))


def _load_adapted(directory, dtype, device, adapter) -> Transformer:
    if is_quantized(directory):
        return _load_quantized(directory, dtype, device, adapter)
    if adapter is not None:
        refuse_encoder_decoder(
            read_config(directory),
            "an adapter (--adapter)",
            "genforge attaches adapters through the decoder-only families' layer names",
        )
    if adapter is None:
        return load_model(directory, dtype=dtype, device=device)
    from .finetune.attach import adapter_kind, attach_adapter

    adapter_kind(adapter)  # a bad adapter directory fails before the weights are read
    return attach_adapter(load_model(directory, dtype=dtype, device=device), adapter)


def _load_quantized(directory, dtype, device, adapter) -> Transformer:
    """A saved quantized model: it computes in float32, and an adapter cannot be merged into
    quantized weights."""
    if dtype not in (None, "auto", "float32", torch.float32):
        raise QuantizedCheckpointError(
            f"{directory} is a quantized model, which computes in float32; drop --dtype {dtype} (or give float32)"
        )
    if adapter is not None:
        raise QuantizedCheckpointError(
            f"{directory} is a quantized model; an adapter is merged into floating-point weights. Put {adapter} on "
            "the floating-point model, then quantize the merged model (genforge merge-adapter, genforge quantize)"
        )
    return load_quantized(directory, device=device)
