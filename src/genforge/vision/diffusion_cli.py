"""`genforge vision train ddpm`: the diffusion model family's flags, training, sampling and
evaluation, as the `VisionKind` that `genforge vision` dispatches to.

Pixel space by default; `--latent-vae DIR` trains on the latents of an autoencoder saved in DIR
(latent diffusion, Rombach et al. 2022). Autoencoders are found through `AUTOENCODER_LOADERS`,
keyed by the `kind` in DIR's `vision.json`: each loader returns an object with
`encode(images) -> latents [N, C, h, w]` and `decode(latents) -> images`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .classifier import digits_classifier
from .data import DIGIT_NAMES, load_images
from .diffusion import (
    Autoencoder,
    DiffusionModel,
    GuidanceError,
    LatentSpace,
    TrainSettings,
    load_diffusion_model,
    sample_diffusion,
    save_diffusion_model,
    to_images,
    to_model_space,
    train_diffusion,
)
from .kinds import MODEL_CONFIG, VisionKind, read_kind
from .schedulers import DDPMScheduler, ScheduleConfig
from .unet import UNet, UNetConfig

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}
DEFAULT_GUIDANCE = 3.0
EVAL_GUIDANCE_SCALES = (0.0, 1.0, 3.0, 5.0)
# Loaders of the autoencoders latent diffusion can use, by the `kind` their directory declares.
AUTOENCODER_LOADERS: dict[str, Callable[[Path], Autoencoder]] = {}


def _add_if_absent(parser: argparse.ArgumentParser, flag: str, **options) -> None:
    """Adds a flag the shared `vision train` parser may already define (image size, seed)."""
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **options)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ddpm")
    group.add_argument(
        "--schedule", choices=tuple(SCHEDULES), default="cosine", help="beta schedule (cosine: Nichol & Dhariwal)"
    )
    group.add_argument("--timesteps", type=int, default=1000, help="training diffusion steps T")
    group.add_argument("--prediction", choices=("epsilon", "v_prediction"), default="epsilon")
    group.add_argument("--epochs", type=int, default=40)
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--lr", type=float, default=1.5e-3)
    group.add_argument("--cond-drop", type=float, default=0.15, help="share of labels dropped to the null class")
    group.add_argument("--unconditional", action="store_true", help="ignore the labels (no guidance later)")
    group.add_argument("--ema-decay", type=float, default=0.995, help="0 turns the weight average off")
    group.add_argument("--width", type=int, default=24, help="channels of the first UNet level (then x2, x2)")
    group.add_argument("--layers-per-block", type=int, default=1)
    group.add_argument("--latent-vae", type=Path, default=None, help="diffuse in the latents of the autoencoder in DIR")
    _add_if_absent(parser, "--size", type=int, default=16, help="image side in pixels")
    _add_if_absent(parser, "--seed", type=int, default=0)


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The diffusion-only flags of `genforge vision sample` (the integrator adds them there)."""
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: all T for ddpm, 50 for ddim)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")


def load_autoencoder(directory: Path) -> Autoencoder:
    kind = read_kind(directory)
    if kind not in AUTOENCODER_LOADERS:
        known = ", ".join(sorted(AUTOENCODER_LOADERS)) or "none registered"
        raise ValueError(f"{directory} holds a {kind!r} model; latent diffusion needs an autoencoder ({known})")
    return AUTOENCODER_LOADERS[kind](Path(directory))


def _unet_levels(side: int) -> int:
    """Up to three levels, as many as halve `side` while keeping at least 2x2 at the bottom."""
    return max(1, min(3, int(math.log2(side))))


def build_unet(channels: int, side: int, width: int, layers_per_block: int, num_classes: int | None) -> UNet:
    """The UNet `train` builds: widths `width, 2 width, 2 width`, attention below the top level."""
    levels = _unet_levels(side)
    widths = tuple(width * min(2**level, 2) for level in range(levels))
    down = tuple("DownBlock2D" if level == 0 and levels > 1 else "AttnDownBlock2D" for level in range(levels))
    groups = math.gcd(8, width)
    return UNet(
        UNetConfig(
            sample_size=side,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=widths,
            layers_per_block=layers_per_block,
            down_block_types=down,
            up_block_types=tuple(name.replace("Down", "Up") for name in reversed(down)),
            attention_head_dim=16 if widths[-1] % 16 == 0 else None,  # else one head
            norm_num_groups=groups,
            num_class_embeds=num_classes + 1 if num_classes else None,
        )
    )


