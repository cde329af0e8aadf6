"""Membership inference: was this text in the model's training set?

An attack gives each candidate example a score, higher meaning "member"; sweeping a threshold
over the scores of known members and non-members traces the ROC curve. It is summarised by its
area (AUC: 0.5 is guessing) and, as Carlini et al. 2022 argue, by the true-positive rate at a
low false-positive rate (here 1%): an attack that is confident about a few examples leaks them
even when its AUC is modest. Three attacks, from cheapest to strongest:

- loss threshold (Yeom et al. 2018): score = -loss(x); members were fitted, so their loss is low;
- reference-calibrated (Watson et al. 2022, "difficulty calibration"; Carlini et al. 2021's
  comparison with a reference model): score = loss_ref(x) - loss(x), where the reference model
  was trained the same way on other data, so what is merely easy text is discounted;
- LiRA, the likelihood-ratio attack (Carlini et al. 2022): shadow models trained on random halves
  of the candidates give, for each example, the distribution of its (logit-scaled) confidence
  when it was IN the training set and when it was OUT; the score is the log-likelihood ratio of
  the target model's confidence under the two Gaussians fitted to them (online), or, with OUT
  models only, how far above the OUT distribution it lies (offline). With few shadows the
  variance is shared over examples (the paper's advice for small shadow counts).

An example's loss is its mean next-token cross-entropy; LiRA's confidence is p = exp(-loss),
scaled to log(p / (1 - p)).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ..jsonl import json_objects
from ..train.losses import IGNORE_INDEX


class MembershipError(ValueError):
    """Membership-inference inputs that cannot be used as given."""


# ------------------------------------------------------------------------------ scoring
@torch.no_grad()
def sequence_losses(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]] | torch.Tensor, batch_size: int = 32
) -> np.ndarray:
    """Each sequence's mean next-token cross-entropy under `model` (a causal genforge
    Transformer, put in eval mode for the call): (n,). Sequences of different lengths are
    right-padded; a causal model never attends to the padding, and padded targets are ignored."""
    rows = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sequences]
    if not rows:
        raise MembershipError("no sequences to score")
    short = [i for i, row in enumerate(rows) if row.numel() < 2]
    if short:
        raise MembershipError(f"sequence {short[0]} has fewer than 2 tokens, so there is no next token to score")
    limit = model.config.max_position_embeddings
    too_long = [i for i, row in enumerate(rows) if row.numel() > limit]
    if too_long:
        raise MembershipError(
            f"sequence {too_long[0]} has {rows[too_long[0]].numel()} tokens, more than the model's {limit} positions"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(row.numel() for row in chunk)
            inputs = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for i, row in enumerate(chunk):
                inputs[i, : row.numel()] = row
                labels[i, : row.numel()] = row
            logits = model(inputs.to(device)).logits.float()
            targets = labels[:, 1:].to(device)
            token_losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
            )
            counted = (targets != IGNORE_INDEX).sum(dim=1)
            out.append((token_losses.sum(dim=1) / counted).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).double().numpy()


def loss_attack_scores(losses: np.ndarray) -> np.ndarray:
    """Yeom et al. 2018: the lower the loss, the likelier a member."""
    return -np.asarray(losses, dtype=np.float64)


def reference_attack_scores(losses: np.ndarray, reference_losses: np.ndarray) -> np.ndarray:
    """Difficulty calibration: how much lower the target's loss is than a reference model's.
    Several reference models (rows of a 2-D array) are averaged."""
    losses = np.asarray(losses, dtype=np.float64)
    reference = np.asarray(reference_losses, dtype=np.float64)
    if reference.ndim == 2:
        reference = reference.mean(axis=0)
    if reference.shape != losses.shape:
        raise MembershipError(f"{reference.shape} reference losses for {losses.shape} target losses")
    return reference - losses


def logit_confidence(losses: np.ndarray) -> np.ndarray:
    """LiRA's statistic: log(p / (1 - p)) of p = exp(-loss), computed stably."""
    losses = np.maximum(np.asarray(losses, dtype=np.float64), 1e-12)
    return -losses - np.log(-np.expm1(-losses))


