"""Tiny random genforge models for tests: a decoder (Llama layout) and a BERT-style encoder.

Each is built right after `torch.manual_seed(seed)`, so a seed names one set of weights. A test
passes the config fields it needs to differ as keyword overrides; the models come back in train
mode, as `nn.Module`s do, so call `.eval()` where a test decodes with them.
"""

from __future__ import annotations

import torch

from genforge.config import Config
from genforge.model import Transformer

TINY_DECODER = dict(
    family="llama",
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
)

TINY_ENCODER = dict(
    family="bert",
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
    causal=False,
    post_norm=True,
    norm="layernorm",
    activation="gelu",
    gated_mlp=False,
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    position="learned",
    type_vocab_size=2,
    embedding_norm=True,
    tie_word_embeddings=True,
    masked_lm_head=True,
)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A random decoder: `TINY_DECODER` with `overrides` (any `Config` field, `family` included)."""
    torch.manual_seed(seed)
    return Transformer(Config(**(TINY_DECODER | overrides)))


def tiny_encoder(seed: int = 0, **overrides) -> Transformer:
    """A random BERT-style encoder with a tied masked-LM head: `TINY_ENCODER` with `overrides`."""
    torch.manual_seed(seed)
    return Transformer(Config(**(TINY_ENCODER | overrides)))
