"""Noise schedules and reverse steps of denoising diffusion: DDPM and DDIM.

The forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") adds Gaussian
noise in `T` steps with variances `beta_t`; with `alpha_bar_t = prod(1 - beta_s, s <= t)` a noisy
sample at any step is drawn in one go, `x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`
(`add_noise`). A network predicts `eps` (or `x_0`, or the velocity `v = sqrt(alpha_bar) eps -
sqrt(1 - alpha_bar) x_0` of Salimans & Ho 2022) and the reverse step turns the prediction into
`x_{t-1}`:

- `DDPMScheduler.step`: the ancestral step, the posterior `q(x_{t-1} | x_t, x_0)` with `x_0`
  predicted, plus noise of the chosen variance (`fixed_small` is the posterior variance
  `beta~_t`, `fixed_large` is `beta_t`; `learned_range` interpolates them in log space by the
  network's second output, as in Nichol & Dhariwal 2021, "Improved DDPM").
- `DDIMScheduler.step`: Song et al. 2021, "Denoising Diffusion Implicit Models": the same
  marginals from a non-Markovian process, so sampling can skip steps; `eta` = 0 is
  deterministic, `eta` = 1 puts back DDPM's noise.

Betas are `linear` (Ho et al.: 1e-4 to 0.02), `scaled_linear` (linear in sqrt(beta), as Stable
Diffusion's latents use), `squaredcos_cap_v2` (the cosine schedule of Nichol & Dhariwal 2021,
`alpha_bar(t) = cos^2((t/T + 0.008) / 1.008 * pi/2)`, betas capped at 0.999) or `sigmoid`.
Inference timesteps are spaced `leading`, `trailing` or `linspace` (Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", Table 2). The arithmetic follows
diffusers' `DDPMScheduler` / `DDIMScheduler` configuration fields and float32 order of
operations, so the same configuration gives the same numbers (tested within 1e-6).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class SchedulerConfigError(ValueError):
    """A scheduler setting genforge does not accept; the message lists what is accepted."""


@dataclass(frozen=True)
class ScheduleConfig:
    """Every setting of a noise schedule and its reverse step, named as diffusers names them so
    a saved `scheduler_config.json` reads straight in (`from_dict`)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"  # DDPM only
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM only: alpha_bar of the step before the first

    def __post_init__(self) -> None:
        checks = (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("variance_type", self.variance_type, VARIANCE_TYPES),
        )
        for name, value, accepted in checks:
            if value not in accepted:
                raise SchedulerConfigError(f"{name} {value!r} is not supported; use one of {', '.join(accepted)}")
        if self.num_train_timesteps < 1:
            raise SchedulerConfigError(f"num_train_timesteps must be >= 1, not {self.num_train_timesteps}")

    @classmethod
    def from_dict(cls, values: dict) -> ScheduleConfig:
        """Known fields from a dict (a diffusers `scheduler_config.json`); other keys are ignored,
        and settings genforge does not implement are refused rather than dropped."""
        for name, off in (("thresholding", False), ("rescale_betas_zero_snr", False), ("trained_betas", None)):
            if values.get(name, off) not in (off,):
                raise SchedulerConfigError(f"{name}={values[name]!r} is not supported by genforge's schedulers")
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def to_dict(self) -> dict:
        return asdict(self)


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """The `T` forward-process variances of `config.beta_schedule`, float32."""
    steps = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, steps, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, steps, dtype=torch.float32) ** 2
    if config.beta_schedule == "sigmoid":
        ramp = torch.linspace(-6, 6, steps)
        return torch.sigmoid(ramp) * (config.beta_end - config.beta_start) + config.beta_start

    # Cosine: betas from the ratio of consecutive alpha_bar values, capped so the last step
    # does not destroy the signal in one go (Nichol & Dhariwal 2021, eq. 17). In float64 Python
    # arithmetic, then float32, as the reference computes it.
    def alpha_bar(fraction: float) -> float:
        return math.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float32)


