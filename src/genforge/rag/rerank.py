"""Second-stage re-ranking of retrieved candidates.

- Late interaction, ColBERT-style (Khattab & Zaharia 2020, "ColBERT: Efficient and Effective
  Passage Search via Contextualized Late Interaction over BERT"): query and passage are
  encoded separately into one unit vector per token, and the score is MaxSim,
  sum over query tokens q_i of max over passage tokens d_j of q_i . d_j. Each query word finds
  its best match anywhere in the passage, in context, instead of everything being squeezed
  into one pooled vector first. Here the token vectors are the contextual outputs of the
  offline all-MiniLM-L6-v2 encoder (genforge's own BERT), not a ColBERT-trained model, so it
  is best used fused with the first stage (`Retriever.search(rerank_fusion="rrf")`).
  Passage token vectors are cached by content hash, as the index caches sentence vectors.
- Cross-encoder (Nogueira & Cho 2019, "Passage Re-ranking with BERT"): question and passage
  read together by one model that outputs a relevance score; the most accurate and the most
  expensive, so only the top candidates go through it. Any sentence-transformers
  `CrossEncoder` directory the user supplies.

A re-ranker is anything with `score(query, chunks) -> sequence of floats` (higher is better).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from .chunking import Chunk


def maxsim(query_tokens: np.ndarray, doc_tokens: Sequence[np.ndarray]) -> np.ndarray:
    """ColBERT's MaxSim for one query against several documents: for each document,
    sum_i max_j <q_i, d_j> over the given token vectors (no normalisation is applied here)."""
    q = np.asarray(query_tokens, np.float32)
    if q.ndim != 2:
        raise ValueError(f"query token vectors must be a (tokens, dim) matrix, got shape {q.shape}")
    if not len(doc_tokens):
        return np.zeros(0, np.float32)
    widths = [len(d) for d in doc_tokens]
    if min(widths) == 0:
        raise ValueError("a document has no token vectors; MaxSim needs at least one per document")
    # Pad the documents into one (docs, longest, dim) block; padding never wins the max.
    block = np.zeros((len(doc_tokens), max(widths), q.shape[1]), np.float32)
    for n, d in enumerate(doc_tokens):
        if np.asarray(d).shape[1] != q.shape[1]:
            raise ValueError(f"document {n} has {np.asarray(d).shape[1]}-dim token vectors; the query has {q.shape[1]}")
        block[n, : len(d)] = d
    sims = np.einsum("qd,ntd->nqt", q, block)
    valid = np.arange(max(widths))[None, :] < np.asarray(widths)[:, None]  # (docs, longest)
    sims = np.where(valid[:, None, :], sims, -np.inf)
    return sims.max(axis=2).sum(axis=1)


class TokenEmbedder:
    """Contextual token vectors from a `genforge.encoder.SentenceEncoder` (all-MiniLM-L6-v2 by
    default): the encoder's last hidden states, scaled to unit length, [CLS]/[SEP] and padding
    dropped. Passage vectors are cached by the SHA-256 of their text (float16 in memory)."""

    def __init__(self, encoder=None, max_tokens: int | None = None, batch_size: int = 16) -> None:
        if encoder is None:
            from ..encoder import SentenceEncoder

            encoder = SentenceEncoder()
        self.encoder = encoder
        self.max_tokens = min(max_tokens or encoder.max_length, encoder.max_length)
        self.batch_size = batch_size
        self.cache: dict[str, np.ndarray] = {}
        self.misses = 0
        tok = encoder.tokenizer
        self._special = {i for i in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) if i is not None}

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One (tokens, dim) float32 matrix of unit rows per text (not cached)."""
        import torch

        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        ids = self.encoder.tokenizer.encode_batch(list(texts))
        ids = [row if len(row) <= self.max_tokens else row[: self.max_tokens - 1] + row[-1:] for row in ids]
        out: list[np.ndarray] = [None] * len(ids)  # type: ignore[list-item]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths pad little
        model = self.encoder.model
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                batch = order[s : s + self.batch_size]
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), self.encoder.tokenizer.pad_token_id or 0, dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                for r, i in enumerate(batch):
                    input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                    mask[r, : len(ids[i])] = 1
                hidden = (
                    model(input_ids.to(model.device), attention_mask=mask.to(model.device)).hidden_states.float().cpu()
                )
                hidden = torch.nn.functional.normalize(hidden, dim=-1).numpy()
                for r, i in enumerate(batch):
                    keep = [p for p, t in enumerate(ids[i]) if t not in self._special]
                    # A text of only special tokens (empty string) keeps them rather than nothing.
                    out[i] = hidden[r, keep if keep else list(range(len(ids[i])))]
        return out

    def documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token vectors per passage, computing only those whose text is not cached."""
        hashes = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        todo = {h: t for h, t in zip(hashes, texts) if h not in self.cache}
        if todo:
            keys = list(todo)
            for h, v in zip(keys, self.encode([todo[h] for h in keys])):
                self.cache[h] = v.astype(np.float16)
            self.misses += len(todo)
        return [self.cache[h].astype(np.float32) for h in hashes]

    def save_cache(self, path: str | Path) -> None:
        """Write the passage cache to one .npz file (no pickle), atomically."""
        keys = sorted(self.cache)
        lengths = np.array([len(self.cache[k]) for k in keys], np.int64)
        dim = self.encoder.dimension
        vectors = np.concatenate([self.cache[k] for k in keys]) if keys else np.zeros((0, dim), np.float16)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    keys=np.array(keys, dtype="U64"),
                    lengths=lengths,
                    vectors=vectors,
                    max_tokens=np.array(self.max_tokens),
                )

    def load_cache(self, path: str | Path) -> None:
        with np.load(path, allow_pickle=False) as data:
            if int(data["max_tokens"]) != self.max_tokens:
                raise ValueError(
                    f"{path} caches {int(data['max_tokens'])}-token passages; this embedder cuts at {self.max_tokens}"
                )
            offsets = np.concatenate([[0], np.cumsum(data["lengths"])])
            vectors = data["vectors"]
            for n, key in enumerate(data["keys"]):
                self.cache[str(key)] = vectors[offsets[n] : offsets[n + 1]]


class LateInteractionReranker:
    """Re-scores candidates by MaxSim over contextual token vectors, divided by the number of
    query tokens (the same order as the sum, on a cosine scale).

    `cache_path` (a .npz) keeps passage token vectors across runs: read here when it exists,
    written by `save_cache()` when new passages were encoded."""

    def __init__(self, token_embedder: TokenEmbedder | None = None, cache_path: str | Path | None = None) -> None:
        self.tokens = token_embedder or TokenEmbedder()
        self.cache_path = Path(cache_path) if cache_path is not None else None
        if self.cache_path is not None and self.cache_path.is_file():
            try:
                self.tokens.load_cache(self.cache_path)
            except (ValueError, OSError, KeyError):
                pass  # a cache for another window or a damaged file is only a lost speed-up
        self._saved_misses = self.tokens.misses

    def save_cache(self) -> bool:
        """Write the passage cache to `cache_path` if passages were encoded since; True if written."""
        if self.cache_path is None or self.tokens.misses == self._saved_misses:
            return False
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        self.tokens.save_cache(self.cache_path)
        self._saved_misses = self.tokens.misses
        return True

    def score(self, query: str, chunks: Sequence[Chunk]) -> np.ndarray:
        if not chunks:
            return np.zeros(0, np.float32)
        q = self.tokens.encode([query])[0]
        docs = self.tokens.documents([c.text for c in chunks])
        return maxsim(q, docs) / len(q)


class CrossEncoderReranker:
    """A sentence-transformers `CrossEncoder` read from a local directory scores (query, passage) pairs."""

    def __init__(self, directory: str | Path, max_length: int = 512, batch_size: int = 16, device: str = "cpu") -> None:
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise ValueError(
                f"{directory} is not a cross-encoder directory (no config.json); pass a folder saved by "
                "sentence_transformers.CrossEncoder.save or transformers' save_pretrained"
            )
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(str(directory), device=device, local_files_only=True, max_length=max_length)
        self.batch_size = batch_size

    def score(self, query: str, chunks: Sequence[Chunk]) -> np.ndarray:
        if not chunks:
            return np.zeros(0, np.float32)
        scores = self.model.predict(
            [(query, c.text) for c in chunks], batch_size=self.batch_size, show_progress_bar=False
        )
        scores = np.asarray(scores, np.float32)
        # A two-label model gives (n, 2); the "relevant" column is the score.
        return scores[:, -1] if scores.ndim == 2 else scores
