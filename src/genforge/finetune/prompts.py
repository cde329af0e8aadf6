"""Prompt-based parameter-efficient fine-tuning: the base model stays frozen and only a few
learned vectors in front of the input train, in PEFT's adapter format both ways.

- Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
  Tuning"): P trainable virtual-token embeddings are put before the input's token embeddings.
  They start random, at the embeddings of P random vocabulary tokens, or at those of an init
  text's tokens (repeated or cut to P), as PEFT's `prompt_tuning_init`.
- P-tuning (Liu et al. 2021, "GPT Understands, Too"): the virtual tokens are the output of a
  prompt encoder over P trainable embeddings, an MLP (Linear-ReLU-Linear-ReLU-Linear) or a
  bidirectional LSTM followed by a two-layer MLP (`encoder_reparameterization_type`).
- Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
  Generation"): every layer's attention also reads P trained keys and values, placed in the
  KV cache before the input; optionally produced by the reparameterisation MLP (an embedding
  of width `token_dim`, Linear-Tanh-Linear up to all layers' keys and values;
  `prefix_projection=True`), which stabilises training.

The wrappers (`PromptTunedModel`, `PrefixTunedModel`) behave like the `Transformer` they wrap
for training and decoding: `forward` takes and returns the same things, with hidden states
and logits for the caller's positions only, and `config` (the base's, with the context
shortened by the virtual tokens), `lm_head`, `blocks` are the base model's. Positions follow
transformers + PEFT: the P virtual tokens, or the prefix, take positions 0..P-1 and the input
starts at P. With a KV cache (`genforge.generate.generator.generate` works on the wrappers),
the first call on an empty cache puts the virtual tokens or the prefix into it.

PEFT saves one tensor, `prompt_embeddings`: the virtual tokens (P, token_dim), or the prefix
table (P, num_layers * 2 * token_dim) with each layer's keys then values, heads then head
channels, along a row. For P-tuning and a projected prefix, that is the encoder's output: the
encoder itself is not saved, and a loaded adapter is that table (as in PEFT). For prefix
tuning, token_dim is the width of one layer's keys (kv heads x head dim), not the hidden size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..cache import KVCache
from ..config import Config
from ..model import ModelOutput, Transformer
from ..tokenizer import Tokenizer
from .peft_format import (
    ADAPTER_CONFIG,
    adapter_weights_path,
    check_adapter_fits,
    check_adapter_shapes,
    read_adapter_config,
    read_adapter_tensors,
    write_adapter,
)

__all__ = [
    "PROMPT_METHODS",
    "PTuningConfig",
    "PrefixEncoder",
    "PrefixKVCache",
    "PrefixTunedModel",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptLearningError",
    "PromptLearningModel",
    "PromptTunedModel",
    "PromptTuningConfig",
    "apply_p_tuning",
    "apply_prefix_tuning",
    "apply_prompt_learning",
    "apply_prompt_tuning",
    "load_prompt_adapter",
    "save_prompt_adapter",
]

PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
REPARAMETERIZATIONS = ("MLP", "LSTM")
ADAPTER_KEY = "prompt_embeddings"  # PEFT's one tensor name for every prompt method


class PromptLearningError(ValueError):
    """A prompt-method configuration, model, input or adapter that does not fit; the message says what was wrong."""


def _check_count(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PromptLearningError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class PromptTuningConfig:
    """Prompt tuning, with PEFT's `PromptTuningConfig` field names and meanings.

    num_virtual_tokens: P, the number of trained virtual tokens put before every input.
    prompt_tuning_init: "RANDOM" (N(0, 1), as PEFT), "SAMPLE_VOCAB" (the embeddings of P random
        vocabulary tokens) or "TEXT" (the embeddings of `prompt_tuning_init_text`'s tokens,
        special tokens included, repeated or cut to P).
    tokenizer_name_or_path: a local tokenizer directory, read with `genforge.tokenizer` (or pass
        `tokenizer=` to `apply_prompt_tuning`); "TEXT" needs it, as in PEFT, and it is saved.
    token_dim: the model's hidden size; None to take it from the model (checked when given).
    """

    num_virtual_tokens: int
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    token_dim: int | None = None

    peft_type = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        _check_count("num_virtual_tokens", self.num_virtual_tokens)
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # PEFT's enum or its string
        if init not in PROMPT_TUNING_INITS:
            raise PromptLearningError(
                f"prompt_tuning_init {init!r} is not supported; accepted: {', '.join(PROMPT_TUNING_INITS)}"
            )
        self.prompt_tuning_init = init
        if init == "TEXT" and not self.prompt_tuning_init_text:
            raise PromptLearningError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text to start from")
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise PromptLearningError(
                "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer directory), which the "
                "adapter records as PEFT does"
            )
        if self.token_dim is not None:
            _check_count("token_dim", self.token_dim)


@dataclass
class PTuningConfig:
    """P-tuning, with the field names and meanings of PEFT's `PromptEncoderConfig`.

    encoder_reparameterization_type: "MLP" (three linear layers with ReLU between) or "LSTM"
        (a bidirectional LSTM of `encoder_num_layers` layers, then Linear-ReLU-Linear).
    encoder_hidden_size: the encoder's width; None for token_dim. encoder_num_layers and
        encoder_dropout apply to the LSTM only (the MLP always has three layers, as in PEFT).
    """

    num_virtual_tokens: int
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    token_dim: int | None = None

    peft_type = "P_TUNING"

    def __post_init__(self) -> None:
        _check_count("num_virtual_tokens", self.num_virtual_tokens)
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in REPARAMETERIZATIONS:
            raise PromptLearningError(
                f"encoder_reparameterization_type {kind!r} is not supported; accepted: {', '.join(REPARAMETERIZATIONS)}"
            )
        self.encoder_reparameterization_type = kind
        for name in ("encoder_hidden_size", "token_dim"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        _check_count("encoder_num_layers", self.encoder_num_layers)
        if not isinstance(self.encoder_dropout, (int, float)) or not 0.0 <= self.encoder_dropout < 1.0:
            raise PromptLearningError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


@dataclass
class PrefixTuningConfig:
    """Prefix tuning, with PEFT's `PrefixTuningConfig` field names and meanings.

    prefix_projection: False trains the prefix table itself; True trains an embedding of width
        token_dim and the MLP Linear(token_dim, encoder_hidden_size)-Tanh-Linear(...,
        num_layers * 2 * token_dim) that makes the table.
    encoder_hidden_size: the MLP's width; None for token_dim.
    init_weights: None (random) or "zero" (a zero table, or a zero last layer of the MLP).
    token_dim: the width of one layer's keys, kv heads x head dim; None to take it from the model.
    """

    num_virtual_tokens: int
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    token_dim: int | None = None

    peft_type = "PREFIX_TUNING"

    def __post_init__(self) -> None:
        _check_count("num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.prefix_projection, bool):
            raise PromptLearningError(f"prefix_projection must be True or False, got {self.prefix_projection!r}")
        for name in ("encoder_hidden_size", "token_dim"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        if self.init_weights not in (None, "zero"):
            raise PromptLearningError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")


MethodConfig = PromptTuningConfig | PTuningConfig | PrefixTuningConfig
# The command line's method names.
PROMPT_METHODS = {"prompt": PromptTuningConfig, "ptuning": PTuningConfig, "prefix": PrefixTuningConfig}


# ---------------------------------------------------------------------------------- encoders
# Submodule names follow PEFT's prompt encoders (embedding, mlp_head, lstm_head, transform), so
# the state dict of a PEFT encoder loads into the matching one here as it is.
class PromptEmbedding(nn.Module):
    """A plain table of P trained vectors: prompt tuning's virtual tokens, and any loaded table."""

    def __init__(self, num_virtual_tokens: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, width)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder: P trained embeddings through an MLP or a bidirectional LSTM
    and an MLP (Liu et al. 2021, section 3.2); the output is the virtual tokens (P, token_dim)."""

    def __init__(self, config: PTuningConfig, token_dim: int) -> None:
        super().__init__()
        hidden = config.encoder_hidden_size or token_dim
        self.kind = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens, token_dim)
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=token_dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, token_dim),
            )

    def forward(self) -> torch.Tensor:
        embeddings = self.embedding.weight
        if self.kind == "LSTM":
            # The LSTM reads the virtual tokens as one sequence, so each depends on its neighbours.
            return self.mlp_head(self.lstm_head(embeddings[None])[0])[0]
        return self.mlp_head(embeddings)


class PrefixEncoder(nn.Module):
    """Prefix tuning's table of every layer's prefix keys and values (P, num_layers * 2 * token_dim),
    trained directly or made by the reparameterisation MLP from P embeddings of width token_dim."""

    def __init__(self, config: PrefixTuningConfig, token_dim: int, num_layers: int) -> None:
        super().__init__()
        self.projection = config.prefix_projection
        width = num_layers * 2 * token_dim
        if self.projection:
            hidden = config.encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        if self.projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


# ------------------------------------------------------------------------------ the prefix cache
class PrefixKVCache:
    """A one-pass KV cache whose first P positions are the trained prefix (the `KVCache`
    protocol of `cache.py`). `update` returns the prefix joined to the new keys and values
    without storing anything, so gradients reach the prefix, and recomputing a block under
    gradient checkpointing sees the same cache."""

    row_runs = None

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.prefix_keys, self.prefix_values = keys, values
        self.length = keys[0].shape[2]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat((self.prefix_keys[layer], keys), dim=2), torch.cat((self.prefix_values[layer], values), dim=2)

    def advance(self, num_new: int) -> None:
        self.length += num_new


# -------------------------------------------------------------------------------- the wrappers
class PromptLearningModel(nn.Module):
    """A frozen genforge `Transformer` with a prompt method's trained parameters in front.

    Looks like the model to the trainer and the decoders: `config` (the base's, with
    `max_position_embeddings` shortened by the P virtual positions, so requests and training
    rows that fit here fit the base), `lm_head`, `lm_transform`, `blocks`, `embed_tokens`,
    `device`, `dtype`, and `forward` with the model's arguments. `prompt_encoder` holds the
    trained parameters; `method_config` is the configuration they were built from.
    """

    def __init__(self, base: Transformer, prompt_encoder: nn.Module, method_config: MethodConfig) -> None:
        super().__init__()
        self.base_model = base
        self.prompt_encoder = prompt_encoder
        self.method_config = method_config
        self.num_virtual_tokens = method_config.num_virtual_tokens
        self.config: Config = dataclasses.replace(
            base.config, max_position_embeddings=base.config.max_position_embeddings - self.num_virtual_tokens
        )

    @property
    def lm_head(self) -> nn.Module | None:
        return self.base_model.lm_head

    @property
    def lm_transform(self) -> nn.Module | None:
        return self.base_model.lm_transform

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base_model.blocks

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.base_model.embed_tokens

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.dtype

    def prompt_table(self) -> torch.Tensor:
        """What PEFT saves as `prompt_embeddings`: the virtual tokens or the prefix table, after the encoder."""
        return self.prompt_encoder()

    def _check_input(
        self, input_ids, inputs_embeds, attention_mask, cache, position_ids, document_ids
    ) -> tuple[int, int, int]:
        """(batch, seq, positions the base model already holds) for a forward call, or a clear error."""
        if (input_ids is None) == (inputs_embeds is None):
            raise PromptLearningError("pass exactly one of input_ids and inputs_embeds")
        if document_ids is not None:
            raise PromptLearningError(
                "document_ids (packed rows) are not supported with prompt methods: every example needs the virtual "
                "tokens before it; give one example per row, padded, with an attention_mask"
            )
        batch, seq = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        past = cache.length if cache is not None else 0
        if past and past < self.num_virtual_tokens:
            raise PromptLearningError(
                f"the cache holds {past} positions, fewer than the {self.num_virtual_tokens} virtual ones; pass an "
                "empty cache on the first call, and the same cache after it"
            )
        count, limit = self.num_virtual_tokens, self.base_model.config.max_position_embeddings
        columns = (past - count if past else 0) + seq
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, columns):
            raise PromptLearningError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, cached + new input "
                f"positions) = ({batch}, {columns}), without the {count} virtual positions (they are added here)"
            )
        needed = max(past, count) + seq if position_ids is None else count + int(position_ids.max()) + 1
        if needed > limit:
            raise PromptLearningError(
                f"{needed - count} input positions after the {count} virtual ones need {needed} positions, beyond "
                f"this model's {limit}; inputs (with any cached ones) may be at most {limit - count} tokens long"
            )
        return batch, seq, past

    def _base_mask(self, attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        # The virtual positions are always attended to, as PEFT's prepended ones in the mask.
        if attention_mask is None:
            return None
        ones = attention_mask.new_ones(batch, self.num_virtual_tokens)
        return torch.cat((ones, attention_mask), dim=1)


def _make_room(cache: KVCache, extra: int) -> None:
    # A cache sized by the caller (generation: prompt + new tokens) lacks the virtual positions.
    add = getattr(cache, "add_capacity", None)
    if add is not None:
        add(extra)


class PromptTunedModel(PromptLearningModel):
    """Prompt tuning and P-tuning: the P virtual tokens are put before the input embeddings
    (and before the first chunk put in a cache); outputs are for the input positions only."""

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        token_type_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        compute_logits: bool = True,
        inputs_embeds: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """As `Transformer.forward`; `attention_mask` and `position_ids` cover the caller's
        positions only (the virtual ones are added here)."""
        batch, seq, past = self._check_input(
            input_ids, inputs_embeds, attention_mask, cache, position_ids, document_ids
        )
        count = self.num_virtual_tokens
        mask = self._base_mask(attention_mask, batch)
        if past:  # the virtual tokens are in the cache already
            if position_ids is not None:
                position_ids = position_ids + count
            return self.base_model(
                input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                token_type_ids=token_type_ids,
                logits_to_keep=logits_to_keep,
                compute_logits=compute_logits,
                inputs_embeds=inputs_embeds,
            )
        if cache is not None:
            _make_room(cache, count)
        embeds = self.base_model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        virtual = self.prompt_table().to(embeds.dtype).expand(batch, -1, -1)
        embeds = torch.cat((virtual, embeds), dim=1)
        if position_ids is not None:
            virtual_positions = torch.arange(count, device=position_ids.device).expand(batch, count)
            position_ids = torch.cat((virtual_positions, position_ids + count), dim=1)
        if token_type_ids is not None:
            token_type_ids = torch.cat((token_type_ids.new_zeros(batch, count), token_type_ids), dim=1)
        keep = min(logits_to_keep, seq) if logits_to_keep else 0
        out = self.base_model(
            None,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            token_type_ids=token_type_ids,
            logits_to_keep=keep,
            compute_logits=compute_logits,
            inputs_embeds=embeds,
        )
        logits = out.logits
        if logits is not None and not keep:
            logits = logits[:, count:]
        return ModelOutput(logits=logits, hidden_states=out.hidden_states[:, count:], router_logits=out.router_logits)


class PrefixTunedModel(PromptLearningModel):
    """Prefix tuning: every layer's attention reads the P trained keys and values before the
    input's. Without a cache each call builds a `PrefixKVCache`; a cache passed empty gets the
    prefix written into its first P positions (decoding), and later calls read it there."""

    def prefix_keys_values(self, batch: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's prefix keys and values, (batch, kv_heads, P, head_dim)."""
        config = self.base_model.config
        table = self.prompt_table().to(dtype)
        # A row of the table is every layer's key then value, each kv heads x head channels.
        table = table.view(self.num_virtual_tokens, 2 * config.num_layers, config.num_kv_heads, config.head_dim)
        per_layer = table.permute(1, 2, 0, 3)[:, None].expand(-1, batch, -1, -1, -1)
        return list(per_layer[0::2]), list(per_layer[1::2])

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        token_type_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        compute_logits: bool = True,
        inputs_embeds: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """As `Transformer.forward`; `attention_mask` and `position_ids` cover the caller's
        positions only (the prefix's are added here)."""
        batch, seq, past = self._check_input(
            input_ids, inputs_embeds, attention_mask, cache, position_ids, document_ids
        )
        count = self.num_virtual_tokens
        if cache is None:
            cache = PrefixKVCache(*self.prefix_keys_values(batch, self.dtype))
        elif not past:
            _make_room(cache, count)
            keys, values = self.prefix_keys_values(batch, self.dtype)
            for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
                cache.update(layer, k, v)
            cache.advance(count)
        if position_ids is not None:
            position_ids = position_ids + count
        return self.base_model(
            input_ids,
            attention_mask=self._base_mask(attention_mask, batch),
            position_ids=position_ids,
            cache=cache,
            token_type_ids=token_type_ids,
            logits_to_keep=logits_to_keep,
            compute_logits=compute_logits,
            inputs_embeds=inputs_embeds,
        )


