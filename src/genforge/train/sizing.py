"""Sizing a training run: how big a model, how many tokens, what batch size.

- **Compute-optimal size** (Hoffmann et al. 2022, "Training Compute-Optimal Large Language
  Models", the Chinchilla paper). Training costs C ≈ 6·N·D FLOPs for N parameters and D
  tokens (Kaplan et al. 2020). The paper's third approach fits the final loss as
  L(N, D) = E + A/N^α + B/D^β; minimising it on the curve C = 6·N·D has the closed form
  N_opt = G·(C/6)^a, D_opt = (C/6)^b / G with G = (αA / βB)^(1/(α+β)), a = β/(α+β),
  b = α/(α+β). Its first two approaches give D ≈ 20·N, the rule of thumb.
- **Scaling-law fit**: a power law L(C) = a·C^(−b) (+ an irreducible loss e, optionally)
  fitted with scipy to (compute, loss) points measured over a sweep of small runs, and plotted
  on log-log axes, to extrapolate before spending the large run's compute.
- **Gradient noise scale** (McCandlish et al. 2018, "An Empirical Model of Large-Batch
  Training"). The squared norm of a batch-B gradient estimate has expectation
  |G|² + tr(Σ)/B, with G the true gradient and Σ the per-example gradient covariance.
  Measuring it at two batch sizes gives unbiased estimates of |G|² and tr(Σ) (their
  Appendix A.1), and B_simple = tr(Σ)/|G|² estimates the critical batch size: batches much
  larger than it stop buying proportionally fewer steps.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path


class SizingError(ValueError):
    """Inputs a sizing tool cannot work with; the message says what is accepted."""


# ------------------------------------------------------------------------- Chinchilla
@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta, in nats per token. The defaults are Hoffmann et
    al. 2022's fit (their eq. 10, Approach 3, on MassiveText)."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, parameters: float, tokens: float) -> float:
        _positive(parameters=parameters, tokens=tokens)
        return self.E + self.A / parameters**self.alpha + self.B / tokens**self.beta

    @property
    def exponents(self) -> tuple[float, float]:
        """(a, b) with N_opt ∝ C^a and D_opt ∝ C^b."""
        total = self.alpha + self.beta
        return self.beta / total, self.alpha / total

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising `loss` subject to 6·N·D = flops (the closed form above)."""
        _positive(flops=flops)
        a, b = self.exponents
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        return g * (flops / 6.0) ** a, (flops / 6.0) ** b / g


@dataclass
class ComputePlan:
    flops: float
    parameters: float
    tokens: float
    tokens_per_parameter: float
    predicted_loss: float | None  # nats/token under the fitted law (None for the rule of thumb)
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def training_flops(parameters: float, tokens: float) -> float:
    """C ≈ 6·N·D: two FLOPs per parameter per token forward, four backward (Kaplan et al. 2020)."""
    _positive(parameters=parameters, tokens=tokens)
    return 6.0 * parameters * tokens


def chinchilla_optimal(
    flops: float,
    method: str = "fit",
    tokens_per_parameter: float = 20.0,
    law: ChinchillaLaw | None = None,
) -> ComputePlan:
    """Compute-optimal parameters and tokens for a FLOP budget.

    method "fit": the closed-form minimum of the fitted loss `law` (Approach 3);
    "rule": D = tokens_per_parameter · N with 6·N·D = flops (Approaches 1 and 2, ≈ 20).
    """
    _positive(flops=flops, tokens_per_parameter=tokens_per_parameter)
    law = law or ChinchillaLaw()
    if method == "fit":
        n, d = law.optimal(flops)
        return ComputePlan(flops, n, d, d / n, law.loss(n, d), "fit")
    if method == "rule":
        n = math.sqrt(flops / (6.0 * tokens_per_parameter))
        return ComputePlan(
            flops,
            n,
            tokens_per_parameter * n,
            tokens_per_parameter,
            law.loss(n, tokens_per_parameter * n),
            f"rule ({tokens_per_parameter:g} tokens per parameter)",
        )
    raise SizingError(f"method {method!r} is not supported; accepted: fit, rule")


# ------------------------------------------------------------------- power-law fit
@dataclass
class PowerLawFit:
    """L(C) = a · C^(−b) + e (e = 0 without an irreducible term)."""

    a: float
    b: float
    e: float
    r2: float  # coefficient of determination of log L

    def predict(self, compute) -> np.ndarray:
        return self.a * np.asarray(compute, dtype=float) ** (-self.b) + self.e

    def as_dict(self) -> dict:
        return asdict(self)


