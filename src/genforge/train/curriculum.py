"""Curriculum learning: show the model easy examples first (Bengio et al. 2009).

An example's difficulty is a score (its length, how rare its tokens are, or its loss under a
small reference model); a schedule decides how much of the data, easiest first, is open at each
point of the run. `CurriculumSampler` draws batches from that open pool and replaces the
trainer's shuffling sampler (`Trainer(sampler=...)`), with the same `take` / `state_dict`
interface, so a run with a curriculum resumes exactly.

Schedules:
  competence   the open share grows as sqrt(t (1 - c0^2) / T + c0^2) to 1 at `ramp` of the run
               (Platanios et al. 2019, "Competence-based curriculum learning")
  linear       the open share grows linearly from c0 to 1 over the ramp
  baby_steps   `stages` equal steps of the open share (Spitkovsky et al. 2010)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .data import DataError

SCHEDULES = ("competence", "linear", "baby_steps")


def length_difficulty(lengths: Sequence[int]) -> torch.Tensor:
    """Longer is harder: each example's number of tokens."""
    return torch.as_tensor(lengths, dtype=torch.float64)


def rarity_difficulty(sequences: Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean unigram surprisal of an example's tokens under the corpus's own counts (add-one
    smoothed): examples made of frequent tokens are easy."""
    rows = [torch.as_tensor(seq, dtype=torch.long) for seq in sequences]
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for row in rows:
        counts += torch.bincount(row, minlength=vocab_size)[:vocab_size].double()
    surprisal = -(counts / counts.sum()).log()
    return torch.stack([surprisal[row].mean() if len(row) else surprisal.new_tensor(0.0) for row in rows])


@torch.no_grad()
def loss_difficulty(model: torch.nn.Module, data, batch_size: int = 16) -> torch.Tensor:
    """Each example's mean next-token loss under a (small, already trained) reference model.
    `data` is a `TokenDataset` (or anything with `__len__` and `batch(indices) -> ids`)."""
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(data), batch_size):
        ids = data.batch(list(range(start, min(start + batch_size, len(data)))))
        ids = ids[0] if isinstance(ids, tuple) else ids
        logits = model(ids).logits[:, :-1]
        losses = F.cross_entropy(logits.transpose(1, 2).float(), ids[:, 1:], reduction="none")
        scores.append(losses.mean(dim=1).double())
    model.train(was_training)
    return torch.cat(scores)


def open_fraction(schedule: str, progress: float, start: float, stages: int = 4) -> float:
    """The share of the data (easiest first) open at `progress` in [0, 1] of the ramp."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "competence":
        return min(1.0, math.sqrt(progress * (1 - start**2) + start**2))
    if schedule == "linear":
        return start + (1 - start) * progress
    if schedule == "baby_steps":
        stage = min(stages - 1, int(progress * stages))
        return start + (1 - start) * stage / (stages - 1) if stages > 1 else 1.0
    raise DataError(f"unknown curriculum schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}")


class CurriculumSampler:
    """Indices drawn uniformly (without replacement within a draw) from the easiest examples open
    at this point of the run. `total_samples` is the run's length in drawn examples (steps x
    batch size x accumulation); the pool is the whole data from `ramp` x total on.

    Each `take` depends only on (seed, samples drawn so far), so the state is one counter."""

    def __init__(
        self,
        difficulty: Sequence[float] | torch.Tensor,
        total_samples: int,
        schedule: str = "competence",
        start: float = 0.2,
        ramp: float = 0.8,
        stages: int = 4,
        seed: int = 0,
    ) -> None:
        difficulty = torch.as_tensor(difficulty, dtype=torch.float64)
        if difficulty.dim() != 1 or len(difficulty) == 0:
            raise DataError("a curriculum needs one difficulty score per example, for at least one example")
        if not torch.isfinite(difficulty).all():
            raise DataError("difficulty scores must be finite numbers")
        if schedule not in SCHEDULES:
            raise DataError(f"unknown curriculum schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}")
        if not 0.0 < start <= 1.0 or not 0.0 < ramp <= 1.0:
            raise DataError(f"start ({start}) and ramp ({ramp}) must be in (0, 1]")
        if total_samples < 1 or stages < 1:
            raise DataError("total_samples and stages must be positive")
        # Stable sort: equal scores keep the data's order, so the ranking is reproducible.
        self.order = torch.sort(difficulty, stable=True).indices
        self.size, self.total, self.schedule = len(difficulty), total_samples, schedule
        self.start, self.ramp, self.stages, self.seed = start, ramp, stages, seed
        self.drawn = 0

    def pool_size(self) -> int:
        share = open_fraction(self.schedule, self.drawn / (self.ramp * self.total), self.start, self.stages)
        return max(1, min(self.size, math.ceil(share * self.size)))

    def take(self, count: int) -> list[int]:
        pool = self.pool_size()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.drawn)
        picks = torch.cat([torch.randperm(pool, generator=generator) for _ in range(math.ceil(count / pool))])
        self.drawn += count
        return self.order[picks[:count]].tolist()

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "seed": self.seed, "size": self.size, "schedule": self.schedule}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("size"), state.get("seed"), state.get("schedule")) != (self.size, self.seed, self.schedule):
            raise DataError(
                f"the checkpoint's curriculum sampler is for {state.get('size')} examples, seed {state.get('seed')}, "
                f"schedule {state.get('schedule')}; resume with the same data, seed and curriculum"
            )
        self.drawn = int(state["drawn"])