# ---------------------------------------------------------------------------------- apply
def _check_base(model, config) -> Transformer:
    if isinstance(model, PromptLearningModel):
        raise PromptLearningError("this model already has a prompt method; apply one to a freshly loaded model")
    if not isinstance(model, Transformer):
        raise PromptLearningError(
            f"prompt methods go on a genforge Transformer (genforge.checkpoint.load_model); got {type(model).__name__}"
        )
    if not model.config.causal or model.lm_head is None:
        raise PromptLearningError(
            f"prompt methods here adapt causal language models (PEFT's task_type CAUSAL_LM); this {model.config.family} "
            "model is an encoder"
        )
    if getattr(model, "packed_for_inference", False):
        raise PromptLearningError("this model was packed for CPU inference; apply the method before packing")
    limit = model.config.max_position_embeddings
    if config.num_virtual_tokens >= limit:
        raise PromptLearningError(
            f"num_virtual_tokens {config.num_virtual_tokens} leaves no room for input in this model's {limit} "
            f"positions; use fewer than {limit}"
        )
    return model


def _token_dim(model: Transformer, config: MethodConfig) -> int:
    """The width PEFT calls token_dim: the hidden size, or for prefix tuning one layer's key width."""
    c = model.config
    expected = c.num_kv_heads * c.head_dim if isinstance(config, PrefixTuningConfig) else c.hidden_size
    if config.token_dim is not None and config.token_dim != expected:
        what = "kv heads x head dim" if isinstance(config, PrefixTuningConfig) else "hidden size"
        raise PromptLearningError(f"token_dim {config.token_dim} does not fit this model: its {what} is {expected}")
    return expected


