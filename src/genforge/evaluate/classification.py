"""Classification metrics and calibration.

- Accuracy, precision, recall, F1 and the Matthews correlation coefficient (Matthews 1975)
  through scikit-learn, whose definitions (averaging, zero-division) are the reference.
- Expected calibration error (Naeini et al. 2015; Guo et al. 2017, "On Calibration of
  Modern Neural Networks"): predictions are put into equal-width confidence bins, and ECE is
  the bin-count-weighted mean gap between each bin's accuracy and its mean confidence.
  A reliability diagram draws the same bins (matplotlib, Agg backend, written to a PNG).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from .base import MetricError, MetricResult

AVERAGES = ("binary", "micro", "macro", "weighted")


def classification_metrics(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    *,
    average: str = "macro",
    labels: Sequence[Any] | None = None,
    pos_label: Any = 1,
) -> MetricResult:
    """Accuracy, precision, recall, F1 and MCC of predicted labels, through scikit-learn.

    `score` is accuracy; `details` has accuracy, precision, recall, f1 and mcc. `average`
    is scikit-learn's: "macro" (default: each class counts equally), "micro", "weighted", or
    "binary" (only the `pos_label` class; two classes only). A class that is never predicted
    has precision 0 (`zero_division=0`) rather than a warning. MCC uses every class
    whatever `average` says; it is 0 for chance level and 1 for perfect prediction.
    """
    from sklearn import metrics as sk  # scikit-learn takes a moment to import: only when asked

    y_true, y_pred = list(y_true), list(y_pred)
    if not y_true:
        raise MetricError("classification_metrics: no labels given; pass at least one (y_true, y_pred) pair")
    if len(y_true) != len(y_pred):
        raise MetricError(
            f"classification_metrics: {len(y_true)} true labels but {len(y_pred)} predicted labels; "
            "pass one prediction per example"
        )
    if average not in AVERAGES:
        raise MetricError(f"classification_metrics: average {average!r} is unknown; accepted: {', '.join(AVERAGES)}")
    try:
        precision, recall, f1, _ = sk.precision_recall_fscore_support(
            y_true, y_pred, average=average, labels=labels, pos_label=pos_label, zero_division=0
        )
        details = {
            "accuracy": float(sk.accuracy_score(y_true, y_pred)),
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "mcc": float(sk.matthews_corrcoef(y_true, y_pred)),
        }
    except ValueError as err:  # e.g. average="binary" on three classes; sklearn's message says which
        raise MetricError(f"classification_metrics: {err}") from err
    settings = {
        "average": average,
        "labels": None if labels is None else list(labels),
        "pos_label": pos_label if average == "binary" else None,
        "zero_division": 0,
    }
    return MetricResult("classification", details["accuracy"], details, settings)


# ------------------------------------------------------------------------------ calibration
@dataclass(frozen=True)
class CalibrationBin:
    """One confidence bin (lower, upper]; accuracy and confidence are None when empty."""

    lower: float
    upper: float
    count: int
    accuracy: float | None
    confidence: float | None


@dataclass(frozen=True)
class CalibrationResult:
    """ECE and MCE (the largest bin gap) over `num_samples` predictions, with the bins."""

    ece: float
    mce: float
    bins: list[CalibrationBin]
    num_samples: int
    settings: dict[str, Any] = field(default_factory=dict)


def calibration_from_confidences(
    confidences: Sequence[float],
    correct: Sequence[bool],
    *,
    n_bins: int = 15,
) -> CalibrationResult:
    """Bin predictions by confidence and measure the calibration gap.

    Bins are equal-width and right-closed, (0, 1/M], (1/M, 2/M], ..., ((M-1)/M, 1], with a
    confidence of exactly 0 in the first. ECE = sum over bins of (n_b / N) *
    |accuracy_b - mean confidence_b|; MCE = the largest such gap over non-empty bins.
    15 bins is Guo et al.'s setting. ECE depends on the bin count: report it with the number.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise MetricError(f"n_bins must be a positive integer, got {n_bins!r}")
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct)
    if conf.ndim != 1 or hits.ndim != 1:
        raise MetricError(f"confidences and correct must be 1-D, got shapes {conf.shape} and {hits.shape}")
    if conf.size == 0:
        raise MetricError("calibration needs at least one prediction; confidences is empty")
    if conf.shape != hits.shape:
        raise MetricError(f"{conf.size} confidences but {hits.size} correctness flags; pass one of each per prediction")
    if not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1:
        raise MetricError("confidences must be probabilities in [0, 1]; got values outside it (logits? apply softmax)")
    if hits.dtype != bool and not np.isin(hits, (0, 1)).all():
        raise MetricError("correct must hold booleans (or 0/1): whether each prediction was right")
    hits = hits.astype(np.float64)

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" makes bins right-closed: a confidence equal to an edge belongs to the bin below it.
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    bins, ece, mce = [], 0.0, 0.0
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        if count == 0:
            bins.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), 0, None, None))
            continue
        accuracy, confidence = float(hits[members].mean()), float(conf[members].mean())
        gap = abs(accuracy - confidence)
        ece += count / conf.size * gap
        mce = max(mce, gap)
        bins.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), count, accuracy, confidence))
    settings = {"n_bins": n_bins, "binning": "equal-width, right-closed", "weights": "bin count"}
    return CalibrationResult(ece, mce, bins, int(conf.size), settings)


