"""Differentially private training: DP-SGD (Abadi et al. 2016) and its privacy accountants.

A randomized training algorithm M is (ε, δ)-differentially private when, for any two training
sets D, D' that differ in one example and any set S of outcomes (trained weights),
P[M(D) ∈ S] <= e^ε P[M(D') ∈ S] + δ. DP-SGD makes each optimizer step such a mechanism:

1. Poisson sampling: each training example joins the step's batch independently with
   probability q (the sample rate), so the batch size varies around q * N;
2. per-sample gradients g_i of each example's own loss (`torch.func`: `functional_call` of the
   model under `vmap(grad(...))`), of the trainable parameters only (a LoRA run's adapters);
3. clipping: g_i * min(1, C / ||g_i||), so no example moves the sum by more than C;
4. Gaussian noise: (sum of clipped g_i + N(0, σ² C² I)) / (q N), σ the noise multiplier.

The steps compose; the accountant adds up their privacy loss. `RDPAccountant` uses Rényi DP
(Mironov 2017): the subsampled Gaussian mechanism's RDP at order α, computed exactly at integer
and fractional orders (Mironov, Talwar & Zhang 2019, Section 3.3), summed over steps, and turned
into ε at a given δ by the conversion of Balle et al. 2020 (Theorem 21), minimised over the
orders. `gdp_epsilon` is the cheaper Gaussian-DP estimate (Dong, Roth & Su 2019; Bu et al.
2020): by the central limit theorem the composed mechanism is close to μ-GDP with
μ = q sqrt(T (e^{1/σ²} - 1)); it is an approximation, not an upper bound, and is reported beside
the RDP ε, never instead of it.

`DPSGD` is the trainer's privacy seam (`genforge.train.trainer.GradientPrivacy`): it draws the
Poisson batches, computes the noisy gradient and keeps the accountant, whose history travels in
the trainer's checkpoints so a resumed run reports the ε of all its steps.

The unit of privacy is a training row: a block of `seq_len` tokens in pretraining, one example
in fine-tuning (packing is refused, since a packed row mixes several examples). The noise is
drawn from a generator seeded by (seed, step), so a run resumes exactly; the guarantee then
holds against an adversary who does not know the seed: keep it secret, as a key.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize, special, stats
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..train.losses import IGNORE_INDEX, causal_lm_loss

# Rényi orders searched for the best ε: fine steps near 1 (where small ε is found) and integers
# up to 63 (where large ε is found); the same grid as Opacus's RDP accountant.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
ACCOUNTANTS = ("rdp", "gdp")


class PrivacyError(ValueError):
    """Differential-privacy settings or inputs that cannot be used as given."""


# ------------------------------------------------------------------------------ accounting
def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b) without overflow."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))


def _log_sub(a: float, b: float) -> float:
    """log(e^a - e^b) for a >= b."""
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    if a < b:
        raise PrivacyError("internal: the log of a negative number in the RDP series")
    return a + math.log(-math.expm1(b - a))


def _log_a_integer(q: float, sigma: float, order: int) -> float:
    """log A_α for integer α: the binomial expansion of E_{z~N(0,σ²)}[(1 - q + q e^{(2z-1)/(2σ²)})^α],
    A_α = Σ_k C(α, k) (1-q)^{α-k} q^k exp((k² - k) / (2σ²))."""
    total = -math.inf
    for k in range(order + 1):
        term = (
            math.log(special.binom(order, k))
            + k * math.log(q)
            + (order - k) * math.log1p(-q)
            + (k * k - k) / (2 * sigma**2)
        )
        total = _log_add(total, term)
    return total


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate for large x (erfc underflows there)."""
    return math.log(2) + float(special.log_ndtr(-x * math.sqrt(2)))