def _freeze(model: Transformer) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _on_base(encoder: nn.Module, model: Transformer) -> nn.Module:
    # float32 whatever the base's dtype (PEFT keeps prompt encoders in float32 too); cast at use.
    return encoder.to(device=model.device, dtype=torch.float32)


def _text_init_ids(config: PromptTuningConfig, tokenizer) -> list[int]:
    if tokenizer is None:
        try:
            tokenizer = Tokenizer.from_dir(config.tokenizer_name_or_path)
        except (OSError, ValueError) as err:
            raise PromptLearningError(
                f"cannot read the tokenizer for prompt_tuning_init='TEXT' from {config.tokenizer_name_or_path!r}: {err}"
            ) from None
    # With special tokens, as PEFT's `tokenizer(text)["input_ids"]`.
    ids = list(tokenizer.encode(config.prompt_tuning_init_text))
    if not ids:
        raise PromptLearningError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} encodes to no tokens")
    count = config.num_virtual_tokens
    return (ids * math.ceil(count / len(ids)))[:count]


def apply_prompt_tuning(model: Transformer, config: PromptTuningConfig, tokenizer=None) -> PromptTunedModel:
    """Freeze `model` and put P trainable virtual tokens before its input (prompt tuning).
    `tokenizer` (anything with `encode(text)`) saves reading `config.tokenizer_name_or_path`
    for the "TEXT" init."""
    if not isinstance(config, PromptTuningConfig):
        raise PromptLearningError(f"apply_prompt_tuning takes a PromptTuningConfig, got {type(config).__name__}")
    _check_base(model, config)
    encoder = PromptEmbedding(config.num_virtual_tokens, _token_dim(model, config))
    if config.prompt_tuning_init != "RANDOM":
        if config.prompt_tuning_init == "TEXT":
            ids = _text_init_ids(config, tokenizer)
            bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
            if bad:
                raise PromptLearningError(
                    f"the init text's token ids {bad[:5]} are outside this model's vocabulary of "
                    f"{model.config.vocab_size}; is the tokenizer the model's?"
                )
            ids = torch.tensor(ids, device=model.device)
        else:
            ids = torch.randint(0, model.config.vocab_size, (config.num_virtual_tokens,), device=model.device)
        with torch.no_grad():
            encoder.embedding.weight.copy_(model.embed_tokens.weight[ids].float())
    _freeze(model)
    return PromptTunedModel(model, _on_base(encoder, model), config)


