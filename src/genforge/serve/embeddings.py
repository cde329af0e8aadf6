"""``/v1/embeddings``: sentence embeddings from encoder models, in OpenAI's response shape."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import bad
from .preparation import decode_prompt
from .schemas import EmbeddingRequest

__all__ = ["Embedder", "embeddings_response"]


@dataclass
class Embedder:
    """One shape for the two kinds of embedding model: ``genforge.encoder.SentenceEncoder``
    (``encode`` -> tensor) and ``genforge.rag.index.EncoderEmbedder`` (``embed`` -> array)."""

    model: Any
    tokenizer: Any
    dimension: int

    @classmethod
    def of(cls, name: str, model: Any) -> Embedder:
        tokenizer = getattr(model, "tokenizer", None) or getattr(getattr(model, "encoder", None), "tokenizer", None)
        if tokenizer is None or not (hasattr(model, "encode") or hasattr(model, "embed")):
            raise ValueError(
                f"embedding model {name!r} must be a genforge SentenceEncoder or EncoderEmbedder "
                f"(encode/embed and a tokenizer), got {type(model).__name__}"
            )
        return cls(model, tokenizer, int(model.dimension))

    def embed(self, texts: list[str]) -> np.ndarray:
        if hasattr(self.model, "encode"):
            return np.asarray(self.model.encode(texts), dtype=np.float32)
        return np.asarray(self.model.embed(texts), dtype=np.float32)


async def embeddings_response(body: EmbeddingRequest, encoder: Embedder, lock: asyncio.Lock) -> dict:
    """Embed the request's inputs (texts or token ids) and answer in OpenAI's shape. ``lock``
    keeps one forward pass at a time: the encoder is not thread-safe."""
    inputs = body.input
    if isinstance(inputs, str):
        texts = [inputs]
    elif isinstance(inputs[0], str):
        texts = list(inputs)
    else:
        rows = [list(inputs)] if isinstance(inputs[0], int) else [list(r) for r in inputs]
        texts = [decode_prompt(encoder.tokenizer, r, i, param="input") for i, r in enumerate(rows)]
    dimension = int(encoder.dimension)
    if body.dimensions is not None and body.dimensions != dimension:
        raise bad(
            f"the model {body.model!r} embeds into {dimension} dimensions; dimensions={body.dimensions} "
            "cannot be served (omit it)",
            "dimensions",
        )
    usage = sum(len(ids) for ids in encoder.tokenizer.encode_batch(texts))
    async with lock:
        vectors = await asyncio.to_thread(encoder.embed, texts)
    data = []
    for i, row in enumerate(vectors):
        value = base64.b64encode(row.tobytes()).decode() if body.encoding_format == "base64" else row.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": usage, "total_tokens": usage},
    }
