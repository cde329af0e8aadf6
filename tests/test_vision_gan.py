"""genforge.vision.gan: shapes for each size, the discriminator's losses and penalties against
their formulas, spectral norm, a few steps that train each player, save/load, bad input."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

from genforge.vision.gan import (
    DCGAN,
    GANConfig,
    GANTraining,
    discriminator_loss,
    generator_loss,
    load_gan,
    sample_command,
    train_command,
    train_gan,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("classes", [0, 10])
def test_generator_and_discriminator_shapes(size, classes):
    model = DCGAN(GANConfig(size=size, hidden=8, noise_dim=16, num_classes=classes))
    images = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert images.shape == (6, 1, size, size) and 0 <= images.min() and images.max() <= 1
    labels = torch.arange(6) % 10 if classes else None
    assert model.discriminator(images * 2 - 1, labels).shape == (6,)


def test_bad_sizes_and_labels_are_refused():
    with pytest.raises(ValueError, match=r"4 \* 2\^k"):
        DCGAN(GANConfig(size=12))
    unconditional = DCGAN(GANConfig(size=8, hidden=8))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.sample(2, labels=torch.tensor([1, 2]))
    conditional = DCGAN(GANConfig(size=8, hidden=8, num_classes=10))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        conditional.sample(2, labels=torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="penalty"):
        GANTraining(penalty="gp").check()
    with pytest.raises(ValueError, match="label smoothing"):
        GANTraining(label_smoothing=0.3).check()


class _Linear(nn.Module):
    """D(x) = <w, x>: its gradient in x is w, so the penalties have closed forms."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, images, labels=None):
        return (images.flatten(1) * self.weight).sum(1)


def test_losses_and_penalties_match_their_formulas():
    weight = torch.zeros(4)
    weight[0] = 2.0  # |w| = 2
    critic = _Linear(weight)
    real, fake = torch.rand(8, 1, 2, 2), torch.rand(8, 1, 2, 2)
    real_logits, fake_logits = critic(real), critic(fake)
    bce = nn.functional.binary_cross_entropy_with_logits
    smoothed = bce(real_logits, torch.full((8,), 0.9)) + bce(fake_logits, torch.zeros(8))  # one-sided: fakes stay 0
    plain = GANTraining(label_smoothing=0.9)
    assert discriminator_loss(critic, real, fake, None, plain).item() == pytest.approx(smoothed.item(), rel=1e-5)
    r1 = GANTraining(penalty="r1", penalty_weight=3.0)
    assert discriminator_loss(critic, real.clone(), fake, None, r1).item() == pytest.approx(
        smoothed.item() + 3.0 / 2 * 4.0, rel=1e-5
    )
    gp = GANTraining(penalty="wgan-gp", penalty_weight=10.0)
    wasserstein = fake_logits.mean() - real_logits.mean()
    assert discriminator_loss(critic, real, fake, None, gp).item() == pytest.approx(
        wasserstein.item() + 10.0 * (2 - 1) ** 2, rel=1e-5
    )
    assert generator_loss(critic, fake, None, gp).item() == pytest.approx(-fake_logits.mean().item(), rel=1e-5)
    non_saturating = -nn.functional.logsigmoid(fake_logits).mean()
    assert generator_loss(critic, fake, None, plain).item() == pytest.approx(non_saturating.item(), rel=1e-5)


def test_spectral_norm_keeps_discriminator_weights_near_unit_norm():
    model = DCGAN(GANConfig(size=8, hidden=8))
    images = torch.rand(4, 1, 8, 8)
    for _ in range(30):  # each training-mode forward runs one power iteration
        model.discriminator(images)
    conv = model.discriminator.body[0]
    sigma = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item()
    assert sigma == pytest.approx(1.0, abs=0.05)
    unnormalised = DCGAN(GANConfig(size=8, hidden=8, spectral_norm=False))
    assert not hasattr(unnormalised.discriminator.body[0], "parametrizations")


def test_each_player_lowers_its_loss_against_the_other_frozen(digits16):
    torch.manual_seed(0)
    real = digits16.train.images[:64] * 2 - 1
    labels = digits16.train.labels[:64]
    model = DCGAN(GANConfig(size=16, hidden=8, noise_dim=16, num_classes=10))
    training = GANTraining()
    noise = torch.randn(64, 16)
    fake = model.generator(noise, labels).detach()
    d_optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    d_losses = []
    for _ in range(15):
        loss = discriminator_loss(model.discriminator, real, fake, labels, training)
        d_optimizer.zero_grad()
        loss.backward()
        d_optimizer.step()
        d_losses.append(loss.item())
    assert d_losses[-1] < d_losses[0] - 0.3
    g_optimizer = torch.optim.Adam(model.generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    model.discriminator.eval()  # frozen: no power iteration either
    g_losses = []
    for _ in range(15):
        loss = generator_loss(model.discriminator, model.generator(noise, labels), labels, training)
        g_optimizer.zero_grad()
        loss.backward()
        g_optimizer.step()
        g_losses.append(loss.item())
    assert g_losses[-1] < g_losses[0] - 0.3


def test_train_gan_records_finite_losses_and_keeps_a_moving_average(digits16):
    images = digits16.train.images[:128]
    model, history = train_gan(images, None, GANConfig(hidden=8, noise_dim=16), GANTraining(steps=5, progress=False))
    assert [entry["step"] for entry in history] == [0, 4]
    assert all(math.isfinite(entry["d_loss"]) and math.isfinite(entry["g_loss"]) for entry in history)
    with pytest.raises(ValueError, match="needs labels"):
        train_gan(images, None, GANConfig(hidden=8, num_classes=10), GANTraining(steps=1, progress=False))


def _train_args(out, **overrides):
    values = dict(
        data="digits", out=str(out), size=8, channels=None, labels=None, seed=0, steps=3, batch_size=16, lr=2e-4,
        conditional=True, noise_dim=16, hidden=8, no_spectral_norm=False, label_smoothing=0.9, penalty="r1",
        penalty_weight=1.0, ema_decay=0.9,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def test_saved_gan_reloads_to_identical_samples(tmp_path):
    out = train_command(_train_args(tmp_path / "gan"))
    settings = json.loads((out / "vision.json").read_text())
    assert settings["kind"] == "gan" and settings["conditional"] and settings["model"]["num_classes"] == 10
    assert (out / "samples.png").stat().st_size > 0
    first = sample_command(out, 5, None, seed=3, class_index=7)
    assert torch.equal(first, sample_command(out, 5, None, seed=3, class_index=7))
    model = load_gan(out)
    assert torch.equal(first, model.sample(5, torch.full((5,), 7), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="no guidance"):
        sample_command(out, 5, 3.0, seed=0)