def apply_p_tuning(model: Transformer, config: PTuningConfig) -> PromptTunedModel:
    """Freeze `model` and put before its input P virtual tokens made by a trainable prompt encoder (P-tuning)."""
    if not isinstance(config, PTuningConfig):
        raise PromptLearningError(f"apply_p_tuning takes a PTuningConfig, got {type(config).__name__}")
    _check_base(model, config)
    encoder = PromptEncoder(config, _token_dim(model, config))
    _freeze(model)
    return PromptTunedModel(model, _on_base(encoder, model), config)


def apply_prefix_tuning(model: Transformer, config: PrefixTuningConfig) -> PrefixTunedModel:
    """Freeze `model` and give every layer's attention P trainable prefix keys and values (prefix tuning)."""
    if not isinstance(config, PrefixTuningConfig):
        raise PromptLearningError(f"apply_prefix_tuning takes a PrefixTuningConfig, got {type(config).__name__}")
    _check_base(model, config)
    encoder = PrefixEncoder(config, _token_dim(model, config), model.config.num_layers)
    _freeze(model)
    return PrefixTunedModel(model, _on_base(encoder, model), config)


def apply_prompt_learning(model: Transformer, config: MethodConfig, tokenizer=None) -> PromptLearningModel:
    """The prompt method `config` names (one of `PROMPT_METHODS`' config classes) on `model`."""
    if isinstance(config, PromptTuningConfig):
        return apply_prompt_tuning(model, config, tokenizer)
    if isinstance(config, PTuningConfig):
        return apply_p_tuning(model, config)
    if isinstance(config, PrefixTuningConfig):
        return apply_prefix_tuning(model, config)
    accepted = ", ".join(cls.__name__ for cls in PROMPT_METHODS.values())
    raise PromptLearningError(f"config must be one of {accepted}; got {type(config).__name__}")


