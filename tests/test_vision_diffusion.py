"""DDPM training, classifier-free guidance, DDPM/DDIM sampling, latent diffusion and the `ddpm`
vision kind, on tiny UNets."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from genforge.vision import diffusion_cli
from genforge.vision.diffusion import (
    DiffusionModel,
    GuidanceError,
    LatentSpace,
    TrainSettings,
    diffusion_loss,
    guided_prediction,
    load_diffusion_model,
    sample_diffusion,
    save_diffusion_model,
    to_model_space,
    train_diffusion,
)
from genforge.vision.kinds import MODEL_CONFIG
from genforge.vision.schedulers import DDPMScheduler, ScheduleConfig
from genforge.vision.unet import UNet

# Tiny models are all per-op overhead: one intra-op thread is faster (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(classes: int | None = 10, channels: int = 1, size: int = 8) -> UNet:
    torch.manual_seed(0)
    return UNet(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=classes + 1 if classes else None,
    )


SCHEDULE = ScheduleConfig(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")


def test_guidance_batches_both_passes_and_extrapolates():
    model = tiny_unet().eval()
    sample = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([1, 4, 9])
    null = torch.full_like(labels, 10)
    with torch.no_grad():
        conditional = model(sample, 20, labels)
        unconditional = model(sample, 20, null)
        for scale in (0.0, 1.0, 3.0):
            expected = unconditional + scale * (conditional - unconditional)
            assert torch.allclose(guided_prediction(model, sample, 20, labels, scale), expected, atol=1e-5)


def test_loss_is_the_noise_mse_and_drops_labels_to_the_null_class():
    model = tiny_unet()
    schedule = DDPMScheduler(SCHEDULE)
    clean = torch.rand(4, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    seen = []
    hook = model.class_embedding.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    loss = diffusion_loss(model, schedule, clean, labels, cond_drop=0.99999, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert seen[0].tolist() == [10, 10, 10, 10]
    # The same draws by hand: t, noise, then the dropout coin.
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.randint(0, 50, (4,), generator=generator)
    noise = torch.randn(clean.shape, generator=generator)
    expected = F.mse_loss(model(schedule.add_noise(clean, noise, timesteps), timesteps, torch.full((4,), 10)), noise)
    assert torch.isclose(loss, expected, atol=1e-6)


def test_training_lowers_the_loss_and_keeps_an_average(digits16):
    model = tiny_unet()
    images = F.interpolate(digits16.train.images[:128], size=8, mode="area")
    settings = TrainSettings(epochs=3, batch_size=32, learning_rate=3e-3, warmup_steps=2, ema_decay=0.9)
    result = train_diffusion(
        model, DDPMScheduler(SCHEDULE), to_model_space(images), digits16.train.labels[:128], settings
    )
    assert result.steps == 12 and result.losses[-1] < result.losses[0]
    assert result.model is not model
    assert any(not torch.equal(a, b) for a, b in zip(result.model.parameters(), model.parameters()))


def test_ddim_without_noise_is_deterministic_and_ddpm_uses_the_generator():
    model = tiny_unet(classes=None).eval()
    ddim = [
        sample_diffusion(
            model, SCHEDULE, (2, 1, 8, 8), sampler="ddim", steps=5, generator=torch.Generator().manual_seed(s)
        )
        for s in (1, 1)
    ]
    assert torch.equal(ddim[0], ddim[1])
    ddpm = sample_diffusion(model, SCHEDULE, (2, 1, 8, 8), sampler="ddpm", generator=torch.Generator().manual_seed(1))
    assert ddpm.shape == (2, 1, 8, 8) and torch.isfinite(ddpm).all()


def test_guidance_on_an_unconditional_model_is_refused():
    model = tiny_unet(classes=None)
    with pytest.raises(GuidanceError, match="unconditional"):
        sample_diffusion(model, SCHEDULE, (1, 1, 8, 8), guidance=3.0)
    with pytest.raises(GuidanceError, match="class labels"):
        sample_diffusion(tiny_unet(), SCHEDULE, (1, 1, 8, 8), guidance=3.0)
    with pytest.raises(ValueError, match=">= 0"):
        sample_diffusion(tiny_unet(), SCHEDULE, (1, 1, 8, 8), torch.tensor([1]), guidance=-1.0)


class PixelShuffleAutoencoder:
    """A stand-in VAE: 2x2 patches of a 16x16 image become 4 channels of an 8x8 latent (scaled
    by 3, so the latent scale is fitted), and back."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return 3 * F.pixel_unshuffle(images, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents / 3, 2)


