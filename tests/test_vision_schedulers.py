"""genforge's DDPM and DDIM schedulers against diffusers' on the same configurations and inputs."""

from __future__ import annotations

import pytest
import torch

from genforge.vision.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    ScheduleConfig,
    SchedulerConfigError,
    spaced_timesteps,
)

diffusers = pytest.importorskip("diffusers")

# Tiny models are all per-op overhead: one intra-op thread is faster (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-6

CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", timestep_spacing="linspace", clip_sample=False),
    dict(beta_schedule="linear", timestep_spacing="leading", steps_offset=1, clip_sample_range=0.5),
    dict(beta_schedule="linear", num_train_timesteps=200, timestep_spacing="trailing"),
]
# diffusers' DDIMScheduler has no sigmoid betas; its DDPMScheduler does.
DDPM_CONFIGS = CONFIGS + [dict(beta_schedule="sigmoid", beta_end=0.03)]
VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]


def _inputs(shape=(3, 2, 5, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) for _ in range(3))


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("settings", DDPM_CONFIGS)
def test_betas_add_noise_and_velocity_match_diffusers(settings):
    ours = DDPMScheduler(**settings)
    theirs = diffusers.DDPMScheduler(**settings)
    _close(ours.betas, theirs.betas)
    _close(ours.alphas_cumprod, theirs.alphas_cumprod)
    original, noise, _ = _inputs()
    steps = torch.tensor([0, ours.num_train_timesteps // 2, ours.num_train_timesteps - 1])
    _close(ours.add_noise(original, noise, steps), theirs.add_noise(original, noise, steps))
    _close(ours.velocity(original, noise, steps), theirs.get_velocity(original, noise, steps))


@pytest.mark.parametrize("settings", CONFIGS)
@pytest.mark.parametrize("count", [1, 7, 50])
def test_set_timesteps_matches_diffusers(settings, count):
    for ours, theirs in (
        (DDPMScheduler(**settings), diffusers.DDPMScheduler(**settings)),
        (DDIMScheduler(**settings), diffusers.DDIMScheduler(**settings)),
    ):
        ours.set_timesteps(count)
        theirs.set_timesteps(count)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist()


@pytest.mark.parametrize("settings", DDPM_CONFIGS)
@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("count", [None, 10])
def test_ddpm_step_matches_diffusers(settings, variance_type, count):
    ours = DDPMScheduler(**settings, variance_type=variance_type)
    theirs = diffusers.DDPMScheduler(**settings, variance_type=variance_type)
    if count is not None:
        ours.set_timesteps(count)
        theirs.set_timesteps(count)
    sample, model_output, _ = _inputs()
    if variance_type == "learned_range":
        model_output = torch.cat([model_output, torch.rand_like(model_output) * 2 - 1], dim=1)
    for timestep in ours.timesteps[:: max(1, len(ours.timesteps) // 5)].tolist() + [int(ours.timesteps[-1])]:
        expected = theirs.step(model_output, timestep, sample, generator=torch.Generator().manual_seed(timestep))
        got = ours.step(model_output, timestep, sample, generator=torch.Generator().manual_seed(timestep))
        _close(got, expected.prev_sample)


@pytest.mark.parametrize("settings", CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("count", [10, 25])
def test_ddim_step_matches_diffusers(settings, eta, count):
    ours = DDIMScheduler(**settings)
    theirs = diffusers.DDIMScheduler(**settings)
    ours.set_timesteps(count)
    theirs.set_timesteps(count)
    sample, model_output, noise = _inputs()
    for timestep in ours.timesteps.tolist():
        expected = theirs.step(model_output, timestep, sample, eta=eta, variance_noise=noise).prev_sample
        _close(ours.step(model_output, timestep, sample, eta=eta, noise=noise), expected)
    timestep = int(ours.timesteps[0])
    expected = theirs.step(
        model_output,
        timestep,
        sample,
        eta=eta,
        use_clipped_model_output=True,
        generator=torch.Generator().manual_seed(3),
    )
    got = ours.step(
        model_output,
        timestep,
        sample,
        eta=eta,
        use_clipped_model_output=True,
        generator=torch.Generator().manual_seed(3),
    )
    _close(got, expected.prev_sample)


def test_full_ddpm_chain_matches_diffusers():
    """Ten ancestral steps in a row with a fixed 'model' keep matching (errors do not grow)."""
    ours, theirs = (
        DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
    )
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    mine, _, _ = _inputs()
    reference = mine.clone()
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for timestep in ours.timesteps.tolist():
        mine = ours.step(0.3 * mine, timestep, mine, generator=gen_a)
        reference = theirs.step(0.3 * reference, timestep, reference, generator=gen_b).prev_sample
    _close(mine, reference)


def test_bad_settings_are_refused_with_the_accepted_values():
    with pytest.raises(SchedulerConfigError, match="squaredcos_cap_v2"):
        ScheduleConfig(beta_schedule="cosine")
    with pytest.raises(SchedulerConfigError, match="between 1 and"):
        spaced_timesteps(ScheduleConfig(num_train_timesteps=10), 11)
    with pytest.raises(SchedulerConfigError, match="thresholding"):
        ScheduleConfig.from_dict({"thresholding": True})
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(torch.zeros(1, 1, 2, 2), 999, torch.zeros(1, 1, 2, 2))


def test_from_dict_reads_a_diffusers_scheduler_config():
    theirs = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    ours = DDIMScheduler(ScheduleConfig.from_dict(dict(theirs.config)))
    assert ours.config.beta_schedule == "squaredcos_cap_v2" and ours.config.timestep_spacing == "trailing"