# ----------------------------------------------------------------------------- PEFT format
def _peft_fields(model: PromptLearningModel) -> dict:
    """The fields PEFT's prompt-learning configs hold, as `save_pretrained` writes them."""
    base = model.base_model.config
    config = model.method_config
    prefix = isinstance(config, PrefixTuningConfig)
    token_dim = _token_dim(model.base_model, config)
    fields = {
        "peft_type": config.peft_type,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        # For prefix tuning PEFT counts the key/value heads (its GQA handling).
        "num_attention_heads": base.num_kv_heads if prefix else base.num_heads,
        "num_layers": base.num_layers,
        "modules_to_save": None,
        "inference_mode": True,
    }
    if isinstance(config, PromptTuningConfig):
        fields.update(
            prompt_tuning_init=config.prompt_tuning_init,
            prompt_tuning_init_text=config.prompt_tuning_init_text,
            tokenizer_name_or_path=config.tokenizer_name_or_path,
            tokenizer_kwargs=None,
        )
    elif isinstance(config, PTuningConfig):
        fields.update(
            encoder_reparameterization_type=config.encoder_reparameterization_type,
            encoder_hidden_size=config.encoder_hidden_size or token_dim,
            encoder_num_layers=config.encoder_num_layers,
            encoder_dropout=config.encoder_dropout,
        )
    else:
        fields.update(
            prefix_projection=config.prefix_projection,
            encoder_hidden_size=config.encoder_hidden_size or token_dim,
            init_weights=config.init_weights,
        )
    return fields