def test_latent_space_scales_latents_to_unit_variance_and_decodes_back(digits16):
    space = LatentSpace(PixelShuffleAutoencoder())
    latents = space.fit_scale(digits16.train.images[:64])
    assert latents.shape == (64, 4, 8, 8)
    assert abs(latents.std().item() - 1.0) < 1e-4
    assert torch.allclose(space.decode(latents), digits16.train.images[:64], atol=1e-5)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="digits")
    parser.add_argument("--out")
    diffusion_cli.add_train_arguments(parser)
    return parser


def test_vision_kind_trains_saves_samples_and_refuses_guidance_when_unconditional(tmp_path):
    out = tmp_path / "uncond"
    args = _parser().parse_args(
        [
            "--out",
            str(out),
            "--size",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "512",
            "--width",
            "8",
            "--timesteps",
            "20",
            "--unconditional",
        ]
    )
    assert diffusion_cli.KIND.train(args) == out
    settings = json.loads((out / MODEL_CONFIG).read_text())
    assert settings["kind"] == "ddpm" and settings["class_names"] is None
    images = diffusion_cli.KIND.sample(out, 3, None, 0)
    assert images.shape == (3, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(GuidanceError, match="unconditional diffusion model: --guidance"):
        diffusion_cli.KIND.sample(out, 3, 2.0, 0)


def test_conditional_kind_evaluates_accuracy_per_guidance_scale(tmp_path, monkeypatch, classifier16):
    out = tmp_path / "cond"
    args = _parser().parse_args(
        ["--out", str(out), "--epochs", "1", "--batch-size", "512", "--width", "8", "--timesteps", "20"]
    )
    diffusion_cli.KIND.train(args)
    model = load_diffusion_model(out)
    assert model.is_conditional and model.class_names[3] == "three"
    monkeypatch.setattr(diffusion_cli, "digits_classifier", lambda size: classifier16)
    metrics = diffusion_cli.KIND.evaluate(out, argparse.Namespace(per_class=1, steps=3, guidance_scales=(0.0, 3.0)))
    assert set(metrics) == {"accuracy@guidance=0", "accuracy@guidance=3"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    images = diffusion_cli.sample_images(out, 4, 2.0, 0, sampler="ddpm", steps=4)
    assert images.shape == (4, 1, 16, 16)
    # Through `genforge vision`: a class and guidance are accepted, and eval adds FID and IS.
    from genforge.cli import main

    grid = tmp_path / "sevens.png"
    flags = ["--guidance", "3", "--class", "7", "--sampler", "ddim", "--steps", "3", "--num", "4"]
    assert main(["vision", "sample", "--model", str(out), *flags, "--out", str(grid)]) == 0
    assert grid.is_file()
    monkeypatch.setattr("genforge.vision.metrics.classifier_for", lambda config: classifier16)
    full = diffusion_cli.KIND.evaluate(out, argparse.Namespace(per_class=1, steps=2, guidance_scales=(3.0,), num=20))
    assert {"fid", "inception_score", "conditional_accuracy"} <= set(full)


def test_latent_diffusion_trains_and_samples_through_an_autoencoder(tmp_path, monkeypatch):
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / MODEL_CONFIG).write_text(json.dumps({"kind": "stand-in"}))
    monkeypatch.setitem(diffusion_cli.AUTOENCODER_LOADERS, "stand-in", lambda directory: PixelShuffleAutoencoder())
    out = tmp_path / "latent"
    args = _parser().parse_args(
        [
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "512",
            "--width",
            "8",
            "--timesteps",
            "20",
            "--latent-vae",
            str(vae_dir),
        ]
    )
    diffusion_cli.KIND.train(args)
    model = load_diffusion_model(out)
    assert model.unet.config.in_channels == 4 and model.unet.config.sample_size == 8
    assert model.latent["shape"] == [4, 8, 8] and model.schedule.clip_sample is False
    images = diffusion_cli.KIND.sample(out, 2, 3.0, 0)
    assert images.shape == (2, 1, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_saved_model_round_trips(tmp_path):
    unet = tiny_unet()
    save_diffusion_model(DiffusionModel(unet, SCHEDULE, 8, 1, tuple("abcdefghij")), tmp_path / "m")
    loaded = load_diffusion_model(tmp_path / "m")
    sample = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.unet(sample, 5, torch.tensor([1, 2])), unet.eval()(sample, 5, torch.tensor([1, 2])))
    assert loaded.schedule == SCHEDULE and loaded.class_names == tuple("abcdefghij")
