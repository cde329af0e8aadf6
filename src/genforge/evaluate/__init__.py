"""Evaluation: reference-based text metrics, BERTScore, perplexity, classification and
calibration. See docs/evaluation.md for each metric's definition, settings and the
reference implementation it is checked against."""

from .bertscore import BERTScorer, BERTScoreResult, IdfWeights, bertscore
from .classification import (
    CalibrationBin,
    CalibrationResult,
    calibration_from_confidences,
    classification_metrics,
    expected_calibration_error,
    reliability_diagram,
)
from .metrics import (
    METRICS,
    ROUGE_TYPES,
    MetricError,
    MetricResult,
    bleu,
    chrf,
    compute,
    distinct_n,
    exact_match_score,
    normalize_answer,
    rouge,
    self_bleu,
    squad,
    token_f1_score,
)
from .perplexity import PerplexityResult, perplexity, perplexity_of_text, strided_windows

__all__ = [
    "METRICS", "ROUGE_TYPES", "BERTScoreResult", "BERTScorer", "CalibrationBin", "CalibrationResult", "IdfWeights",
    "MetricError", "MetricResult", "PerplexityResult", "bertscore", "bleu", "calibration_from_confidences", "chrf",
    "classification_metrics", "compute", "distinct_n", "exact_match_score", "expected_calibration_error",
    "normalize_answer", "perplexity", "perplexity_of_text", "reliability_diagram", "rouge", "self_bleu", "squad",
    "strided_windows", "token_f1_score",
]
