"""A DCGAN (Radford et al. 2016), unconditional or class-conditional, with the usual stabilisers.

The generator maps noise z (and a class embedding, concatenated, when conditional) through a
linear layer to a 4x4 feature map and up by strided transposed convolutions with batch norm and
ReLU to a tanh image; the discriminator mirrors it down with strided convolutions and leaky ReLU.
The two play the minimax game of Goodfellow et al. (2014), trained with:

- the non-saturating generator loss (`-log D(G(z))`, Goodfellow et al.'s practical variant);
- spectral normalisation of every discriminator weight (Miyato et al. 2018): D is kept about
  1-Lipschitz, which is what keeps its gradients useful to G;
- one-sided label smoothing (Salimans et al. 2016): real targets 0.9, fake targets 0, so D is
  not rewarded for overconfidence on real images, and fakes keep their full gradient;
- optionally an R1 gradient penalty on real images (Mescheder et al. 2018), or the Wasserstein
  loss with a gradient penalty on interpolates instead (WGAN-GP, Gulrajani et al. 2017);
- an exponential moving average of the generator's weights for sampling (Karras et al. 2018).

The conditional discriminator uses the projection form (Miyato & Koyama 2018): its logit is
`psi(h) + <embed(y), h>` for pooled features h, the class entering both networks. Mode
coverage (do samples cover all ten digits?) is measured by the digits classifier.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .data import save_grid
from .kinds import VisionKind
from .progress import training_progress
from .store import data_settings, read_model_dir, read_settings, save_model_dir, training_split

PENALTIES = ("none", "r1", "wgan-gp")


@dataclass
class GANConfig:
    channels: int = 1
    size: int = 16
    noise_dim: int = 64
    hidden: int = 16  # channels at full resolution; doubled at each halving
    num_classes: int = 0  # 0: unconditional
    class_embedding: int = 16
    spectral_norm: bool = True

    def check(self) -> None:
        side = self.size
        while side > 4 and side % 2 == 0:
            side //= 2
        if side != 4 or self.size < 8:
            raise ValueError(f"the DCGAN takes image sizes 4 * 2^k >= 8 (8, 16, 32, 64); got {self.size}")
        if self.noise_dim < 1 or self.hidden < 1 or self.num_classes < 0 or self.class_embedding < 1:
            raise ValueError("noise_dim, hidden and class_embedding must be >= 1 and num_classes >= 0")

    @property
    def stages(self) -> int:
        return int(math.log2(self.size // 4))

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0


class Generator(nn.Module):
    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden * 2**config.stages
        extra = config.class_embedding if config.conditional else 0
        self.embed = nn.Embedding(config.num_classes, config.class_embedding) if config.conditional else None
        self.project = nn.Sequential(nn.Linear(config.noise_dim + extra, width * 16), nn.Unflatten(1, (width, 4, 4)))
        layers: list[nn.Module] = [nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(config.stages):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(),
            ]
            width //= 2
        layers += [nn.Conv2d(width, config.channels, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] from noise `[N, noise_dim]` (and labels `[N]` when conditional)."""
        if self.embed is not None:
            noise = torch.cat([noise, self.embed(labels)], dim=1)
        return self.body(self.project(noise))