def _log_a_fractional(q: float, sigma: float, order: float) -> float:
    """log A_α for fractional α (Mironov, Talwar & Zhang 2019, Section 3.3): the expectation split
    at z0, where the two Gaussians' likelihood ratio crosses, each side a series in the
    generalised binomial coefficients C(α, k), whose signs alternate past α; summed until the
    terms are negligible."""
    positive, negative = -math.inf, -math.inf  # the series' positive and negative parts, in log space
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    k = 0
    while True:
        coefficient = special.binom(order, k)
        log_coefficient = math.log(abs(coefficient))
        j = order - k
        log_t0 = log_coefficient + k * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coefficient + j * math.log(q) + k * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((k - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (k * k - k) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        term = _log_add(log_s0, log_s1)
        if coefficient > 0:
            positive = _log_add(positive, term)
        else:
            negative = _log_add(negative, term)
        if max(log_s0, log_s1) < -30:  # e^-30: far below a float's resolution of the sum
            break
        k += 1
    return _log_sub(positive, negative)


def subsampled_gaussian_rdp(
    sample_rate: float, noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP ε(α) = log(A_α) / (α - 1) of one step of the Poisson-subsampled Gaussian mechanism
    (sensitivity 1, noise N(0, σ²)), at each order α > 1."""
    _check_rate_and_noise(sample_rate, noise_multiplier)
    out = []
    for order in orders:
        if order <= 1:
            raise PrivacyError(f"Rényi orders must be > 1, got {order}")
        if sample_rate == 0:
            out.append(0.0)
        elif noise_multiplier == 0:
            out.append(math.inf)
        elif sample_rate == 1.0:  # no subsampling: the Gaussian mechanism's α / (2σ²)
            out.append(order / (2 * noise_multiplier**2))
        elif float(order).is_integer():
            out.append(_log_a_integer(sample_rate, noise_multiplier, int(order)) / (order - 1))
        else:
            out.append(_log_a_fractional(sample_rate, noise_multiplier, float(order)) / (order - 1))
    return np.asarray(out, dtype=np.float64)


@functools.lru_cache(maxsize=64)
def _cached_rdp(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """One step's RDP, computed once per setting: a run asks for ε after every step."""
    values = subsampled_gaussian_rdp(sample_rate, noise_multiplier, orders)
    values.setflags(write=False)
    return values


def epsilon_from_rdp(rdp: Sequence[float], orders: Sequence[float], delta: float) -> tuple[float, float]:
    """(ε, the order that gave it): the smallest ε over the orders of RDP (α, ε_α) turned into
    (ε, δ)-DP by Balle et al. 2020 (Theorem 21):
    ε = ε_α + log((α - 1) / α) - (log δ + log α) / (α - 1)."""
    _check_delta(delta)
    rdp_values, order_values = np.asarray(rdp, dtype=np.float64), np.asarray(orders, dtype=np.float64)
    if rdp_values.shape != order_values.shape:
        raise PrivacyError(f"{rdp_values.size} RDP values for {order_values.size} orders; give one per order")
    with np.errstate(invalid="ignore", over="ignore"):
        epsilons = (
            rdp_values
            - (math.log(delta) + np.log(order_values)) / (order_values - 1)
            + np.log((order_values - 1) / order_values)
        )
    epsilons = np.where(np.isnan(epsilons), np.inf, epsilons)
    best = int(np.argmin(epsilons))
    return max(0.0, float(epsilons[best])), float(order_values[best])


class RDPAccountant:
    """Rényi-DP accountant of a run's DP-SGD steps: `history` holds
    [noise_multiplier, sample_rate, steps] for each stretch of steps with the same settings."""

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        self.orders = tuple(float(o) for o in orders)
        self.history: list[list[float]] = []

    @property
    def steps(self) -> int:
        return int(sum(steps for _, _, steps in self.history))

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        _check_rate_and_noise(sample_rate, noise_multiplier)
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += steps
        else:
            self.history.append([noise_multiplier, sample_rate, steps])

    def rdp(self) -> np.ndarray:
        total = np.zeros(len(self.orders))
        for noise, rate, steps in self.history:
            total += steps * _cached_rdp(rate, noise, self.orders)
        return total

    def epsilon(self, delta: float) -> float:
        if not self.history:
            return 0.0
        return epsilon_from_rdp(self.rdp(), self.orders, delta)[0]

    def state_dict(self) -> dict:
        return {"kind": "rdp", "orders": list(self.orders), "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("kind") != "rdp" or "history" not in state:
            raise PrivacyError(f"not an RDP accountant's state: {state!r:.200}")
        self.orders = tuple(float(o) for o in state.get("orders", DEFAULT_ORDERS))
        self.history = [[float(n), float(q), int(s)] for n, q, s in state["history"]]


def gdp_mu(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """μ of the central-limit Gaussian-DP approximation of `steps` Poisson-subsampled Gaussian
    steps (Bu, Dong, Long & Su 2020): μ = q sqrt(T (e^{1/σ²} - 1))."""
    _check_rate_and_noise(sample_rate, noise_multiplier)
    if noise_multiplier == 0:
        return math.inf
    return sample_rate * math.sqrt(steps * math.expm1(noise_multiplier**-2))


def delta_of_gdp(mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP (Dong, Roth & Su 2019, Corollary 2.13): Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2)."""
    return float(stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2))


def gdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at `delta` of the Gaussian-DP approximation (an estimate, see the module doc)."""
    _check_delta(delta)
    mu = gdp_mu(noise_multiplier, sample_rate, steps)
    if mu == 0:
        return 0.0
    if not math.isfinite(mu):
        return math.inf
    if delta_of_gdp(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while delta_of_gdp(mu, high) > delta:  # δ(ε) falls with ε: bracket the root
        high *= 2
        if high > 1e6:
            return math.inf
    return float(optimize.brentq(lambda e: delta_of_gdp(mu, e) - delta, 0.0, high, xtol=1e-10))


def noise_multiplier_for_epsilon(
    epsilon: float, delta: float, sample_rate: float, steps: int, orders: Sequence[float] = DEFAULT_ORDERS
) -> float:
    """The smallest noise multiplier whose `steps` steps at `sample_rate` spend at most `epsilon`
    at `delta` by the RDP accountant (bisection; ε falls as σ grows)."""
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise PrivacyError(f"the target epsilon must be a finite number > 0, got {epsilon!r}")

    def spent(sigma: float) -> float:
        return epsilon_from_rdp(steps * subsampled_gaussian_rdp(sample_rate, sigma, orders), orders, delta)[0]

    low, high = 0.0, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise PrivacyError(f"no noise multiplier up to 1e4 reaches epsilon {epsilon} in {steps} steps")
    while high - low > 1e-4 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if spent(middle) > epsilon else (low, middle)
    return high


def _check_rate_and_noise(sample_rate: float, noise_multiplier: float) -> None:
    if not isinstance(sample_rate, (int, float)) or not 0 <= sample_rate <= 1:
        raise PrivacyError(f"the sample rate must be in [0, 1], got {sample_rate!r}")
    if not isinstance(noise_multiplier, (int, float)) or not noise_multiplier >= 0:
        raise PrivacyError(f"the noise multiplier must be a number >= 0, got {noise_multiplier!r}")


def _check_delta(delta: float) -> None:
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")


# ------------------------------------------------------------------------------ the mechanism
def per_sample_gradients(
    model: nn.Module, example_loss: Callable[..., torch.Tensor], batch: Sequence[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradient of each example's loss for each trainable parameter, {name: (batch, *shape)},
    and the losses themselves, (batch,).

    `example_loss(call, *row)` is one example's scalar loss, where `call(*args, **kwargs)` runs
    the model and `row` holds the example's slice of each tensor in `batch` (no batch
    dimension). Frozen parameters and buffers enter as constants, so a LoRA run computes the
    adapters' gradients alone. Tied parameters appear once, with the sum over their uses.
    Randomness (dropout) differs per example, as in an ordinary batch.
    """
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise PrivacyError("the model has no trainable parameters, so there are no gradients to privatise")
    constants = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    constants.update(dict(model.named_buffers()))
    sizes = {int(t.shape[0]) for t in batch}
    if len(sizes) != 1:
        raise PrivacyError(f"the batch's tensors disagree on the number of examples: {sorted(sizes)}")

    def loss_of(params: dict[str, torch.Tensor], *row: torch.Tensor) -> torch.Tensor:
        def call(*args, **kwargs):
            return functional_call(model, (params, constants), args, kwargs)

        return example_loss(call, *row)

    in_dims = (None,) + (0,) * len(batch)
    # SDPA's fused CPU kernels have no batching rule (vmap would loop over the examples); the
    # math kernel is plain matmuls and softmax, which vmap batches.
    with sdpa_kernel(SDPBackend.MATH):
        return vmap(grad_and_value(loss_of), in_dims=in_dims, randomness="different")(trainable, *batch)


def per_sample_norms(gradients: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each example's gradient norm over all parameters: (batch,)."""
    squares = [g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in gradients.values()]
    return torch.stack(squares).sum(dim=0).sqrt()


def clip_and_sum(
    gradients: Mapping[str, torch.Tensor], max_grad_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(sum over the batch of each example's gradient scaled to norm <= max_grad_norm, the norms
    before clipping). The factor is min(1, C / (||g_i|| + 1e-6)), the 1e-6 guarding a zero norm."""
    if not max_grad_norm > 0:
        raise PrivacyError(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
    norms = per_sample_norms(gradients)
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = {name: torch.einsum("b,b...->...", factors.to(g.dtype), g) for name, g in gradients.items()}
    return summed, norms


def add_gaussian_noise(
    summed: Mapping[str, torch.Tensor],
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """(summed + N(0, (σ C)² I)) / expected batch size: the DP-SGD gradient. Dividing by the
    expected size q N, not the drawn size, keeps the batch size itself out of the output."""
    if not expected_batch_size > 0:
        raise PrivacyError(f"the expected batch size must be > 0, got {expected_batch_size!r}")
    std = noise_multiplier * max_grad_norm
    out = {}
    for name, total in summed.items():
        noise = torch.randn(total.shape, generator=generator, dtype=total.dtype, device=generator.device)
        out[name] = (total + std * noise.to(total.device)) / expected_batch_size
    return out


def poisson_sample(size: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """Indices of a Poisson sample of range(size): each index in independently with probability
    `sample_rate` (the batch may be empty, and that is part of the guarantee)."""
    _check_rate_and_noise(sample_rate, 0.0)
    return torch.nonzero(torch.rand(size, generator=generator) < sample_rate).flatten().tolist()


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator for (seed, step, stream): stream 0 draws the batch, 1 the noise."""
    key = ((seed * 1_000_003 + step) * 1_000_003 + stream + 0x5EED) % (2**63)
    return torch.Generator().manual_seed(key)


def causal_example_loss(call, input_ids: torch.Tensor, labels: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
    """One causal-LM example's loss: the mean cross-entropy over its target tokens (0 with none).
    `extra` is the example's document ids when rows are packed."""
    kwargs = {"document_ids": extra[0][None]} if extra else {}
    logits = call(input_ids[None], **kwargs).logits
    total = causal_lm_loss(logits, labels[None], reduction="sum")
    targets = (labels[1:] != IGNORE_INDEX).sum().clamp(min=1)
    return total / targets


# ------------------------------------------------------------------------------ the trainer seam
@dataclass
class DPConfig:
    """DP-SGD settings: noise multiplier σ, the per-example clipping norm C, δ, and the
    accountant whose ε is reported ("rdp"; "gdp" adds the Gaussian-DP estimate beside it)."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"

    def validate(self) -> None:
        if not isinstance(self.noise_multiplier, (int, float)) or not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise PrivacyError(f"the noise multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if not isinstance(self.max_grad_norm, (int, float)) or not (
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0
        ):
            raise PrivacyError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")
        _check_delta(self.delta)
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"accountant {self.accountant!r} is not supported; accepted: {', '.join(ACCOUNTANTS)}")


class DPSGD:
    """DP-SGD in `genforge.train.Trainer` (its `privacy` argument; see the module doc).

    A step draws a Poisson sample of the training rows with rate q = batch_size * grad_accum / N
    (the trainer's batch is the expected size), computes its per-sample gradients `batch_size`
    rows at a time, clips, sums, adds the noise and leaves the result in the parameters' `.grad`
    for the trainer's optimizer; the trainer's global clipping is then skipped (each example is
    already bounded). Each step's metrics carry `epsilon`, the RDP ε at `delta` so far, and
    `batch_examples`, the drawn batch size.
    """

    def __init__(self, config: DPConfig) -> None:
        config.validate()
        self.config = config
        self.accountant = RDPAccountant()
        self.sample_rate: float | None = None
        self.dataset_size: int | None = None

    # The trainer calls these (genforge.train.trainer.GradientPrivacy).
    def check(self, trainer) -> None:
        """Refuse what DP-SGD here does not cover, before any work."""
        train_config = trainer.config
        refused = []
        if trainer.masked:
            refused.append("a masked-LM encoder")
        if trainer.teacher is not None:
            refused.append("knowledge distillation (the teacher's outputs are not clipped)")
        if trainer.objective is not None:
            refused.append("a custom objective")
        if trainer.regularizer is not None:
            refused.append("a regularizer (EWC)")
        if train_config.fsdp:
            refused.append("FSDP")
        if train_config.gradient_checkpointing:
            refused.append("gradient checkpointing")
        if train_config.precision != "fp32":
            refused.append(f"precision {train_config.precision}")
        if getattr(trainer.model.config, "num_experts", 0):
            refused.append("mixture-of-experts routing")
        if getattr(trainer.train_data, "packing", False):
            refused.append("packed rows (an example's privacy needs one example per row; turn packing off)")
        if refused:
            raise PrivacyError(f"DP-SGD does not support {', '.join(refused)}")
        size = len(trainer.train_data)
        expected = train_config.batch_size * train_config.grad_accum
        if expected > size:
            raise PrivacyError(
                f"the expected batch ({expected} rows: batch_size x grad_accum) exceeds the {size} training rows; "
                "use a smaller batch"
            )
        if self.config.delta >= 1 / size:
            raise PrivacyError(
                f"delta {self.config.delta} is not below 1 / {size} training rows: a mechanism that publishes one "
                f"example outright meets it; use delta < {1 / size:.3g}"
            )
        self.dataset_size, self.sample_rate = size, expected / size

    def draw_batches(self, trainer) -> list:
        """This step's Poisson sample in batches of at most `batch_size` rows (none when the
        sample is empty): the same draw on every rank and on resume."""
        generator = step_generator(trainer.config.seed, trainer.step, 0)
        indices = poisson_sample(self.dataset_size, self.sample_rate, generator)
        size = trainer.config.batch_size
        return [trainer.train_data.batch(indices[start : start + size]) for start in range(0, len(indices), size)]

    def backward(self, trainer, batches: list) -> tuple[float, int, dict[str, float]]:
        """Fill `.grad` with the noisy clipped gradient of the step: (mean example loss of the drawn
        batch, its input tokens, metrics)."""
        config, model, device = self.config, trainer.model, trainer.device
        distributed = trainer.distributed
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        summed = {name: torch.zeros_like(p) for name, p in params.items()}
        loss_total, examples, tokens, clipped = 0.0, 0, 0, 0
        for batch in batches:
            rows = _rows(batch)
            tokens += int(rows[0].numel())
            examples += int(rows[0].shape[0])
            mine = [t[distributed.rank :: distributed.world_size].to(device) for t in rows]
            if mine[0].shape[0] == 0:
                continue
            gradients, losses = per_sample_gradients(model, causal_example_loss, mine)
            part, norms = clip_and_sum(gradients, config.max_grad_norm)
            for name in summed:
                summed[name] += part[name]
            clipped += int((norms > config.max_grad_norm).sum())
            loss_total += float(losses.sum())
        if distributed.world_size > 1:
            summed, (loss_total, clipped) = _all_reduce(summed, [loss_total, float(clipped)], device)
        noisy = add_gaussian_noise(
            summed,
            config.noise_multiplier,
            config.max_grad_norm,
            self.sample_rate * self.dataset_size,
            step_generator(trainer.config.seed, trainer.step, 1),
        )
        for name, p in params.items():
            p.grad = noisy[name].to(p.dtype)
        self.accountant.step(config.noise_multiplier, self.sample_rate)
        metrics = {"batch_examples": examples, "clipped_share": clipped / examples if examples else 0.0}
        metrics.update(self.report(brief=True))
        return (loss_total / examples if examples else 0.0), tokens, metrics

    def state_dict(self) -> dict:
        return {
            "accountant_state": self.accountant.state_dict(),
            "sample_rate": self.sample_rate,
            **_as_dict(self.config),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Take a checkpoint's accountant; refuse one from a run with another sample rate or δ (the
        ε would then mix guarantees that do not compose as reported)."""
        if not isinstance(state, Mapping) or "accountant_state" not in state:
            raise PrivacyError("the checkpoint holds no DP-SGD state; it was written by a run without DP-SGD")
        if state.get("delta") != self.config.delta:
            raise PrivacyError(f"the checkpoint's run used delta {state.get('delta')}; resume with the same delta")
        self.accountant.load_state_dict(state["accountant_state"])

    def report(self, brief: bool = False) -> dict:
        """The guarantee so far: ε (RDP) at δ, and the settings it depends on."""
        config, steps = self.config, self.accountant.steps
        out = {"epsilon": self.accountant.epsilon(config.delta)}
        if config.accountant == "gdp" and self.sample_rate is not None:
            out["epsilon_gdp"] = gdp_epsilon(config.noise_multiplier, self.sample_rate, steps, config.delta)
        if brief:
            return out
        return {
            **out,
            "delta": config.delta,
            "noise_multiplier": config.noise_multiplier,
            "max_grad_norm": config.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": steps,
            "accountant": config.accountant,
        }


def _as_dict(config: DPConfig) -> dict:
    return {
        "noise_multiplier": config.noise_multiplier,
        "max_grad_norm": config.max_grad_norm,
        "delta": config.delta,
        "accountant": config.accountant,
    }


def _rows(batch) -> list[torch.Tensor]:
    """(input_ids, labels[, document_ids]) of a batch: a tensor of ids (its own labels) or a
    fine-tuning dict."""
    if isinstance(batch, torch.Tensor):
        return [batch, batch]
    if isinstance(batch, dict):
        rows = [batch["input_ids"], batch["labels"]]
        if batch.get("document_ids") is not None:
            rows.append(batch["document_ids"])
        return rows
    raise PrivacyError(f"DP-SGD trains on tensors of ids or fine-tuning dicts, got a {type(batch).__name__}")


def _all_reduce(
    summed: dict[str, torch.Tensor], numbers: list[float], device: torch.device
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The sum over ranks of every rank's clipped gradients and counters (one flat tensor)."""
    import torch.distributed as dist

    names = list(summed)
    flat = torch.cat([summed[n].flatten() for n in names] + [torch.tensor(numbers, device=device)])
    dist.all_reduce(flat)
    out, offset = {}, 0
    for name in names:
        size = summed[name].numel()
        out[name] = flat[offset : offset + size].view_as(summed[name])
        offset += size
    return out, flat[offset:].tolist()


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "DPConfig",
    "DPSGD",
    "PrivacyError",
    "RDPAccountant",
    "add_gaussian_noise",
    "causal_example_loss",
    "clip_and_sum",
    "delta_of_gdp",
    "epsilon_from_rdp",
    "gdp_epsilon",
    "gdp_mu",
    "noise_multiplier_for_epsilon",
    "per_sample_gradients",
    "per_sample_norms",
    "poisson_sample",
    "step_generator",
    "subsampled_gaussian_rdp",
]