def spaced_timesteps(config: ScheduleConfig, num_inference_steps: int) -> torch.Tensor:
    """The `num_inference_steps` training timesteps a sampler visits, from noisiest to cleanest."""
    total = config.num_train_timesteps
    if not 1 <= num_inference_steps <= total:
        raise SchedulerConfigError(
            f"num_inference_steps must be between 1 and num_train_timesteps ({total}), not {num_inference_steps}"
        )
    if config.timestep_spacing == "linspace":
        steps = np.linspace(0, total - 1, num_inference_steps).round()[::-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = total // num_inference_steps
        steps = (np.arange(0, num_inference_steps) * ratio).round()[::-1].astype(np.int64) + config.steps_offset
    else:  # trailing: end exactly at T-1, so sampling starts from pure noise (Lin et al. 2024)
        ratio = total / num_inference_steps
        steps = np.round(np.arange(total, 0, -ratio)).astype(np.int64) - 1
    return torch.from_numpy(steps.copy())


class _NoiseSchedule:
    """The forward process both samplers share: betas, cumulative alphas, `add_noise`, the
    training target for each prediction type, and `x_0` / `eps` recovered from a prediction."""

    def __init__(self, config: ScheduleConfig | None = None, **settings) -> None:
        if config is not None and settings:
            raise SchedulerConfigError("pass either a ScheduleConfig or keyword settings, not both")
        self.config = config if config is not None else ScheduleConfig(**settings)
        self.betas = make_betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.config.num_train_timesteps).flip(0)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        self.timesteps = spaced_timesteps(self.config, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        return self.timesteps

    def _per_sample(self, values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`values[timesteps]`, shaped to broadcast over a batch like `like`."""
        picked = values.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device).long()].flatten()
        return picked.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`, one timestep per sample."""
        alphas_cumprod = self.alphas_cumprod.to(device=original.device, dtype=original.dtype)
        signal = self._per_sample(alphas_cumprod**0.5, timesteps, original)
        noise_scale = self._per_sample((1 - alphas_cumprod) ** 0.5, timesteps, original)
        return signal * original + noise_scale * noise

    def velocity(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0` (Salimans & Ho 2022)."""
        alphas_cumprod = self.alphas_cumprod.to(device=original.device, dtype=original.dtype)
        signal = self._per_sample(alphas_cumprod**0.5, timesteps, original)
        noise_scale = self._per_sample((1 - alphas_cumprod) ** 0.5, timesteps, original)
        return signal * noise - noise_scale * original

    def training_target(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network learns to output at `x_t` for this schedule's prediction type."""
        if self.config.prediction_type == "epsilon":
            return noise
        if self.config.prediction_type == "sample":
            return original
        return self.velocity(original, noise, timesteps)

    def _original_and_noise(
        self, model_output: torch.Tensor, sample: torch.Tensor, alpha_prod: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The predicted clean sample `x_0` and noise `eps` behind `x_t` = `sample`."""
        beta_prod = 1 - alpha_prod
        kind = self.config.prediction_type
        if kind == "epsilon":
            original = (sample - beta_prod**0.5 * model_output) / alpha_prod**0.5
            noise = model_output
        elif kind == "sample":
            original = model_output
            noise = (sample - alpha_prod**0.5 * original) / beta_prod**0.5
        else:
            original = alpha_prod**0.5 * sample - beta_prod**0.5 * model_output
            noise = alpha_prod**0.5 * model_output + beta_prod**0.5 * sample
        return original, noise

    def _clip(self, original: torch.Tensor) -> torch.Tensor:
        if self.config.clip_sample:
            bound = self.config.clip_sample_range
            return original.clamp(-bound, bound)
        return original


def _step_noise(shape, like: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None):
    """The Gaussian noise a stochastic step adds: the caller's, or drawn from `generator` (drawn
    as `torch.randn(shape, generator=...)`, so a seeded generator gives the reference's draw)."""
    if noise is not None:
        if noise.shape != like.shape:
            raise ValueError(f"step noise has shape {tuple(noise.shape)}; the sample has {tuple(like.shape)}")
        return noise.to(device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


class DDPMScheduler(_NoiseSchedule):
    """Ancestral sampling of Ho et al. 2020, over all training steps or a spaced subset."""

    def previous_timestep(self, timestep: int) -> int:
        """The step after `timestep` in the sampling order (-1 after the last)."""
        if self.num_inference_steps is None:
            return int(timestep) - 1
        position = (self.timesteps == int(timestep)).nonzero()
        if len(position) == 0:
            raise ValueError(f"timestep {timestep} is not among this scheduler's timesteps; call set_timesteps first")
        index = int(position[0, 0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def _alpha_prods(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        previous = self.previous_timestep(timestep)
        alpha_prod = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[previous] if previous >= 0 else torch.tensor(1.0)
        return alpha_prod, alpha_prod_prev, previous

    def variance(self, timestep: int, predicted_variance: torch.Tensor | None = None) -> torch.Tensor:
        """The reverse step's noise scale in the form `step` uses it (a variance, a standard
        deviation for the `_log` kinds, a log-variance for `learned_range`)."""
        alpha_prod, alpha_prod_prev, _ = self._alpha_prods(timestep)
        beta = 1 - alpha_prod / alpha_prod_prev
        # The posterior variance beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t,
        # floored so its log stays finite at t = 0.
        posterior = torch.clamp((1 - alpha_prod_prev) / (1 - alpha_prod) * beta, min=1e-20)
        kind = self.config.variance_type
        if kind == "fixed_small":
            return posterior
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(posterior))
        if kind == "fixed_large":
            return beta
        if kind == "fixed_large_log":
            return torch.log(beta)
        if predicted_variance is None:
            raise ValueError(f"variance_type {kind!r} needs the model's predicted variance (2x output channels)")
        if kind == "learned":
            return predicted_variance
        fraction = (predicted_variance + 1) / 2
        return fraction * torch.log(beta) + (1 - fraction) * torch.log(posterior)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x_{t-1}` from `x_t` = `sample` and the network's output at `timestep`."""
        timestep = int(timestep)
        predicted_variance = None
        if model_output.shape[1] == 2 * sample.shape[1] and self.config.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = model_output.split(sample.shape[1], dim=1)
        alpha_prod, alpha_prod_prev, _ = self._alpha_prods(timestep)
        beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev
        alpha = alpha_prod / alpha_prod_prev
        beta = 1 - alpha
        original, _ = self._original_and_noise(model_output, sample, alpha_prod)
        original = self._clip(original)
        # The posterior mean (Ho et al. eq. 7): a blend of the predicted x_0 and x_t.
        mean = (alpha_prod_prev**0.5 * beta) / beta_prod * original + (alpha**0.5 * beta_prod_prev) / beta_prod * sample
        if timestep <= 0:
            return mean
        drawn = _step_noise(model_output.shape, model_output, generator, noise)
        kind = self.config.variance_type
        scale = self.variance(timestep, predicted_variance)
        if kind == "fixed_small_log":
            return mean + scale * drawn
        if kind == "learned_range":
            return mean + torch.exp(0.5 * scale) * drawn
        return mean + scale**0.5 * drawn


class DDIMScheduler(_NoiseSchedule):
    """DDIM (Song et al. 2021): few deterministic steps (eta = 0) or DDPM-like ones (eta = 1)."""

    def __init__(self, config: ScheduleConfig | None = None, **settings) -> None:
        super().__init__(config, **settings)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x_{t-k}` from `x_t` (Song et al. eq. 12), `k` = T // num_inference_steps."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before DDIM steps")
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM's noise), not {eta}")
        timestep = int(timestep)
        # As the reference does, the previous step is a fixed stride back, whatever the spacing.
        previous = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        beta_prod = 1 - alpha_prod
        original, predicted_noise = self._original_and_noise(model_output, sample, alpha_prod)
        original = self._clip(original)
        variance = ((1 - alpha_prod_prev) / beta_prod) * (1 - alpha_prod / alpha_prod_prev)
        sigma = eta * variance**0.5
        if use_clipped_model_output:
            predicted_noise = (sample - alpha_prod**0.5 * original) / beta_prod**0.5
        direction = (1 - alpha_prod_prev - sigma**2) ** 0.5 * predicted_noise
        previous_sample = alpha_prod_prev**0.5 * original + direction
        if eta > 0:
            previous_sample = previous_sample + sigma * _step_noise(model_output.shape, model_output, generator, noise)
        return previous_sample


SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def make_scheduler(sampler: str, config: ScheduleConfig) -> DDPMScheduler | DDIMScheduler:
    if sampler not in SAMPLERS:
        raise SchedulerConfigError(f"sampler {sampler!r} is not supported; use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler](config)