class Discriminator(nn.Module):
    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        norm = spectral_norm if config.spectral_norm else (lambda module: module)
        width, layers = config.hidden, []
        in_channels = config.channels
        for _ in range(config.stages):
            layers += [norm(nn.Conv2d(in_channels, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            in_channels, width = width, width * 2
        layers += [norm(nn.Conv2d(in_channels, width, 3, padding=1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.head = norm(nn.Linear(width, 1))
        self.embed = norm(nn.Embedding(config.num_classes, width)) if config.conditional else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """One logit per image in [-1, 1] `[N]`."""
        features = self.body(images).sum(dim=(2, 3))  # global sum pooling, as in Miyato & Koyama
        logit = self.head(features).squeeze(1)
        if self.embed is not None:
            logit = logit + (self.embed(labels) * features).sum(1)  # the projection term
        return logit


class DCGAN(nn.Module):
    """The generator used for sampling (the moving average when trained with one) and the
    discriminator, saved together."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    @torch.no_grad()
    def sample(
        self, num: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [0, 1]. A conditional model draws `labels` (default: the classes in turn)."""
        labels = self.labels_for(num, labels)
        noise = torch.randn((num, self.config.noise_dim), generator=generator)
        was_training = self.generator.training
        self.generator.eval()
        images = self.generator(noise, labels)
        self.generator.train(was_training)
        return (images + 1) / 2

    def labels_for(self, num: int, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """The checked labels of `num` samples: None when unconditional, the classes in turn
        when none are given."""
        if not self.config.conditional:
            if labels is not None:
                raise ValueError("this GAN is unconditional: it cannot sample chosen classes")
            return None
        if labels is None:
            return torch.arange(num) % self.config.num_classes
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (num,):
            raise ValueError(f"need one label per image: {num} images but labels of shape {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= self.config.num_classes:
            raise ValueError(
                f"class labels must lie in [0, {self.config.num_classes}); got {labels.min()}..{labels.max()}"
            )
        return labels


@dataclass
class GANTraining:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4  # DCGAN's 2e-4 is for 25 epochs of 64x64; digits runs are ~2,000 steps
    betas: tuple[float, float] = (0.5, 0.999)  # DCGAN's momentum
    label_smoothing: float = 0.9  # target of real images (one-sided); 1.0 turns it off
    penalty: str = "none"
    penalty_weight: float = 10.0  # γ of R1 or λ of WGAN-GP
    ema_decay: float = 0.99  # a ~100-step window, for short runs; 0 turns the moving average off
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}; got {self.penalty!r}")
        if not 0.5 < self.label_smoothing <= 1.0:
            raise ValueError(f"label smoothing is the real images' target, in (0.5, 1]; got {self.label_smoothing}")
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or not 0 <= self.ema_decay < 1:
            raise ValueError("need steps >= 1, batch_size >= 2, lr > 0 and 0 <= ema_decay < 1")


def discriminator_loss(
    discriminator: Discriminator,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor | None,
    training: GANTraining,
) -> torch.Tensor:
    """D's loss on a batch (images in [-1, 1]), with its penalty."""
    if training.penalty == "wgan-gp":
        loss = discriminator(fake, labels).mean() - discriminator(real, labels).mean()
        mix = torch.rand(len(real), 1, 1, 1)
        between = (mix * real + (1 - mix) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(discriminator(between, labels).sum(), between, create_graph=True)
        return loss + training.penalty_weight * (grad.flatten(1).norm(dim=1) - 1).square().mean()
    if training.penalty == "r1":
        real = real.detach().requires_grad_(True)
    real_logits = discriminator(real, labels)
    fake_logits = discriminator(fake, labels)
    loss = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, training.label_smoothing))
    loss = loss + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if training.penalty == "r1":
        (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
        loss = loss + training.penalty_weight / 2 * grad.flatten(1).square().sum(1).mean()
    return loss


def generator_loss(discriminator: Discriminator, fake: torch.Tensor, labels, training: GANTraining) -> torch.Tensor:
    logits = discriminator(fake, labels)
    if training.penalty == "wgan-gp":
        return -logits.mean()
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # non-saturating: -log D(G(z))


def train_gan(
    train_images: torch.Tensor, train_labels: torch.Tensor | None, config: GANConfig, training: GANTraining
) -> tuple[DCGAN, list[dict[str, float]]]:
    """Alternate one discriminator and one generator Adam step per batch; returns the model
    (its generator the moving average when `ema_decay` > 0) and the losses every 50 steps."""
    config.check()
    training.check()
    if len(train_images) < training.batch_size:
        raise ValueError(f"need at least batch_size={training.batch_size} training images; got {len(train_images)}")
    if config.conditional and train_labels is None:
        raise ValueError("a conditional GAN needs labels")
    torch.manual_seed(training.seed)
    generator = torch.Generator().manual_seed(training.seed)
    model = DCGAN(config)
    average = copy.deepcopy(model.generator) if training.ema_decay > 0 else None
    g_optimizer = torch.optim.Adam(model.generator.parameters(), lr=training.lr, betas=training.betas)
    d_optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=training.lr, betas=training.betas)
    real_all = train_images * 2 - 1
    history: list[dict[str, float]] = []
    model.train()
    with training_progress(training.steps, "train gan", training.progress) as advance:
        for step in range(training.steps):
            batch = torch.randint(len(real_all), (training.batch_size,), generator=generator)
            real = real_all[batch]
            labels = train_labels[batch] if config.conditional else None
            noise = torch.randn((training.batch_size, config.noise_dim), generator=generator)
            fake = model.generator(noise, labels)
            d_loss = discriminator_loss(model.discriminator, real, fake.detach(), labels, training)
            d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            d_optimizer.step()
            g_loss = generator_loss(model.discriminator, fake, labels, training)
            g_optimizer.zero_grad(set_to_none=True)
            g_loss.backward()
            g_optimizer.step()
            if average is not None:
                _update_average(average, model.generator, training.ema_decay)
            advance(d=d_loss.item(), g=g_loss.item())
            if step % 50 == 0 or step == training.steps - 1:
                history.append({"step": step, "d_loss": d_loss.item(), "g_loss": g_loss.item()})
    if average is not None:
        model.generator.load_state_dict(average.state_dict())
    return model.eval(), history


@torch.no_grad()
def _update_average(average: nn.Module, current: nn.Module, decay: float) -> None:
    for kept, new in zip(average.parameters(), current.parameters()):
        kept.lerp_(new, 1 - decay)
    for kept, new in zip(average.buffers(), current.buffers()):  # batch-norm statistics follow the current G
        kept.copy_(new)


def load_gan(model_dir: str | Path) -> DCGAN:
    """A trained GAN from `genforge vision train gan --out DIR`, in eval mode."""
    settings, weights = read_model_dir(model_dir, "gan")
    model = DCGAN(GANConfig(**settings["model"]))
    model.load_state_dict(weights)
    return model.eval()


def class_coverage_figure(model: DCGAN, out: str | Path, seed: int = 0) -> Path:
    """`samples.png`: 100 samples, one row per class when conditional."""
    images = model.sample(100, generator=torch.Generator().manual_seed(seed))
    if model.config.conditional:  # classes in turn across a row of 10 -> one class per column; transpose to rows
        images = images.view(10, 10, *images.shape[1:]).transpose(0, 1).flatten(0, 1)
    return save_grid(images, Path(out) / "samples.png", columns=10)


# `genforge vision` wiring.


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, training = GANConfig(), GANTraining()
    parser.add_argument("--steps", type=int, default=training.steps, help="discriminator + generator steps")
    parser.add_argument("--batch-size", type=int, default=training.batch_size)
    parser.add_argument("--lr", type=float, default=training.lr)
    parser.add_argument("--conditional", action="store_true", help="class embedding into G and D (projection D)")
    parser.add_argument("--noise-dim", type=int, default=defaults.noise_dim)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--no-spectral-norm", action="store_true", help="leave D's weights unnormalised")
    parser.add_argument("--label-smoothing", type=float, default=training.label_smoothing, help="real target; 1 = off")
    parser.add_argument("--penalty", choices=PENALTIES, default=training.penalty, help="R1 on reals, or WGAN-GP")
    parser.add_argument("--penalty-weight", type=float, default=training.penalty_weight)
    parser.add_argument("--ema-decay", type=float, default=training.ema_decay, help="generator weight average; 0 = off")


def train_command(args: argparse.Namespace) -> Path:
    split = training_split(args)
    num_classes = len(split.train.class_names) if args.conditional else 0
    if args.conditional and num_classes < 2:
        raise ValueError(f"--conditional needs labelled images of at least 2 classes; {args.data} has {num_classes}")
    config = GANConfig(
        channels=split.train.channels,
        size=split.train.size,
        noise_dim=args.noise_dim,
        hidden=args.hidden,
        num_classes=num_classes,
        spectral_norm=not args.no_spectral_norm,
    )
    training = GANTraining(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        label_smoothing=args.label_smoothing,
        penalty=args.penalty,
        penalty_weight=args.penalty_weight,
        ema_decay=args.ema_decay,
        seed=args.seed,
    )
    config.check()
    training.check()
    started = time.perf_counter()
    model, history = train_gan(split.train.images, split.train.labels, config, training)
    settings = {
        "kind": "gan",
        **data_settings(args, split),
        "conditional": config.conditional,
        "model": asdict(config),
        "training": {k: v for k, v in asdict(training).items() if k != "progress"},
        "train_seconds": round(time.perf_counter() - started, 1),
        "losses": history[-1],
    }
    out = save_model_dir(args.out, settings, model)
    class_coverage_figure(model, out, seed=args.seed)
    return out


def evaluate_command(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    from .metrics import saved_model_sample_report

    settings = read_settings(model_dir, "gan")
    model = load_gan(model_dir)
    samples = model.sample(args.num, generator=torch.Generator().manual_seed(args.seed))
    wanted = model.labels_for(args.num)
    return saved_model_sample_report(settings, samples, wanted, feature_net_path=args.feature_net)


def sample_command(model_dir: Path, num: int, guidance: float | None, seed: int, class_index: int | None = None):
    if guidance is not None:
        raise ValueError("a GAN has no guidance scale (classifier-free guidance belongs to diffusion); drop --guidance")
    model = load_gan(model_dir)
    labels = None if class_index is None else torch.full((num,), class_index, dtype=torch.long)
    return model.sample(num, labels, generator=torch.Generator().manual_seed(seed))


GAN_KIND = VisionKind(
    name="gan",
    help="DCGAN, optionally class-conditional: spectral norm, label smoothing, R1 or WGAN-GP (Radford et al. 2016)",
    add_train_arguments=add_train_arguments,
    train=train_command,
    evaluate=evaluate_command,
    sample=sample_command,
)
