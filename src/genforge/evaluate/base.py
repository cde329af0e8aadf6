"""What every metric shares: the result type, the error for bad input, and the checks of a
metric's predictions and references."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class MetricError(ValueError):
    """Bad input to a metric; the message says what was wrong and what is accepted."""


@dataclass(frozen=True)
class MetricResult:
    """One metric over a corpus.

    `score` is the headline number (which one is named in each function's docstring);
    `details` holds every number the metric produced, the headline included; `settings`
    records how it was computed (for sacrebleu metrics, its `signature` string).
    """

    name: str
    score: float
    details: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return self.details[key]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score, "details": dict(self.details), "settings": dict(self.settings)}


def check_predictions(predictions: Sequence[str], metric: str) -> list[str]:
    """The predictions as a non-empty list of strings; `metric` names the caller in errors."""
    if isinstance(predictions, str):
        raise MetricError(f"{metric}: predictions must be a list of strings, got a single string; wrap it in a list")
    predictions = list(predictions)
    if not predictions:
        raise MetricError(f"{metric}: the prediction list is empty; pass at least one prediction")
    bad = next((i for i, p in enumerate(predictions) if not isinstance(p, str)), None)
    if bad is not None:
        kind = type(predictions[bad]).__name__
        raise MetricError(f"{metric}: prediction {bad} is a {kind}; predictions must be strings")
    return predictions


def check_pairs(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]] | None, metric: str
) -> tuple[list[str], list[list[str]]]:
    """(predictions, references as one non-empty list of strings per prediction)."""
    predictions = check_predictions(predictions, metric)
    if references is None:
        raise MetricError(
            f"{metric} compares against references; pass one reference (or a list of them) per prediction"
        )
    if isinstance(references, str):
        raise MetricError(f"{metric}: references must be a list (one entry per prediction), got a single string")
    references = list(references)
    if len(references) != len(predictions):
        raise MetricError(
            f"{metric}: {len(predictions)} predictions but {len(references)} references; pass exactly one reference "
            "(a string, or a list of strings for several references) per prediction"
        )
    grouped: list[list[str]] = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs) if isinstance(refs, Sequence) else None
        if refs is None or not all(isinstance(r, str) for r in refs):
            raise MetricError(
                f"{metric}: reference {i} must be a string or a list of strings, got {references[i]!r:.80}"
            )
        if not refs:
            raise MetricError(f"{metric}: prediction {i} has an empty list of references; give it at least one")
        grouped.append(refs)
    return predictions, grouped


__all__ = ["MetricError", "MetricResult", "check_pairs", "check_predictions"]