def train(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    size = getattr(args, "size", 16)
    source = {
        "data": getattr(args, "data", "digits"),
        "size": size,
        "channels": getattr(args, "channels", None),
        "labels_csv": getattr(args, "labels", None),
    }
    split = load_images(source["data"], size=size, channels=source["channels"], labels_csv=source["labels_csv"])
    conditional = not args.unconditional and len(split.train.class_names) > 1
    schedule = ScheduleConfig(
        num_train_timesteps=args.timesteps,
        beta_schedule=SCHEDULES[args.schedule],
        prediction_type=args.prediction,
        # Latents are not confined to [-1, 1]; clipping x_0 would distort them.
        clip_sample=args.latent_vae is None,
    )
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        cond_drop=args.cond_drop,
        ema_decay=args.ema_decay,
        seed=getattr(args, "seed", 0),
    )
    latent = None
    if args.latent_vae is not None:
        space = LatentSpace(load_autoencoder(args.latent_vae))
        data = space.fit_scale(split.train.images)
        latent = {"vae": str(Path(args.latent_vae).resolve()), "scale": space.scale, "shape": list(data.shape[1:])}
    else:
        data = to_model_space(split.train.images)
    if data.shape[-1] != data.shape[-2]:
        raise ValueError(f"the UNet takes square inputs; got {tuple(data.shape[-2:])}")
    torch.manual_seed(settings.seed)
    classes = len(split.train.class_names) if conditional else None
    unet = build_unet(data.shape[1], data.shape[-1], args.width, args.layers_per_block, classes)

    def progress(epoch: int, loss: float) -> None:
        print(f"epoch {epoch + 1}/{settings.epochs}  loss {loss:.4f}", file=sys.stderr, flush=True)

    result = train_diffusion(
        unet, DDPMScheduler(schedule), data, split.train.labels if conditional else None, settings, progress
    )
    training = {
        "epochs": settings.epochs,
        "steps": result.steps,
        "seconds": result.seconds,
        "losses": result.losses,
        "cond_drop": settings.cond_drop if conditional else None,
        "default_guidance": DEFAULT_GUIDANCE,
    }
    model = DiffusionModel(
        result.model,
        schedule,
        size,
        split.train.channels,
        split.train.class_names if conditional else None,
        latent,
        training,
        source,
    )
    save_diffusion_model(model, out)
    return out


def sample_images(
    model_dir: str | Path,
    num: int,
    guidance: float | None = None,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`num` images `[N, C, H, W]` in [0, 1]. A conditional model draws the classes in turn
    (or `labels`) with guidance `guidance` (default 3); an unconditional one refuses guidance."""
    model = load_diffusion_model(model_dir)
    if not model.is_conditional:
        if guidance is not None:
            raise GuidanceError(
                f"{model_dir} is an unconditional diffusion model: --guidance needs one trained with class labels "
                "(train without --unconditional)"
            )
        if labels is not None:
            raise GuidanceError(f"{model_dir} is unconditional; it cannot draw given classes")
    elif labels is None:
        labels = torch.arange(num) % len(model.class_names)
    if num < 1:
        raise ValueError(f"the number of samples must be >= 1, not {num}")
    if model.is_conditional and guidance is None:
        guidance = (model.training or {}).get("default_guidance", DEFAULT_GUIDANCE)
    if model.latent is not None:
        space = LatentSpace(load_autoencoder(Path(model.latent["vae"])), model.latent["scale"])
        shape = (num, *model.latent["shape"])
    else:
        space = None
        shape = (num, model.channels, model.image_size, model.image_size)
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        samples = sample_diffusion(model.unet, model.schedule, shape, labels, guidance, sampler, steps, eta, generator)
        return space.decode(samples) if space is not None else to_images(samples)


def sample(model_dir: Path, num: int, guidance: float | None, seed: int) -> torch.Tensor:
    return sample_images(model_dir, num, guidance, seed)


def evaluate(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Conditional accuracy by the digits classifier at each guidance scale (conditional models
    on digits), and the share of the ten classes among unguided samples."""
    model = load_diffusion_model(model_dir)
    if model.channels != 1 or (model.class_names and tuple(model.class_names) != DIGIT_NAMES):
        raise ValueError(f"{model_dir} was not trained on the digits; `eval` scores samples with the digits classifier")
    per_class = getattr(args, "per_class", 10)
    steps = getattr(args, "steps", None) or 25
    classifier = digits_classifier(model.image_size)
    metrics: dict[str, float] = {}
    if model.is_conditional:
        count = len(model.class_names)
        labels = torch.arange(count).repeat_interleave(per_class)
        for scale in getattr(args, "guidance_scales", EVAL_GUIDANCE_SCALES):
            images = sample_images(model_dir, len(labels), scale, 0, "ddim", steps, labels=labels)
            predicted = classifier.predict(images).argmax(-1)
            metrics[f"accuracy@guidance={scale:g}"] = (predicted == labels).float().mean().item()
    else:
        images = sample_images(model_dir, 10 * per_class, None, 0, "ddim", steps)
        predicted = classifier.predict(images).argmax(-1)
        metrics["classes_covered"] = float(predicted.unique().numel())
    num = getattr(args, "num", None)
    if num:  # `genforge vision eval`: FID, IS and coverage of `num` samples, as for the other kinds
        from .metrics import saved_model_sample_report

        settings = json.loads((Path(model_dir) / MODEL_CONFIG).read_text())
        wanted = torch.arange(num) % len(model.class_names) if model.is_conditional else None
        images = sample_images(model_dir, num, None, getattr(args, "seed", 0), "ddim", steps, labels=wanted)
        metrics |= saved_model_sample_report(settings, images, wanted, getattr(args, "feature_net", None))
    return metrics


KIND = VisionKind(
    name="ddpm",
    help="denoising diffusion (DDPM/DDIM) with a UNet, class-conditional with classifier-free guidance",
    add_train_arguments=add_train_arguments,
    train=train,
    evaluate=evaluate,
    sample=sample,
)
