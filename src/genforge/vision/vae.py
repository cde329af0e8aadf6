"""A convolutional variational autoencoder (Kingma & Welling 2014) with a β-weighted KL
(β-VAE, Higgins et al. 2017).

The encoder maps an image to a diagonal Gaussian q(z|x) over a latent *grid* `[C_z, H/4, W/4]`
(4x4x4 for 16x16 digits): a grid rather than a vector so that a latent diffusion model can run
its UNet on it (Rombach et al. 2022). Training maximises the evidence lower bound

    ELBO(x) = E_q[log p(x|z)] - β KL(q(z|x) || N(0, I)),

with z = mu + sigma * eps (the reparameterisation trick) so gradients flow through the sample.
The likelihood p(x|z) is Bernoulli by default: the digits are grey levels in [0, 1], and the
cross-entropy to those levels is the likelihood Kingma & Welling used on MNIST; it is not a
normalised density for non-binary pixels (the continuous Bernoulli, Loaiza-Ganem & Cunningham
2019, would add that constant), so its nats compare models here, not with other papers. A
Gaussian likelihood with a fixed standard deviation (`likelihood="gaussian"`) is the
alternative, a true density on continuous pixels, at the price of blurrier samples when sigma
is large. The reported negative ELBO uses β = 1 (the bound itself), summed over pixels and
latents: nats per image.

For latent diffusion: `ConvVAE.encode(images)` gives the posterior means `[N, C_z, H/4, W/4]`,
`ConvVAE.decode(latents)` images in [0, 1]; multiply latents by `scaling_factor` (1 / their
standard deviation on the training set, as Stable Diffusion's 0.18215) before diffusing and
divide before decoding. `load_vae(model_dir)` reads a trained one.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import save_grid
from .kinds import VisionKind
from .progress import training_progress
from .store import data_settings, read_model_dir, read_settings, save_model_dir, test_split, training_split

LIKELIHOODS = ("bernoulli", "gaussian")


@dataclass
class VAEConfig:
    channels: int = 1
    size: int = 16
    latent_channels: int = 4
    hidden: int = 32
    beta: float = 1.0
    likelihood: str = "bernoulli"
    gaussian_sigma: float = 0.1  # the fixed standard deviation of the Gaussian likelihood

    def check(self) -> None:
        if self.size < 8 or self.size % 4:
            raise ValueError(
                f"the VAE takes image sizes that are multiples of 4 and >= 8 (it halves twice); got {self.size}"
            )
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}; got {self.likelihood!r}")
        if self.beta < 0 or self.gaussian_sigma <= 0 or self.latent_channels < 1 or self.hidden < 1:
            raise ValueError("beta must be >= 0, gaussian_sigma > 0, latent_channels and hidden >= 1")


class ConvVAE(nn.Module):
    def __init__(self, config: VAEConfig, scaling_factor: float = 1.0) -> None:
        super().__init__()
        config.check()
        self.config, self.scaling_factor = config, scaling_factor
        c, h, z = config.channels, config.hidden, config.latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(c, h, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(h, h, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(h, 2 * h, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * h, 2 * z, 1),  # mu and log-variance per latent cell
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(z, 2 * h, 3, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(2 * h, h, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(h, h, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(h, c, 3, padding=1),
        )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.config.size // 4
        return (self.config.latent_channels, side, side)

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) as (mu, logvar), each `[N, C_z, H/4, W/4]`."""
        expected = (self.config.channels, self.config.size, self.config.size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"the VAE takes images [N, {', '.join(map(str, expected))}]; got {tuple(images.shape)}")
        mu, logvar = self.encoder(images).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_logits(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents must be [N, {', '.join(map(str, self.latent_shape))}]; got {tuple(latents.shape)}"
            )
        return self.decoder(latents)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior means `[N, C_z, H/4, W/4]` of images in [0, 1] (unscaled)."""
        return self.posterior(images)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1]: the likelihood's mean given latents (unscaled)."""
        return torch.sigmoid(self.decode_logits(latents))

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images decoded from z ~ N(0, I), the prior."""
        device = next(self.parameters()).device
        latents = torch.randn((num, *self.latent_shape), generator=generator).to(device)
        return self.decode(latents)

    def negative_elbo(
        self, images: torch.Tensor, beta: float | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-image reconstruction NLL, KL and their β-weighted sum (nats), one z per image."""
        mu, logvar = self.posterior(images)
        noise = (
            torch.randn(mu.shape, generator=generator).to(mu.device) if generator is not None else torch.randn_like(mu)
        )
        latents = mu + (0.5 * logvar).exp() * noise  # reparameterisation: z is a differentiable function of (mu, sigma)
        logits = self.decode_logits(latents)
        reconstruction = self._reconstruction_nll(logits, images)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
        weight = self.config.beta if beta is None else beta
        return {"loss": reconstruction + weight * kl, "reconstruction": reconstruction, "kl": kl}

    def _reconstruction_nll(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.config.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(logits, images, reduction="none")
        else:
            sigma = self.config.gaussian_sigma
            nll = (
                0.5 * ((images - torch.sigmoid(logits)) / sigma).square()
                + math.log(sigma)
                + 0.5 * math.log(2 * math.pi)
            )
        return nll.flatten(1).sum(1)


@dataclass
class VAETraining:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 5e-3
    kl_warmup: float = 0.25  # share of the steps over which the KL weight rises from 0 to β
    seed: int = 0
    progress: bool = True


def train_vae(train_images: torch.Tensor, config: VAEConfig, training: VAETraining) -> tuple[ConvVAE, list[float]]:
    """Fit a VAE to `train_images` with AdamW on the β-ELBO; returns the model (with its
    `scaling_factor` measured on the training set) and the mean loss of each epoch.

    The KL weight rises linearly from 0 to β over the first `kl_warmup` of the steps (Bowman et
    al. 2016): with the full KL from the first step, a small decoder learns the mean image
    before the encoder says anything useful, and the posterior collapses onto the prior (KL
    near 0, every reconstruction the same blur)."""
    if len(train_images) < 2:
        raise ValueError(f"need at least 2 training images; got {len(train_images)}")
    torch.manual_seed(training.seed)
    generator = torch.Generator().manual_seed(training.seed)
    model = ConvVAE(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=1e-5)
    steps_per_epoch = math.ceil(len(train_images) / training.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=training.epochs * steps_per_epoch)
    total_steps = training.epochs * steps_per_epoch
    warmup_steps = max(1, round(training.kl_warmup * total_steps))
    losses, step = [], 0
    model.train()
    with training_progress(total_steps, "train vae", training.progress) as advance:
        for _ in range(training.epochs):
            order = torch.randperm(len(train_images), generator=generator)
            total = 0.0
            for batch in order.split(training.batch_size):
                step += 1
                terms = model.negative_elbo(train_images[batch], beta=config.beta * min(1.0, step / warmup_steps))
                loss = terms["loss"].mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(batch)
                advance(loss=loss.item(), kl=terms["kl"].mean().item())
            losses.append(total / len(train_images))
    model.eval()
    model.scaling_factor = 1.0 / model.encode(train_images).std().clamp_min(1e-6).item()
    return model, losses


@torch.no_grad()
def held_out_negative_elbo(model: ConvVAE, images: torch.Tensor, samples: int = 8, seed: int = 0) -> dict[str, float]:
    """The negative ELBO (β = 1) in nats per image, averaged over `samples` draws of z per image."""
    generator = torch.Generator().manual_seed(seed)
    totals = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0}
    for _ in range(samples):
        terms = model.negative_elbo(images, beta=1.0, generator=generator)
        for name in totals:
            totals[name] += terms[name].mean().item() / samples
    return {"negative_elbo": totals["loss"], "reconstruction_nll": totals["reconstruction"], "kl": totals["kl"]}


