"""The `clip` and `vlm` kinds of `genforge vision`: training flags, training, evaluation and,
for the vision-language model, answering a question about an image.

    genforge vision train clip --data digits --out runs/clip
    genforge vision train vlm --data digits --clip runs/clip --out runs/vlm
    genforge vision eval --model runs/clip        # zero-shot accuracy, retrieval recall@1
    genforge vision eval --model runs/vlm         # digit accuracy, caption accuracy
    genforge vision ask --model runs/vlm --image seven.png "which digit is this?"

`CLIP_KIND` and `VLM_KIND` are the entries `vision/cli.py` registers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..console import console
from .clip import (
    ClipConfig,
    ClipModel,
    caption_tokenizer,
    encode_texts,
    load_clip,
    retrieval_recall_at_1,
    save_clip,
    train_clip,
    zero_shot_predict,
)
from .data import CAPTION_TEMPLATES, ImageSet, ImageSplit, caption, load_images
from .kinds import VisionKind
from .vlm import answer, caption_accuracy, digit_accuracy, load_vlm, prepare_image, save_vlm, train_vlm


# --------------------------------------------------------------------------------------- CLIP
def add_clip_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """CLIP's training flags; `prefix` ("clip-") names them for the VLM command, which trains a
    CLIP first when it is given none and has its own --lr and --batch-size."""
    flag = f"--{prefix}"
    parser.add_argument(f"{flag}patch", type=int, default=4, help="ViT patch side in pixels (divides --size)")
    parser.add_argument(f"{flag}width", type=int, default=64, help="width of both towers and of the joint embedding")
    parser.add_argument(f"{flag}layers", type=int, default=2, help="transformer layers per tower")
    parser.add_argument(f"{flag}heads", type=int, default=4, help="attention heads per layer")
    parser.add_argument(f"{flag}epochs", type=int, default=40)
    parser.add_argument(f"{flag}batch-size", type=int, default=64, help="pairs per contrastive batch")
    parser.add_argument(f"{flag}lr", type=float, default=3e-3)
    parser.add_argument(f"{flag}jitter", type=int, default=1, help="random shift augmentation, in pixels (0: none)")


def _split(args: argparse.Namespace) -> ImageSplit:
    return load_images(
        args.data,
        size=getattr(args, "size", 16),
        channels=getattr(args, "channels", None),
        labels_csv=getattr(args, "labels", None),
    )


def caption_table(tokenizer, class_names, context: int, pad_id: int) -> torch.Tensor:
    """Every caption template for every class, `[classes, templates, context]` ids: the
    training captions and the zero-shot prompt ensemble."""
    texts = [caption(name, template) for name in class_names for template in CAPTION_TEMPLATES]
    return encode_texts(tokenizer, texts, context, pad_id).view(len(class_names), len(CAPTION_TEMPLATES), context)


def clip_metrics(model: ClipModel, tokenizer, test: ImageSet, seed: int = 0) -> dict[str, float]:
    """Zero-shot accuracy on `test` (prompt ensemble over the caption templates) and retrieval
    recall@1 between its images and one caption per image."""
    context, pad = model.config.text_context, tokenizer.token_to_id("[PAD]")
    prompts = caption_table(tokenizer, test.class_names, context, pad)
    predicted = zero_shot_predict(model, test.images, prompts)
    metrics = {"zero_shot_accuracy": (predicted == test.labels).float().mean().item()}
    texts = encode_texts(tokenizer, test.captions(seed=seed), context, pad)
    metrics |= retrieval_recall_at_1(model, test.images, test.labels, texts, test.labels)
    return metrics


def train_clip_command(args: argparse.Namespace, prefix: str = "") -> Path:
    split = _split(args)
    prefix = prefix.replace("-", "_")
    flags = argparse.Namespace(
        **{
            name: getattr(args, prefix + name)
            for name in ("patch", "width", "layers", "heads", "epochs", "batch_size", "lr", "jitter")
        }
    )
    names = split.train.class_names
    tokenizer = caption_tokenizer([caption(name, template) for name in names for template in CAPTION_TEMPLATES])
    context = 2 + max(
        len(tokenizer.encode(caption(n, t), add_special_tokens=False)) for n in names for t in CAPTION_TEMPLATES
    )
    width = flags.width
    config = ClipConfig(
        vocab_size=tokenizer.vocab_size,
        eos_token_id=tokenizer.token_to_id("[SEP]"),
        image_size=split.train.size,
        patch_size=flags.patch,
        channels=split.train.channels,
        vision_width=width,
        vision_layers=flags.layers,
        vision_heads=flags.heads,
        vision_mlp=2 * width,
        text_width=width,
        text_layers=flags.layers,
        text_heads=flags.heads,
        text_mlp=2 * width,
        text_context=context,
        projection_dim=width,
    )
    torch.manual_seed(args.seed)
    model = ClipModel(config)
    captions = caption_table(tokenizer, names, context, tokenizer.token_to_id("[PAD]"))
    result = train_clip(
        model,
        split.train.images,
        split.train.labels,
        captions,
        epochs=flags.epochs,
        batch_size=flags.batch_size,
        lr=flags.lr,
        jitter=flags.jitter,
        seed=args.seed,
        progress=lambda epoch, total, loss: console.print(f"epoch {epoch}/{total}  loss {loss:.3f}"),
    )
    metrics = clip_metrics(result.model, tokenizer, split.test)
    console.print(", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f"  ({result.seconds:.0f} s)")
    extra = {
        "data": args.data,
        "size": split.train.size,
        "channels": split.train.channels,
        "class_names": list(names),
        "templates": list(CAPTION_TEMPLATES),
        "train_seconds": result.seconds,
        "final_loss": result.losses[-1],
        "metrics": metrics,
    }
    return save_clip(result.model, tokenizer, args.out, extra)


def evaluate_clip(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    model, tokenizer, settings = load_clip(model_dir)
    split = load_images(settings.get("data", "digits"), size=settings["size"], channels=settings["channels"])
    return clip_metrics(model, tokenizer, split.test)


CLIP_KIND = VisionKind(
    name="clip",
    help="CLIP: a ViT and a text transformer trained contrastively (zero-shot classification, retrieval)",
    add_train_arguments=add_clip_arguments,
    train=train_clip_command,
    evaluate=evaluate_clip,
)


# ---------------------------------------------------------------------------------------- VLM
def add_vlm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip", default=None, help="a trained CLIP directory (default: train one first)")
    parser.add_argument("--hidden", type=int, default=64, help="the decoder's width")
    parser.add_argument("--lm-layers", type=int, default=2, help="the decoder's layers")
    parser.add_argument("--projector", choices=("mlp", "linear"), default="mlp")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="text-only decoder steps")
    parser.add_argument("--stage1-steps", type=int, default=300, help="projector-only steps on captions")
    parser.add_argument("--stage2-steps", type=int, default=300, help="projector + LoRA steps on instructions")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    # CLIP's flags (--clip-epochs, ...), used when --clip is not given.
    add_clip_arguments(parser, prefix="clip-")


def train_vlm_command(args: argparse.Namespace) -> Path:
    split = _split(args)
    if args.clip is None:
        console.print("no --clip given: training the image encoder (CLIP) first")
        clip_dir = train_clip_command(
            argparse.Namespace(**{**vars(args), "out": str(Path(args.out) / "clip")}), prefix="clip-"
        )
    else:
        clip_dir = Path(args.clip)
    clip, _, clip_settings = load_clip(clip_dir)
    if (clip.config.channels, clip.config.image_size) != (split.train.channels, split.train.size):
        raise ValueError(
            f"the CLIP encoder in {clip_dir} takes {clip.config.channels}-channel {clip.config.image_size}px images "
            f"but the data are {split.train.channels}-channel {split.train.size}px; pass --size/--channels to match"
        )
    result = train_vlm(
        clip.vision,
        split.train.images,
        split.train.labels,
        split.train.class_names,
        hidden_size=args.hidden,
        layers=args.lm_layers,
        projector=args.projector,
        pretrain_steps=args.pretrain_steps,
        stage1_steps=args.stage1_steps,
        stage2_steps=args.stage2_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=lambda stage, step, total, loss: console.print(f"{stage} {step}/{total}  loss {loss:.3f}"),
    )
    metrics = vlm_metrics(result.model, result.tokenizer, split.test)
    console.print(", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    extra = {
        "data": args.data,
        "size": split.train.size,
        "channels": split.train.channels,
        "clip_dir": str(clip_dir),
        "train_seconds": result.seconds,
        "metrics": metrics,
    }
    return save_vlm(result.model, result.tokenizer, args.out, extra)


def vlm_metrics(model, tokenizer, test: ImageSet) -> dict[str, float]:
    return {
        "digit_accuracy": digit_accuracy(model, tokenizer, test.images, test.labels),
        "caption_accuracy": caption_accuracy(model, tokenizer, test.images, test.labels),
    }


def evaluate_vlm(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    model, tokenizer = load_vlm(model_dir)
    settings = json.loads((Path(model_dir) / "vision.json").read_text())
    split = load_images(settings.get("data", "digits"), size=settings["size"], channels=settings["channels"])
    return vlm_metrics(model, tokenizer, split.test)


def ask_vlm(model_dir: Path, image: torch.Tensor, question: str) -> str:
    """The model's greedy answer to `question` about one image `[C, H, W]` in [0, 1]."""
    model, tokenizer = load_vlm(model_dir)
    clip_config = model.config.clip_config()
    batch = prepare_image(image, clip_config.channels, clip_config.image_size)
    return answer(model, tokenizer, batch, question)[0]


def read_image_file(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """A PNG/JPEG as `[channels, size, size]` in [0, 1] (converted with PIL: colour to
    grayscale or back, resized bilinearly), with a clear error for a missing or unreadable file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image {path} does not exist; give a PNG or JPEG file")
    try:
        with Image.open(path) as opened:
            image = opened.convert({1: "L", 3: "RGB"}[channels]).resize((size, size), Image.BILINEAR)
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read; give a PNG or JPEG") from None
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return array[None] if channels == 1 else array.permute(2, 0, 1)


VLM_KIND = VisionKind(
    name="vlm",
    help="LLaVA-style vision-language model: the CLIP image encoder, a projector and a genforge decoder",
    add_train_arguments=add_vlm_arguments,
    train=train_vlm_command,
    evaluate=evaluate_vlm,
    ask=ask_vlm,
)

__all__ = ["CLIP_KIND", "VLM_KIND", "clip_metrics", "read_image_file", "vlm_metrics"]