def lira_scores(
    target_losses: np.ndarray,
    shadow_losses: np.ndarray,
    shadow_in: np.ndarray | None = None,
    global_variance: bool = True,
) -> np.ndarray:
    """LiRA scores (see the module doc). `shadow_losses` is (shadows, examples); `shadow_in`
    marks which shadow trained on which example (same shape): online LiRA, which needs for every
    example at least one IN and one OUT shadow. Without it every shadow is OUT (offline LiRA)."""
    target = logit_confidence(target_losses)
    shadow = logit_confidence(shadow_losses)
    if shadow.ndim != 2 or shadow.shape[1] != target.shape[0]:
        raise MembershipError(
            f"shadow losses must be (shadows, {target.shape[0]} examples), got {tuple(np.shape(shadow_losses))}"
        )
    if shadow_in is None:
        if shadow.shape[0] < 2:
            raise MembershipError("offline LiRA needs at least 2 OUT shadow models to fit a variance")
        mean_out = shadow.mean(axis=0)
        std_out = _spread(shadow - mean_out, shadow.std(axis=0, ddof=1), global_variance)
        return stats.norm.logcdf((target - mean_out) / std_out)
    inside = np.asarray(shadow_in, dtype=bool)
    if inside.shape != shadow.shape:
        raise MembershipError(f"shadow_in has shape {inside.shape}; expected {shadow.shape}")
    counts_in, counts_out = inside.sum(axis=0), (~inside).sum(axis=0)
    if counts_in.min() < 1 or counts_out.min() < 1:
        raise MembershipError("online LiRA needs every example IN at least one shadow and OUT of at least one")
    mean_in = np.where(inside, shadow, 0).sum(axis=0) / counts_in
    mean_out = np.where(~inside, shadow, 0).sum(axis=0) / counts_out
    residual_in = np.where(inside, shadow - mean_in, np.nan)
    residual_out = np.where(~inside, shadow - mean_out, np.nan)
    std_in = _spread(residual_in, np.nanstd(residual_in, axis=0), global_variance)
    std_out = _spread(residual_out, np.nanstd(residual_out, axis=0), global_variance)
    return stats.norm.logpdf(target, mean_in, std_in) - stats.norm.logpdf(target, mean_out, std_out)


def _spread(residuals: np.ndarray, per_example: np.ndarray, global_variance: bool) -> np.ndarray | float:
    """A standard deviation: one over all examples' residuals, or each example's own (floored)."""
    if global_variance:
        return max(float(np.nanstd(residuals)), 1e-6)
    return np.maximum(per_example, 1e-6)


# ------------------------------------------------------------------------------ evaluation
def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) as the threshold falls past each distinct
    score, from (0, 0) to (1, 1); ties move both rates at once."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(is_member, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise MembershipError(f"scores {scores.shape} and labels {labels.shape} must be two equal 1-D arrays")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise MembershipError(f"the ROC needs members and non-members; got {positives} and {negatives}")
    if not np.all(np.isfinite(scores)):
        scores = np.nan_to_num(scores, nan=-np.inf)
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(ordered)), ordered.size - 1]  # last index of each score
    tp = np.cumsum(hits)[distinct]
    fp = (distinct + 1) - tp
    return np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives]


def area_under_curve(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under an ROC curve."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float = 0.01) -> float:
    """The highest true-positive rate at a threshold whose false-positive rate is <= max_fpr."""
    allowed = fpr <= max_fpr
    return float(tpr[allowed].max()) if allowed.any() else 0.0


@dataclass
class AttackResult:
    """One attack's ROC summary on one model."""

    attack: str
    auc: float
    tpr_at_1pct_fpr: float
    members: int
    non_members: int
    fpr: np.ndarray
    tpr: np.ndarray

    def to_json(self) -> dict:
        return {
            "attack": self.attack,
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "members": self.members,
            "non_members": self.non_members,
        }


def evaluate_attack(attack: str, scores: np.ndarray, is_member: np.ndarray) -> AttackResult:
    fpr, tpr = roc_curve(scores, is_member)
    labels = np.asarray(is_member, dtype=bool)
    return AttackResult(
        attack=attack,
        auc=area_under_curve(fpr, tpr),
        tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, 0.01),
        members=int(labels.sum()),
        non_members=int((~labels).sum()),
        fpr=fpr,
        tpr=tpr,
    )