def fit_power_law(compute: Sequence[float], loss: Sequence[float], irreducible: bool = False) -> PowerLawFit:
    """Fit L = a·C^(−b) (+ e) to measured points by least squares on log L (scipy's
    `curve_fit`), so each point counts by its relative error whatever its scale. The fit
    without e starts from the exact log-log line; with e it starts there too, with e = 0."""
    from scipy.optimize import curve_fit

    c, losses = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    if c.shape != losses.shape or c.ndim != 1:
        raise SizingError(f"compute and loss must be equal-length lists, got {c.shape} and {losses.shape}")
    needed = 4 if irreducible else 3
    if len(c) < needed:
        raise SizingError(
            f"fitting {'a·C^-b + e' if irreducible else 'a·C^-b'} needs at least {needed} points, got {len(c)}"
        )
    if (c <= 0).any() or (losses <= 0).any() or not (np.isfinite(c).all() and np.isfinite(losses).all()):
        raise SizingError("compute and loss values must be finite and > 0")
    if len(np.unique(c)) < 2:
        raise SizingError("the points need at least two different compute values")
    # Work in units of the smallest compute so the optimiser sees numbers near 1.
    scale = c.min()
    x = np.log(c / scale)
    slope, intercept = np.polyfit(x, np.log(losses), 1)
    if irreducible:

        def model(x, log_a, b, e):
            return np.log(np.exp(log_a - b * x) + e)

        start = (intercept, max(-slope, 1e-3), 0.0)
        bounds = ([-np.inf, 0.0, 0.0], [np.inf, np.inf, float(losses.min())])
        (log_a, b, e), _ = curve_fit(model, x, np.log(losses), p0=start, bounds=bounds, maxfev=20000)
    else:

        def model(x, log_a, b):
            return log_a - b * x

        (log_a, b), _ = curve_fit(model, x, np.log(losses), p0=(intercept, -slope))
        e = 0.0
    # Back to raw compute units: a · (C/scale)^-b = (a · scale^b) · C^-b.
    fit = PowerLawFit(a=float(math.exp(log_a) * scale**b), b=float(b), e=float(e), r2=0.0)
    residual = np.log(losses) - np.log(fit.predict(c))
    spread = np.log(losses) - np.log(losses).mean()
    fit.r2 = float(1.0 - (residual**2).sum() / max((spread**2).sum(), 1e-300))
    return fit


def plot_power_law(
    fit: PowerLawFit,
    compute: Sequence[float],
    loss: Sequence[float],
    path: str | Path,
    extrapolate_to: float | None = None,
) -> Path:
    """The measured points and the fitted curve on log-log axes, written atomically as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = np.asarray(compute, dtype=float)
    high = max(c.max(), extrapolate_to or 0.0)
    grid = np.logspace(np.log10(c.min()), np.log10(high), 200)
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.loglog(c, loss, "o", label="measured")
    label = f"{fit.a:.3g}·C^-{fit.b:.3f}" + (f" + {fit.e:.3g}" if fit.e else "")
    axes.loglog(grid, fit.predict(grid), "-", label=label)
    axes.set_xlabel("training compute C (FLOPs)")
    axes.set_ylabel("loss (nats/token)")
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


def read_points(path: str | Path) -> tuple[list[float], list[float]]:
    """(compute, loss) from a CSV with `compute` and `loss` columns (a header row)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise SizingError(f"no points file at {path}") from None
    if not rows or not {"compute", "loss"} <= set(rows[0]):
        raise SizingError(f"{path} must be a CSV with a header naming 'compute' and 'loss' columns")
    try:
        return [float(r["compute"]) for r in rows], [float(r["loss"]) for r in rows]
    except (TypeError, ValueError) as err:
        raise SizingError(f"{path} has a value that is not a number ({err})") from None


def points_from_runs(run_dirs: Sequence[str | Path]) -> tuple[list[float], list[float]]:
    """(compute, final validation loss) for each finished `genforge pretrain` run directory:
    compute = 6 · parameters (from `model/config.json`) · tokens trained (from `metrics.jsonl`)."""
    from ..checkpoint import read_config

    compute, losses = [], []
    for run in map(Path, run_dirs):
        metrics = run / "metrics.jsonl"
        if not metrics.is_file() or not (run / "model" / "config.json").is_file():
            raise SizingError(f"{run} is not a finished pretrain run (needs metrics.jsonl and model/config.json)")
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evals = [r["val_loss"] for r in records if "val_loss" in r]
        if not evals:
            raise SizingError(f"{run} has no validation loss in metrics.jsonl; train with validation data")
        tokens = sum(r["tokens"] for r in records if "tokens" in r)
        compute.append(training_flops(read_config(run / "model").num_parameters(), tokens))
        losses.append(evals[-1])
    return compute, losses


