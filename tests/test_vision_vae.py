"""genforge.vision.vae: shapes, the ELBO's terms against torch.distributions, training lowers the
loss, a saved VAE reloads to identical outputs, and bad input is refused."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from genforge.vision.data import resize
from genforge.vision.vae import (
    ConvVAE,
    VAEConfig,
    VAETraining,
    held_out_negative_elbo,
    interpolate,
    load_vae,
    train_command,
    train_vae,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [8, 16, 32])
def test_encode_decode_shapes_on_a_latent_grid(size):
    model = ConvVAE(VAEConfig(size=size, latent_channels=3, hidden=8)).eval()
    images = torch.rand(5, 1, size, size)
    latents = model.encode(images)
    assert latents.shape == (5, 3, size // 4, size // 4) == (5, *model.latent_shape)
    decoded = model.decode(latents)
    assert decoded.shape == images.shape and 0 <= decoded.min() and decoded.max() <= 1
    assert model.sample(4).shape == (4, 1, size, size)
    assert interpolate(model, images[:2], images[2:4], steps=6).shape == (12, 1, size, size)


def test_elbo_terms_match_torch_distributions():
    torch.manual_seed(0)
    images = torch.rand(4, 1, 8, 8)
    for likelihood in ("bernoulli", "gaussian"):
        model = ConvVAE(VAEConfig(size=8, hidden=8, beta=0.5, likelihood=likelihood, gaussian_sigma=0.2))
        terms = model.negative_elbo(images, generator=torch.Generator().manual_seed(1))
        mu, logvar = model.posterior(images)
        kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
        assert torch.allclose(terms["kl"], kl, atol=1e-4)
        noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
        logits = model.decode_logits(mu + (0.5 * logvar).exp() * noise)
        if likelihood == "bernoulli":
            # Bernoulli's log-probability extended to grey-level targets: the cross-entropy.
            nll = -Bernoulli(logits=logits, validate_args=False).log_prob(images).flatten(1).sum(1)
        else:
            nll = -Normal(torch.sigmoid(logits), 0.2).log_prob(images).flatten(1).sum(1)
        assert torch.allclose(terms["reconstruction"], nll, atol=1e-3)
        assert torch.allclose(terms["loss"], nll + 0.5 * kl, atol=1e-3)


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="multiples of 4"):
        ConvVAE(VAEConfig(size=10))
    with pytest.raises(ValueError, match="likelihood"):
        ConvVAE(VAEConfig(likelihood="poisson"))
    model = ConvVAE(VAEConfig(size=8, hidden=8))
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        model.encode(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="latents must be"):
        model.decode(torch.rand(2, 4, 4, 4))


def test_a_few_epochs_lower_the_loss(digits16):
    images = resize(digits16.train.images[:256], 8)
    training = VAETraining(epochs=4, batch_size=32, lr=1e-2, progress=False)
    _, losses = train_vae(images, VAEConfig(size=8, hidden=8), training)
    assert losses[-1] < losses[0] - 5


def _train_args(out, **overrides):
    values = dict(
        data="digits", out=str(out), size=8, channels=None, labels=None, seed=0, epochs=1, batch_size=128, lr=2e-3,
        beta=1.0, latent_channels=2, hidden=8, likelihood="bernoulli", gaussian_sigma=0.1,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def test_saved_vae_reloads_to_identical_outputs_with_its_figures(tmp_path):
    out = train_command(_train_args(tmp_path / "vae"))
    settings = json.loads((out / "vision.json").read_text())
    assert settings["kind"] == "vae" and settings["model"]["latent_channels"] == 2 and settings["size"] == 8
    assert settings["test"]["negative_elbo"] > 0 and settings["scaling_factor"] > 0
    for figure in ("reconstructions.png", "samples.png", "interpolation.png"):
        assert (out / figure).stat().st_size > 0
    model = load_vae(out)
    again = load_vae(out)
    latents = torch.randn(3, *model.latent_shape)
    assert torch.equal(model.decode(latents), again.decode(latents))
    assert model.scaling_factor == pytest.approx(settings["scaling_factor"])
    with pytest.raises(ValueError, match="not a genforge vision model"):
        load_vae(tmp_path)


@pytest.mark.slow
def test_brief_training_beats_an_untrained_vae_on_the_test_split(digits16):
    train, test = resize(digits16.train.images, 8), resize(digits16.test.images, 8)
    config = VAEConfig(size=8, hidden=16)
    untrained = held_out_negative_elbo(ConvVAE(config), test)
    model, _ = train_vae(train, config, VAETraining(epochs=6, lr=1e-2, progress=False))
    trained = held_out_negative_elbo(model, test)
    # Untrained: about 44 nats per 8x8 image (each pixel near p = 0.5); the grey levels' own
    # entropy (about 26 nats here) is a floor no Bernoulli decoder goes below.
    assert trained["negative_elbo"] < untrained["negative_elbo"] - 10