def expected_calibration_error(
    probabilities: Sequence[Sequence[float]] | Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    n_bins: int = 15,
) -> CalibrationResult:
    """Top-label ECE (Guo et al. 2017) of predicted class probabilities.

    probabilities: (N, C) rows summing to 1, or (N,) as the probability of class 1 in a
        binary task. The prediction is the most probable class (the lowest index on a tie,
        so p = 0.5 predicts class 0) and its probability is the confidence.
    labels: (N,) true class indices in [0, C).
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise MetricError(f"probabilities must be (N, classes) or (N,) for binary, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise MetricError("probabilities must lie in [0, 1]; got values outside it (logits? apply softmax first)")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        worst = int(np.argmax(np.abs(probs.sum(axis=1) - 1.0)))
        raise MetricError(f"each row of probabilities must sum to 1; row {worst} sums to {probs[worst].sum():.4f}")
    truth = np.asarray(labels)
    if truth.shape != (probs.shape[0],):
        raise MetricError(f"{probs.shape[0]} probability rows but labels of shape {truth.shape}; pass one label each")
    if not np.issubdtype(truth.dtype, np.integer) or truth.min() < 0 or truth.max() >= probs.shape[1]:
        raise MetricError(f"labels must be class indices from 0 to {probs.shape[1] - 1}")
    predicted = probs.argmax(axis=1)
    result = calibration_from_confidences(probs.max(axis=1), predicted == truth, n_bins=n_bins)
    return CalibrationResult(
        result.ece,
        result.mce,
        result.bins,
        result.num_samples,
        result.settings | {"confidence": "top-label (max probability)"},
    )


def reliability_diagram(result: CalibrationResult, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw `result`'s bins as a reliability diagram PNG at `path` and return the path.

    Bars are each bin's accuracy, red outlines the gap to its mean confidence, and the
    diagonal is perfect calibration. Uses matplotlib's Agg canvas directly, so it changes
    no global backend and needs no display. The file is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MetricError(f"reliability_diagram writes PNG; give a path ending in .png, got {str(path)!r}")
    if not path.parent.is_dir():
        raise MetricError(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    filled = [b for b in result.bins if b.count]
    width = result.bins[0].upper - result.bins[0].lower
    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar(
        [b.lower for b in filled],
        [b.accuracy for b in filled],
        width=width,
        align="edge",
        color="#4c72b0",
        edgecolor="black",
        label="accuracy",
    )
    axes.bar(
        [b.lower for b in filled],
        [b.confidence - b.accuracy for b in filled],
        bottom=[b.accuracy for b in filled],
        width=width,
        align="edge",
        color="none",
        edgecolor="#c44e52",
        hatch="//",
        label="gap to confidence",
    )
    axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    axes.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence",
        ylabel="accuracy",
        title=title or f"Reliability diagram (ECE {result.ece:.3f}, {len(result.bins)} bins)",
    )
    axes.legend(loc="upper left")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


__all__ = [
    "CalibrationBin",
    "CalibrationResult",
    "calibration_from_confidences",
    "classification_metrics",
    "expected_calibration_error",
    "reliability_diagram",
]