@torch.no_grad()
def interpolate(model: ConvVAE, start: torch.Tensor, end: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Images decoded along the straight line between the latents of `start` and `end` images
    `[N, C, H, W]`: `[N * steps, C, H, W]`, one row of `steps` per pair."""
    first, last = model.encode(start), model.encode(end)
    weights = torch.linspace(0, 1, steps).view(1, steps, 1, 1, 1)
    path = (1 - weights) * first.unsqueeze(1) + weights * last.unsqueeze(1)
    return model.decode(path.flatten(0, 1))


def save_figures(model: ConvVAE, test_images: torch.Tensor, test_labels: torch.Tensor, out: str | Path, seed: int = 0):
    """`reconstructions.png` (originals row over reconstructions row), `samples.png` (from the
    prior) and `interpolation.png` (rows between test images of different classes) in `out`."""
    out = Path(out)
    originals = test_images[:10]
    save_grid(torch.cat([originals, model.decode(model.encode(originals))]), out / "reconstructions.png", columns=10)
    save_grid(model.sample(100, torch.Generator().manual_seed(seed)), out / "samples.png", columns=10)
    firsts = [int((test_labels == label).nonzero()[0]) for label in test_labels.unique().tolist()]
    pairs = [(firsts[i], firsts[(i + 1) % len(firsts)]) for i in range(min(len(firsts), 5))]
    if pairs:
        starts = test_images[[a for a, _ in pairs]]
        ends = test_images[[b for _, b in pairs]]
        save_grid(interpolate(model, starts, ends), out / "interpolation.png", columns=10)
    return out


def load_vae(model_dir: str | Path) -> ConvVAE:
    """A trained VAE from `genforge vision train vae --out DIR`, in eval mode."""
    settings, weights = read_model_dir(model_dir, "vae")
    model = ConvVAE(VAEConfig(**settings["model"]), scaling_factor=settings["scaling_factor"])
    model.load_state_dict(weights)
    return model.eval()


# `genforge vision` wiring.


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = VAEConfig()
    parser.add_argument("--epochs", type=int, default=VAETraining.epochs)
    parser.add_argument("--batch-size", type=int, default=VAETraining.batch_size)
    parser.add_argument("--lr", type=float, default=VAETraining.lr)
    parser.add_argument("--beta", type=float, default=defaults.beta, help="weight of the KL term (β-VAE; 1 = ELBO)")
    parser.add_argument(
        "--latent-channels", type=int, default=defaults.latent_channels, help="channels of the H/4 x W/4 latent grid"
    )
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="width of the first conv layers")
    parser.add_argument("--likelihood", choices=LIKELIHOODS, default=defaults.likelihood)
    parser.add_argument(
        "--gaussian-sigma", type=float, default=defaults.gaussian_sigma, help="std of the Gaussian likelihood"
    )


def train_command(args: argparse.Namespace) -> Path:
    split = training_split(args)
    config = VAEConfig(
        channels=split.train.channels,
        size=split.train.size,
        latent_channels=args.latent_channels,
        hidden=args.hidden,
        beta=args.beta,
        likelihood=args.likelihood,
        gaussian_sigma=args.gaussian_sigma,
    )
    config.check()
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise ValueError("--epochs and --batch-size must be >= 1 and --lr > 0")
    started = time.perf_counter()
    model, losses = train_vae(split.train.images, config, VAETraining(args.epochs, args.batch_size, args.lr, args.seed))
    seconds = time.perf_counter() - started
    metrics = held_out_negative_elbo(model, split.test.images) if len(split.test) else {}
    settings = {
        "kind": "vae",
        **data_settings(args, split),
        "conditional": False,
        "model": asdict(config),
        "scaling_factor": model.scaling_factor,
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed},
        "train_seconds": round(seconds, 1),
        "final_train_loss": losses[-1],
        "test": metrics,
    }
    out = save_model_dir(args.out, settings, model)
    if len(split.test):
        save_figures(model, split.test.images, split.test.labels, out, seed=args.seed)
    return out


def evaluate_command(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    from .metrics import saved_model_sample_report

    settings = read_settings(model_dir, "vae")
    model = load_vae(model_dir)
    test = test_split(settings).test
    samples = model.sample(args.num, torch.Generator().manual_seed(args.seed))
    report = saved_model_sample_report(settings, samples, feature_net_path=args.feature_net)
    return {**held_out_negative_elbo(model, test.images, seed=args.seed), **report}


def sample_command(model_dir: Path, num: int, guidance: float | None, seed: int, class_index: int | None = None):
    if guidance is not None:
        raise ValueError(
            "a VAE samples from its prior: it has no guidance scale (that is a conditional diffusion model's)"
        )
    if class_index is not None:
        raise ValueError("this VAE is unconditional: it cannot sample a chosen class; drop --class")
    return load_vae(model_dir).sample(num, torch.Generator().manual_seed(seed))


VAE_KIND = VisionKind(
    name="vae",
    help="convolutional β-VAE: ELBO with a Bernoulli or Gaussian likelihood (Kingma & Welling 2014)",
    add_train_arguments=add_train_arguments,
    train=train_command,
    evaluate=evaluate_command,
    sample=sample_command,
)
