"""Prefill and decode as phases of the engine's steps: time and tokens per phase.

A step of a continuous-batching engine mixes phases (Sarathi-Serve, Agrawal et al. 2024, calls
them prefill and decode): with chunked prefill one step runs prompt chunks and decode rows
together, so "time to first token" and "time per output token" alone do not say where the
engine's time goes. `PhaseCounters` splits every step's wall time into phases:

- "prefill": computing prompt tokens for the first time;
- "decode": computing generated tokens (each decode row feeds the newest token);
- "recompute": computing again tokens a sequence had computed before it was preempted;
- "swap": copying preempted sequences' KV blocks out and back (`swap.py`);
- "schedule": everything else in the step: forming the batch, preparing the resident rows,
  publishing full blocks to the prefix cache, and the step's own bookkeeping.

Attribution is by measured sub-phase: the step is cut into consecutive timed segments
(scheduling, each forward pass, sampling, bookkeeping), so the phases add up to the step's
time. A segment serving one phase goes to it whole; one forward pass may hold several (the
batched one-token pass runs decode rows beside rows computing a prompt's last token, and a
resumed sequence's chunk recomputes old tokens and then computes new ones): it is split by
token share. Sampling goes to the phase of each sampled row's last position, by row share.
On a GPU the engine synchronizes at the segment boundaries, so a segment's time is its work.

Tokens are positions computed, per phase. So over finished requests: prefill tokens equal
prompt tokens less those found in the prefix cache at admission, and decode tokens equal
generated tokens less one per request (its first token comes from the prefill's last
position, and its last token is never fed back).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("prefill", "decode", "recompute", "swap", "schedule")


def position_phases(start: int, count: int, num_prompt_tokens: int, computed_before: int) -> dict[str, int]:
    """How many of the positions start .. start + count - 1 of a sequence are prefill,
    decode and recompute: positions below `computed_before` (the most the sequence had
    computed before a preemption) are recomputed; of the rest, those below
    `num_prompt_tokens` are prefill and the others decode."""
    end = start + count
    recompute = max(0, min(end, computed_before) - start)
    first_new = max(start, computed_before)
    prefill = max(0, min(end, num_prompt_tokens) - first_new)
    return {"recompute": recompute, "prefill": prefill, "decode": count - recompute - prefill}


def phase_of_position(position: int, num_prompt_tokens: int, computed_before: int) -> str:
    if position < computed_before:
        return "recompute"
    return "prefill" if position < num_prompt_tokens else "decode"


@dataclass
class PhaseCounters:
    """Totals since the engine started, and the latest step's split."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES[:3], 0))
    steps: int = 0
    mixed_steps: int = 0  # steps that ran prompt tokens (prefill or recompute) and decodes together
    step_seconds: float = 0.0
    last_step_share: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def add_step(self, seconds: dict[str, float], tokens: dict[str, int], step_seconds: float) -> None:
        for phase, value in seconds.items():
            self.seconds[phase] += value
        for phase, value in tokens.items():
            self.tokens[phase] += value
        self.steps += 1
        self.step_seconds += step_seconds
        if tokens["decode"] and (tokens["prefill"] or tokens["recompute"]):
            self.mixed_steps += 1
        total = sum(seconds.values())
        self.last_step_share = {phase: (seconds[phase] / total if total else 0.0) for phase in PHASES}

    def prefill_seconds_per_token(self) -> float | None:
        """Measured cost of computing one prompt token (prefill and recompute together);
        None before any has been computed."""
        tokens = self.tokens["prefill"] + self.tokens["recompute"]
        return (self.seconds["prefill"] + self.seconds["recompute"]) / tokens if tokens else None

    def snapshot(self) -> PhaseCounters:
        return PhaseCounters(
            dict(self.seconds),
            dict(self.tokens),
            self.steps,
            self.mixed_steps,
            self.step_seconds,
            dict(self.last_step_share),
        )


class StepClock:
    """Consecutive timed segments of one step, each credited to phases."""

    def __init__(self, now: float) -> None:
        self.start = self.mark = now
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.tokens = dict.fromkeys(PHASES[:3], 0)

    def lap(self, now: float, shares: dict[str, float] | None = None, phase: str = "schedule") -> None:
        """Credit the time since the last lap to `phase`, or split it by `shares` (counts)."""
        elapsed, self.mark = now - self.mark, now
        total = sum(shares.values()) if shares else 0
        if not total:
            self.seconds[phase] += elapsed
            return
        for name, count in shares.items():
            self.seconds[name] += elapsed * count / total

    def move(self, seconds: float, source: str, target: str) -> None:
        """Re-credit `seconds` of a finished lap from `source` to `target` (a swap timed inside
        the scheduling segment)."""
        seconds = min(seconds, self.seconds[source])
        self.seconds[source] -= seconds
        self.seconds[target] += seconds
