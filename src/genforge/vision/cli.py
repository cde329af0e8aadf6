"""`genforge vision`: train, sample, evaluate and question the vision models.

    genforge vision train KIND --data digits|DIR --out DIR [KIND's flags]
    genforge vision sample --model DIR --num N [--guidance S] [--class C] --out grid.png
    genforge vision eval --model DIR [--num N] [--feature-net inception.pt] [--json FILE]
    genforge vision ask --model DIR --image FILE "which digit is this?"

`VISION_KINDS` maps each trainable family to its `kinds.VisionKind`; `sample`, `eval` and `ask`
read the kind from the model directory's `vision.json` and dispatch to it. A family plugs in
with one entry. The shared training flags (`--data --out --size --channels --labels --seed`)
are added here; a kind adds its own.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..console import console
from . import diffusion_cli
from .clip_cli import CLIP_KIND, VLM_KIND
from .gan import GAN_KIND
from .kinds import MODEL_CONFIG, VisionKind, read_kind
from .vae import VAE_KIND, load_vae

VISION_KINDS: dict[str, VisionKind] = {
    "vae": VAE_KIND,
    "gan": GAN_KIND,
    "ddpm": diffusion_cli.KIND,
    "clip": CLIP_KIND,
    "vlm": VLM_KIND,
}
# Latent diffusion (`vision train ddpm --latent-vae DIR`) diffuses in a trained VAE's latents.
diffusion_cli.AUTOENCODER_LOADERS["vae"] = load_vae


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge vision` and its subcommands to the top-level parser."""
    parser = sub.add_parser(
        "vision",
        help="image generation and multimodal models: train, sample, eval (FID, IS), ask",
        description="Train small generative and multimodal vision models on the bundled digits or a folder of "
        "images, sample image grids, measure them (FID, Inception Score, conditional accuracy, mode coverage) "
        "and ask a vision-language model about an image. Each subcommand has --help.",
        epilog="example: genforge vision train vae --data digits --out runs/vae && "
        "genforge vision sample --model runs/vae --num 64 --out vae.png",
    )
    commands = parser.add_subparsers(dest="vision_command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model of one kind", description="Train a vision model.")
    kinds = train.add_subparsers(dest="vision_kind", required=True, metavar="KIND")
    for name, kind in VISION_KINDS.items():
        # "resolve": a kind that re-declares a shared flag (its own --seed default) overrides it.
        child = kinds.add_parser(name, help=kind.help, description=kind.help, conflict_handler="resolve")
        _add_data_arguments(child)
        kind.add_train_arguments(child)
        child.set_defaults(func=cmd_train)

    sample = commands.add_parser("sample", help="draw images from a trained model into a PNG grid")
    sample.add_argument("--model", required=True, help="a model directory from `genforge vision train`")
    sample.add_argument("--num", type=int, default=64, help="images to draw")
    sample.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (conditional diffusion)"
    )
    sample.add_argument("--class", dest="class_index", type=int, default=None, help="draw only this class index")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--columns", type=int, default=None, help="grid columns (default: a square grid)")
    sample.add_argument("--out", required=True, help="the PNG grid to write")
    diffusion = sample.add_argument_group("diffusion models")
    diffusion_cli.add_sample_arguments(diffusion)
    sample.set_defaults(func=cmd_sample)

    evaluate = commands.add_parser(
        "eval",
        help="measure a model on its test split: FID, IS, conditional accuracy, mode coverage, ELBO",
        description="Metrics of a trained model against the test split it was trained with, printed as a table "
        "and written as JSON. FID uses the digits classifier's features on the digits; other images need "
        "--feature-net (a TorchScript InceptionV3 file you have; nothing is downloaded).",
    )
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--num", type=int, default=1000, help="samples to draw for FID, IS and coverage")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument(
        "--feature-net", default=None, help="TorchScript feature extractor for FID (e.g. InceptionV3)"
    )
    evaluate.add_argument("--json", default=None, help="where to write the metrics (default: MODEL/eval.json)")
    evaluate.set_defaults(func=cmd_eval)

    ask = commands.add_parser("ask", help="ask a vision-language model a question about an image")
    ask.add_argument("--model", required=True)
    ask.add_argument("--image", required=True, help="a PNG or JPEG image")
    ask.add_argument("question", help='e.g. "which digit is this?"')
    ask.set_defaults(func=cmd_ask)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="'digits' (bundled with scikit-learn) or a folder of images")
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels (images are resized to it)")
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), default=None, help="convert a folder to 1 or 3 channels"
    )
    parser.add_argument("--labels", default=None, help="a CSV of filename,label rows for a folder without sub-folders")
    parser.add_argument("--seed", type=int, default=0)