# --------------------------------------------------------------- gradient noise scale
@dataclass
class NoiseScale:
    gradient_norm_sq: float  # |G|², the squared norm of the true gradient
    trace_covariance: float  # tr(Σ), the summed per-example gradient variance
    critical_batch: float  # B_simple = tr(Σ) / |G|², in examples
    small_batch: int
    big_batch: int
    trials: int

    def as_dict(self) -> dict:
        return asdict(self)


def noise_scale_from_norms(
    small_norm_sq: float, big_norm_sq: float, small_batch: int, big_batch: int
) -> tuple[float, float]:
    """Unbiased (|G|², tr(Σ)) from mean squared gradient norms measured at two batch sizes
    (McCandlish et al. 2018, eqs. A.2-A.3): E|G_B|² = |G|² + tr(Σ)/B, solved for both."""
    if not 0 < small_batch < big_batch:
        raise SizingError(f"need 0 < small_batch < big_batch, got {small_batch} and {big_batch}")
    g2 = (big_batch * big_norm_sq - small_batch * small_norm_sq) / (big_batch - small_batch)
    trace = (small_norm_sq - big_norm_sq) / (1.0 / small_batch - 1.0 / big_batch)
    return g2, trace


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    sample: Callable[[int, torch.Generator], object],
    small_batch: int,
    big_batch: int,
    trials: int = 8,
    seed: int = 0,
) -> NoiseScale:
    """Estimate the critical batch size B_simple of `model` at its current weights.

    Each trial draws an independent batch of each size with `sample(size, generator)`, takes
    the gradient of `loss_fn(model, batch)` (a mean over the batch's examples) and records its
    squared norm. The norms are averaged over trials before the two-size estimator is applied,
    because the ratio tr(Σ)/|G|² of single noisy estimates is badly biased (the paper averages
    the same way). The weights are not changed.
    """
    for name, value in (("small_batch", small_batch), ("big_batch", big_batch), ("trials", trials)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SizingError(f"{name} must be a positive integer, got {value!r}")
    if small_batch >= big_batch:
        raise SizingError(f"small_batch ({small_batch}) must be smaller than big_batch ({big_batch})")
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout: the noise measured is the data's, not dropout's
    norms = {small_batch: [], big_batch: []}
    try:
        for _ in range(trials):
            for size in (small_batch, big_batch):
                loss = loss_fn(model, sample(size, generator))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                norms[size].append(float(sum((g.double() ** 2).sum() for g in grads if g is not None)))
    finally:
        model.train(was_training)
    small_sq, big_sq = float(np.mean(norms[small_batch])), float(np.mean(norms[big_batch]))
    g2, trace = noise_scale_from_norms(small_sq, big_sq, small_batch, big_batch)
    if g2 <= 0:
        raise SizingError(
            f"the estimate of |G|² is not positive ({g2:.3g}): gradient noise swamps the signal at these batch sizes; "
            "use more trials or a larger big_batch"
        )
    return NoiseScale(g2, trace, trace / g2, small_batch, big_batch, trials)


def language_model_noise_scale(
    model, dataset, small_batch: int, big_batch: int, trials: int = 8, seed: int = 0, device: str = "cpu"
) -> NoiseScale:
    """`gradient_noise_scale` for a genforge causal `Transformer` on a `TokenDataset`; batch
    sizes count sequences (multiply by `dataset.seq_len` for tokens)."""
    from .losses import causal_lm_loss

    if not model.config.causal:
        raise SizingError(
            "language_model_noise_scale measures causal models; pass loss_fn and sample to "
            "gradient_noise_scale for others"
        )
    if big_batch > len(dataset):
        raise SizingError(f"big_batch {big_batch} exceeds the {len(dataset)} sequences in the data")
    model.to(device)

    def sample(size, generator):
        rows = torch.randperm(len(dataset), generator=generator)[:size]
        return dataset.batch(rows.tolist()).to(device)

    def loss_fn(model, batch):
        return causal_lm_loss(model(batch).logits, batch)

    return gradient_noise_scale(model, loss_fn, sample, small_batch, big_batch, trials, seed)


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise SizingError(f"{name} must be a finite number > 0, got {value!r}")


__all__ = [
    "ChinchillaLaw",
    "ComputePlan",
    "NoiseScale",
    "PowerLawFit",
    "SizingError",
    "chinchilla_optimal",
    "fit_power_law",
    "gradient_noise_scale",
    "language_model_noise_scale",
    "noise_scale_from_norms",
    "plot_power_law",
    "points_from_runs",
    "read_points",
    "training_flops",
]