def save_prompt_adapter(
    model: PromptLearningModel, directory: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write the model's prompt method as a PEFT adapter directory that
    `peft.PeftModel.from_pretrained` loads onto the transformers model: `adapter_config.json`
    and `adapter_model.safetensors` holding `prompt_embeddings`, the table after the encoder."""
    if not isinstance(model, PromptLearningModel):
        raise PromptLearningError(
            f"save_prompt_adapter saves a model made by apply_prompt_tuning, apply_p_tuning, apply_prefix_tuning or "
            f"load_prompt_adapter; got {type(model).__name__}"
        )
    adapter_config = {"base_model_name_or_path": base_model_name_or_path, **_peft_fields(model)}
    with torch.no_grad():
        table = model.prompt_table().detach().float().contiguous().cpu()
    return write_adapter(directory, adapter_config, {ADAPTER_KEY: table})


_LOADED_CONFIGS = {cls.peft_type: cls for cls in PROMPT_METHODS.values()}


def load_prompt_adapter(model: Transformer, directory: str | Path) -> PromptLearningModel:
    """Put the PEFT prompt-tuning, P-tuning or prefix-tuning adapter saved in `directory`
    (safetensors) on `model`, after checking it against the model. The saved table is what
    trains from here on (P-tuning's encoder and the prefix MLP are not in the file)."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    saved = read_adapter_config(directory, tuple(_LOADED_CONFIGS), "load_prompt_adapter", PromptLearningError)
    if saved.get("task_type") not in (None, "CAUSAL_LM"):
        raise PromptLearningError(
            f"{path} is for task_type {saved['task_type']!r}; genforge's prompt methods load CAUSAL_LM adapters"
        )
    if saved.get("num_transformer_submodules") not in (None, 1):
        raise PromptLearningError(
            f"{path} has num_transformer_submodules {saved['num_transformer_submodules']} (an encoder-decoder "
            "adapter); a causal language model has 1"
        )
    if saved.get("modules_to_save") not in (None, []):
        raise PromptLearningError(f"{path} uses modules_to_save, which genforge's prompt methods do not support")
    config_class = _LOADED_CONFIGS[saved["peft_type"]]
    known = {field.name for field in dataclasses.fields(config_class)}
    try:
        config = config_class(**{key: value for key, value in saved.items() if key in known})
    except (PromptLearningError, TypeError) as err:
        raise PromptLearningError(f"{path} is not a usable {saved['peft_type']} config: {err}") from None
    try:
        _check_base(model, config)
        token_dim = _token_dim(model, config)
    except PromptLearningError as err:
        raise PromptLearningError(f"the adapter in {directory} does not fit this model: {err}") from None
    prefix = isinstance(config, PrefixTuningConfig)
    heads = model.config.num_kv_heads if prefix else model.config.num_heads
    for name, theirs, ours in (
        ("num_layers", saved.get("num_layers"), model.config.num_layers),
        ("num_attention_heads", saved.get("num_attention_heads"), heads),
    ):
        if theirs is not None and theirs != ours:
            raise PromptLearningError(
                f"the adapter in {directory} does not fit this model: it was made for {name} {theirs}, this "
                f"{model.config.family} model has {ours}"
            )
    width = model.config.num_layers * 2 * token_dim if prefix else token_dim
    expected = {ADAPTER_KEY: (config.num_virtual_tokens, width)}
    stored = read_adapter_tensors(adapter_weights_path(directory, PromptLearningError))
    check_adapter_fits(directory, expected, stored, "prompt table", PromptLearningError)
    check_adapter_shapes(directory, expected, stored, PromptLearningError)
    # A table of its own whatever the method: the encoder that made it is not saved.
    if prefix:
        encoder = PrefixEncoder(
            dataclasses.replace(config, prefix_projection=False), token_dim, model.config.num_layers
        )
    else:
        encoder = PromptEmbedding(config.num_virtual_tokens, token_dim)
    with torch.no_grad():
        encoder.embedding.weight.copy_(stored[ADAPTER_KEY])
    _freeze(model)
    wrapper = PrefixTunedModel if prefix else PromptTunedModel
    return wrapper(model, _on_base(encoder, model), config)