def plot_roc(curves: dict[str, AttackResult], path: str | Path, title: str = "membership inference") -> Path:
    """ROC curves on log-log axes (where low false-positive rates are visible), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..atomic import atomic_path

    figure = Figure(figsize=(6, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    floor = 1e-3
    for label, result in curves.items():
        axes.plot(
            np.maximum(result.fpr, floor),
            np.maximum(result.tpr, floor),
            label=f"{label} (AUC {result.auc:.3f}, TPR@1% {result.tpr_at_1pct_fpr:.1%})",
        )
    axes.plot([floor, 1], [floor, 1], linestyle="--", color="grey", label="chance")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(floor, 1)
    axes.set_ylim(floor, 1)
    axes.set_xlabel("false-positive rate")
    axes.set_ylabel("true-positive rate")
    axes.set_title(title)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


# ------------------------------------------------------------------------------ files and models
def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Candidate examples from a file: JSONL (the `text_field` of each object) or plain text,
    one example per non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise MembershipError(f"{path} does not exist")
    with open(path, encoding="utf-8") as handle:
        if path.suffix == ".jsonl":
            texts = []
            for number, record in json_objects(handle, str(path), MembershipError):
                value = record.get(text_field)
                if not isinstance(value, str):
                    raise MembershipError(f"{path}:{number} has no string field {text_field!r}")
                texts.append(value)
        else:
            texts = [line.rstrip("\n") for line in handle if line.strip()]
    if not texts:
        raise MembershipError(f"{path} holds no examples")
    return texts


def membership_inference(
    model_dir: str | Path,
    members: Sequence[str],
    non_members: Sequence[str],
    reference_dirs: Sequence[str | Path] = (),
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[str, AttackResult]:
    """Run the attacks on a model directory: the loss attack; with one or more reference models
    (trained like the target on other data) the calibrated attack; with two or more, offline
    LiRA with the references as OUT shadows. Texts are tokenized with the model's tokenizer and
    cut to its context."""
    from ..checkpoint import load_model
    from ..tokenizer import Tokenizer

    if not members or not non_members:
        raise MembershipError("membership inference needs both members and non-members")
    for directory in [model_dir, *reference_dirs]:
        if not (Path(directory) / "config.json").is_file():
            raise MembershipError(f"{directory} is not a model directory (no config.json)")
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, dtype=torch.float32, device=device)
    if not model.config.causal or model.lm_head is None:
        raise MembershipError(f"{model_dir} is not a causal language model; these attacks score next-token losses")
    limit = model.config.max_position_embeddings
    sequences = [ids[:limit] for ids in tokenizer.encode_batch(list(members) + list(non_members))]
    labels = np.r_[np.ones(len(members), dtype=bool), np.zeros(len(non_members), dtype=bool)]
    losses = sequence_losses(model, sequences, batch_size)
    results = {"loss": evaluate_attack("loss", loss_attack_scores(losses), labels)}
    if reference_dirs:
        reference = np.stack(
            [
                sequence_losses(load_model(d, dtype=torch.float32, device=device), sequences, batch_size)
                for d in reference_dirs
            ]
        )
        results["reference"] = evaluate_attack("reference", reference_attack_scores(losses, reference), labels)
        if len(reference_dirs) >= 2:
            results["lira_offline"] = evaluate_attack("lira_offline", lira_scores(losses, reference), labels)
    return results


def results_json(results: dict[str, AttackResult]) -> str:
    return json.dumps({name: result.to_json() for name, result in results.items()}, indent=2)


__all__ = [
    "AttackResult",
    "MembershipError",
    "area_under_curve",
    "evaluate_attack",
    "lira_scores",
    "logit_confidence",
    "loss_attack_scores",
    "membership_inference",
    "plot_roc",
    "read_texts",
    "reference_attack_scores",
    "results_json",
    "roc_curve",
    "sequence_losses",
    "tpr_at_fpr",
]
