"""Embedders turn chunk texts into vectors for a `HybridIndex`: the `Embedder` protocol,
genforge's `SentenceEncoder` as one, and a cache of vectors by content hash so that
re-indexing unchanged chunks embeds nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .stores import RagIndexError


class Embedder(Protocol):
    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class EncoderEmbedder:
    """genforge's `SentenceEncoder` as an `Embedder`; its name identifies the model in manifests."""

    def __init__(
        self,
        directory: str | Path | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        max_tokens: int | None = None,
    ) -> None:
        from ..encoder import SentenceEncoder, default_encoder_path

        label = "all-MiniLM-L6-v2" if directory is None else Path(directory).name
        directory = Path(directory) if directory is not None else default_encoder_path()
        self.encoder = SentenceEncoder(directory, device=device)
        self.batch_size = batch_size
        if max_tokens is not None:
            # A shorter window embeds faster (attention is quadratic in it); all-MiniLM-L6-v2 was
            # trained on 128-token inputs, so the question and the answer's opening carry the signal.
            self.encoder.max_length = min(max_tokens, self.encoder.max_length)
        self.dimension = self.encoder.dimension
        # The directory name alone could collide (two fine-tunes of one base); the config and
        # weights' size make the name specific without hashing hundreds of megabytes.
        weights = sorted(p.stat().st_size for p in directory.glob("*.safetensors"))
        digest = hashlib.sha256((directory / "config.json").read_bytes() + repr(weights).encode()).hexdigest()[:12]
        self.name = f"{label}@{digest}" + (f"/max{self.encoder.max_length}" if max_tokens is not None else "")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(list(texts), batch_size=self.batch_size).numpy().astype(np.float32)


class EmbeddingCache:
    """Vectors by content hash for one embedding model: only texts not seen before are embedded."""

    def __init__(self, model: str, vectors: dict[str, np.ndarray] | None = None) -> None:
        self.model = model
        self.vectors = dict(vectors or {})
        self.misses = 0

    def embed(self, texts: Sequence[str], embedder: Embedder) -> np.ndarray:
        if embedder.name != self.model:
            raise RagIndexError(f"embedding cache holds vectors of {self.model!r}, not {embedder.name!r}")
        hashes = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        todo = sorted({h: t for h, t in zip(hashes, texts) if h not in self.vectors}.items())
        if todo:
            fresh = embedder.embed([t for _, t in todo])
            self.vectors.update({h: v for (h, _), v in zip(todo, fresh)})
        self.misses += len(todo)
        if not hashes:
            return np.zeros((0, embedder.dimension), np.float32)
        return np.stack([self.vectors[h] for h in hashes]).astype(np.float32)
