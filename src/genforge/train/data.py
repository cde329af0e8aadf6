"""Training data: a stream of token ids (in memory, or memory-mapped shards written by
`genforge data prepare`) cut into fixed-length sequences, and a seeded shuffling sampler whose
position is part of the training state.

Language-model pretraining concatenates documents and cuts the stream into equal blocks
(Radford et al. 2019), so no padding is needed and every position is a training target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """Training data that cannot be used as given."""


class TokenDataset:
    """`len(tokens) // seq_len` non-overlapping sequences of `seq_len` tokens; the tail that
    does not fill a sequence is left out (its length is `dropped_tokens`).

    `tokens` is a list or tensor of ids (held in memory as one tensor), or a numpy array or a
    list of numpy arrays (e.g. `numpy.load(path, mmap_mode="r")` shards): those are read lazily,
    batch by batch, as one stream in the order given, so a corpus larger than memory trains from
    disk. Either way `sequences[i]` / `sequences[a:b]` and `batch(indices)` give int64 tensors.
    """

    def __init__(
        self,
        tokens: Sequence[int] | torch.Tensor | np.ndarray | Sequence[np.ndarray],
        seq_len: int,
        max_token_id: int | None = None,
    ) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise DataError(f"seq_len must be >= 2 (a sequence needs a next token to predict), got {seq_len}")
        self.seq_len = seq_len
        chunks = _as_arrays(tokens)
        if chunks is None:
            ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
            _check_length(ids.numel(), seq_len)
            if int(ids.min()) < 0:
                raise DataError(f"token ids must be >= 0, found {int(ids.min())}")
            count = ids.numel() // seq_len
            self.dropped_tokens = ids.numel() - count * seq_len
            self.sequences = ids[: count * seq_len].view(count, seq_len)
            self._max_token_id = max_token_id
            return
        total = sum(len(c) for c in chunks)
        _check_length(total, seq_len)
        for chunk in chunks:
            if chunk.dtype.kind == "i" and len(chunk) and int(_chunked_reduce(chunk, np.min)) < 0:
                raise DataError(f"token ids must be >= 0, found {int(_chunked_reduce(chunk, np.min))}")
        count = total // seq_len
        self.dropped_tokens = total - count * seq_len
        self.sequences = _LazySequences(chunks, seq_len, count)
        self._max_token_id = max_token_id

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def max_token_id(self) -> int:
        """The largest id in the sequences, computed once; or the value given to the constructor
        (`load_prepared` gives the one recorded for the split, which counts the dropped tail too)."""
        if self._max_token_id is None:
            if isinstance(self.sequences, torch.Tensor):
                self._max_token_id = int(self.sequences.max())
            else:
                self._max_token_id = self.sequences.max()
        return self._max_token_id

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return self.sequences[torch.as_tensor(list(indices), dtype=torch.long)]


def _check_length(count: int, seq_len: int) -> None:
    if count == 0:
        raise DataError("the corpus is empty: no token ids to train on; pass a non-empty list or tensor of ids")
    if count < seq_len:
        raise DataError(
            f"the corpus has {count} tokens, fewer than one sequence of seq_len={seq_len}; "
            "use more text or a shorter seq_len"
        )


def _as_arrays(tokens) -> list[np.ndarray] | None:
    """The numpy chunks of `tokens`, or None when it is not numpy data (then it is held as a tensor)."""
    if isinstance(tokens, np.ndarray):
        chunks = [tokens]
    elif isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, np.ndarray) for t in tokens):
        chunks = list(tokens)
    else:
        return None
    for chunk in chunks:
        if chunk.ndim != 1:
            raise DataError(f"token arrays must be 1-D streams of ids, got shape {chunk.shape}")
        if chunk.dtype.kind not in "iu":
            raise DataError(f"token arrays must hold integers, got dtype {chunk.dtype}")
    return [c for c in chunks if len(c)]


def _chunked_reduce(array: np.ndarray, reduce, step: int = 1 << 24):
    """`reduce` (np.min / np.max) over `array` in slices, so a memory-mapped file is read piecewise."""
    return reduce([reduce(array[i : i + step]) for i in range(0, len(array), step)])


class _LazySequences:
    """The `(count, seq_len)` view of a stream of numpy chunks, read on indexing.

    A sequence may straddle two chunks (shards are cut by size, not at sequence boundaries);
    it is then stitched from both. Indexing gives int64 tensors, like the in-memory tensor.
    """

    def __init__(self, chunks: list[np.ndarray], seq_len: int, count: int) -> None:
        self.chunks, self.seq_len = chunks, seq_len
        self.shape = (count, seq_len)
        self.starts = np.cumsum([0] + [len(c) for c in chunks])  # stream offset of each chunk

    def __len__(self) -> int:
        return self.shape[0]

    def _row(self, index: int) -> np.ndarray:
        begin = index * self.seq_len
        end = begin + self.seq_len
        chunk = int(np.searchsorted(self.starts, begin, side="right")) - 1
        offset = begin - int(self.starts[chunk])
        if end <= self.starts[chunk + 1]:
            return self.chunks[chunk][offset : offset + self.seq_len]
        pieces, needed = [], self.seq_len
        while needed:
            piece = self.chunks[chunk][offset : offset + needed]
            pieces.append(piece)
            needed -= len(piece)
            chunk, offset = chunk + 1, 0
        return np.concatenate(pieces)

    def __getitem__(self, key) -> torch.Tensor:
        count = self.shape[0]
        if isinstance(key, (torch.Tensor, np.ndarray)) and key.ndim == 0:
            key = int(key)  # a scalar index selects one sequence, as with a tensor
        if isinstance(key, slice):
            rows = range(*key.indices(count))
        elif isinstance(key, torch.Tensor):
            rows = key.flatten().tolist()
        elif isinstance(key, (list, tuple, np.ndarray)):
            rows = list(np.asarray(key).reshape(-1))
        else:
            index = int(key)
            if not -count <= index < count:
                raise IndexError(f"sequence {index} is out of range for {count} sequences")
            return torch.from_numpy(self._row(index % count).astype(np.int64))
        out = np.empty((len(rows), self.seq_len), dtype=np.int64)
        for i, row in enumerate(rows):
            row = int(row)
            if not -count <= row < count:
                raise IndexError(f"sequence {row} is out of range for {count} sequences")
            out[i] = self._row(row % count)
        return torch.from_numpy(out)

    def max(self) -> int:
        usable = self.shape[0] * self.seq_len
        best, seen = 0, 0
        for chunk in self.chunks:
            part = chunk[: max(0, min(len(chunk), usable - seen))]
            seen += len(chunk)
            if len(part):
                best = max(best, int(_chunked_reduce(part, np.max)))
        return best


def load_prepared(directory: str | os.PathLike, seq_len: int | None = None) -> tuple[TokenDataset, TokenDataset | None]:
    """The train and val `TokenDataset`s of a `genforge data prepare` output directory, over
    memory-mapped shards (nothing is read into memory until batches are taken).

    seq_len: default the one recorded at preparation. val is None when the data has no val split.
    Errors name the problem: a missing or foreign `meta.json`, missing or truncated shards, a
    dtype mismatch, or a split shorter than one sequence.
    """
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"{directory} is not a prepared data directory (no meta.json); create one with `genforge data prepare`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_path} is corrupt ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != "genforge-token-shards":
        raise DataError(
            f"{meta_path} is not a genforge token-shard description (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    if meta.get("version") != 1:
        raise DataError(f"{meta_path} has format version {meta.get('version')}; this genforge reads version 1")
    seq_len = seq_len if seq_len is not None else meta.get("seq_len")
    if seq_len is None:
        raise DataError(f"{directory} was prepared without --seq-len; pass seq_len")
    datasets: dict[str, TokenDataset | None] = {}
    for split in ("train", "val"):
        info = meta["splits"][split]
        if info["tokens"] == 0:
            datasets[split] = None
            continue
        arrays = []
        for shard in info["shards"]:
            path = directory / shard["file"]
            if not path.is_file():
                raise DataError(f"shard {path} listed in meta.json is missing")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as err:
                raise DataError(f"shard {path} is corrupt ({err})") from None
            if array.dtype != np.dtype(meta["dtype"]) or array.shape != (shard["tokens"],):
                raise DataError(
                    f"shard {path} holds {array.shape} {array.dtype}, but meta.json records "
                    f"({shard['tokens']},) {meta['dtype']}; prepare the data again"
                )
            arrays.append(array)
        try:
            # The split's largest id as recorded at preparation (its dropped tail included): an
            # upper bound the trainer checks against the vocabulary without reading every shard.
            datasets[split] = TokenDataset(arrays, seq_len, max_token_id=info.get("max_token_id"))
        except DataError as err:
            raise DataError(f"{split} split of {directory}: {err}") from None
    if datasets["train"] is None:
        raise DataError(f"{directory} has no training tokens")
    return datasets["train"], datasets["val"]


class ShuffleSampler:
    """An endless stream of sequence indices: a fresh seeded permutation each epoch.

    The permutation of epoch e depends only on (seed, e), so the state is just
    (epoch, position), which checkpoints save and resume restores.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        if size <= 0:
            raise DataError(f"a sampler needs at least one sequence, got {size}")
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            step = min(count - len(out), self.size - self.position)
            out.extend(self._order[self.position : self.position + step])
            self.position += step
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size") != self.size or state.get("seed") != self.seed:
            raise DataError(
                f"sampler state is for {state.get('size')} sequences with seed {state.get('seed')}, but this "
                f"dataset has {self.size} sequences and seed {self.seed}; resume with the same data and seed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


__all__ = ["DataError", "TokenDataset", "ShuffleSampler", "load_prepared"]
