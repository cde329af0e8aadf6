"""The simplest training data: one in-memory stream of token ids cut into fixed-length
sequences, and a seeded shuffling sampler whose position is part of the training state.

Language-model pretraining concatenates documents and cuts the stream into equal blocks
(Radford et al. 2019), so no padding is needed and every position is a training target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DataError(ValueError):
    """Training data that cannot be used as given."""


class TokenDataset:
    """`len(tokens) // seq_len` non-overlapping sequences of `seq_len` tokens; the tail that
    does not fill a sequence is left out (its length is `dropped_tokens`)."""

    def __init__(self, tokens: Sequence[int] | torch.Tensor, seq_len: int) -> None:
        if seq_len < 2:
            raise DataError(f"seq_len must be >= 2 (a sequence needs a next token to predict), got {seq_len}")
        ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise DataError("the corpus is empty: no token ids to train on; pass a non-empty list or tensor of ids")
        if ids.numel() < seq_len:
            raise DataError(
                f"the corpus has {ids.numel()} tokens, fewer than one sequence of seq_len={seq_len}; "
                "use more text or a shorter seq_len"
            )
        if int(ids.min()) < 0:
            raise DataError(f"token ids must be >= 0, found {int(ids.min())}")
        self.seq_len = seq_len
        count = ids.numel() // seq_len
        self.dropped_tokens = ids.numel() - count * seq_len
        self.sequences = ids[: count * seq_len].view(count, seq_len)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def max_token_id(self) -> int:
        return int(self.sequences.max())

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return self.sequences[torch.as_tensor(list(indices), dtype=torch.long)]


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


__all__ = ["DataError", "TokenDataset", "ShuffleSampler"]