def kind_of(model_dir: str | Path) -> VisionKind:
    """The registered kind a saved model declares, with a clear error for an unknown one."""
    name = read_kind(model_dir)
    if name not in VISION_KINDS:
        raise ValueError(f"{model_dir} holds a {name!r} model; this genforge knows {', '.join(VISION_KINDS)}")
    return VISION_KINDS[name]


def cmd_train(args: argparse.Namespace) -> int:
    kind = VISION_KINDS[args.vision_kind]
    console.print(f"training {kind.name} on {args.data} at {args.size}x{args.size}")
    out = kind.train(args)
    print(out)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .data import save_grid

    if args.num < 1:
        raise ValueError(f"--num must be at least 1; got {args.num}")
    kind = kind_of(args.model)
    if kind.sample is None:
        raise ValueError(f"a {kind.name} model does not generate images; sample from vae, gan or ddpm models")
    settings = json.loads((Path(args.model) / MODEL_CONFIG).read_text())
    check_sampling_request(settings, args.guidance, args.class_index)
    extra = {}
    if args.class_index is not None and kind is not diffusion_cli.KIND:
        if "class_index" not in inspect.signature(kind.sample).parameters:
            raise ValueError(f"{kind.name} models do not take --class")
        extra["class_index"] = args.class_index
    if kind is diffusion_cli.KIND:
        labels = torch.full((args.num,), args.class_index) if args.class_index is not None else None
        images = diffusion_cli.sample_images(
            args.model, args.num, args.guidance, args.seed, args.sampler, args.steps, args.eta, labels=labels
        )
    else:
        images = kind.sample(Path(args.model), args.num, args.guidance, args.seed, **extra)
    path = save_grid(images, args.out, columns=args.columns)
    print(path)
    return 0


def check_sampling_request(settings: dict, guidance: float | None, class_index: int | None) -> None:
    """Refuse a guidance scale for an unconditional model and a class it does not have."""
    conditional = bool(settings.get("conditional"))
    names = settings.get("class_names") or []
    if guidance is not None and not conditional:
        raise ValueError(
            f"--guidance {guidance} needs a class-conditional model; this {settings['kind']} model is unconditional "
            "(train a conditional one, or drop --guidance)"
        )
    if class_index is not None:
        if not conditional:
            raise ValueError(f"--class needs a class-conditional model; this {settings['kind']} model is unconditional")
        if not 0 <= class_index < len(names):
            shown = ", ".join(f"{i}={name}" for i, name in enumerate(names))
            raise ValueError(f"--class {class_index} is not one of the model's {len(names)} classes ({shown})")


def cmd_eval(args: argparse.Namespace) -> int:
    if args.num < 10:
        raise ValueError(f"--num must be at least 10 samples (FID needs a covariance, IS ten splits); got {args.num}")
    kind = kind_of(args.model)
    metrics = kind.evaluate(Path(args.model), args)
    path = Path(args.json) if args.json else Path(args.model) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"kind": kind.name, "model": str(args.model), **metrics}, indent=2))
    width = max(len(name) for name in metrics)
    for name, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown}")
    console.print(f"wrote {path}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    kind = kind_of(args.model)
    if kind.ask is None:
        askable = [name for name, entry in VISION_KINDS.items() if entry.ask is not None]
        raise ValueError(f"a {kind.name} model answers no questions; ask a {' or '.join(askable) or 'vlm'} model")
    settings = json.loads((Path(args.model) / MODEL_CONFIG).read_text())
    image = read_image(args.image, settings.get("size"), settings.get("channels"))
    print(kind.ask(Path(args.model), image, args.question))
    return 0


def read_image(path: str | Path, size: int | None = None, channels: int | None = None):
    """One image file as `[C, H, W]` in [0, 1], converted to the model's channels and size."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read; give a PNG or JPEG") from None
    mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
    image = image.convert(mode)
    if size is not None:
        image = image.resize((size, size), Image.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return array.unsqueeze(0) if mode == "L" else array.permute(2, 0, 1)


__all__ = ["VISION_KINDS", "add_commands", "check_sampling_request", "kind_of", "read_image"]
