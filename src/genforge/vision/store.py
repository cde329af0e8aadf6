"""Saving and reading a trained vision model directory (`vision.json` + `model.safetensors`).

`vision.json` holds the kind, the model's own settings and where its data came from (`data`,
`size`, `channels`, `labels_csv`, `class_names`, `conditional`), so that `genforge vision eval`
rebuilds the same test split and `sample` knows which classes and flags the model takes. The
directory is written whole or not at all (`genforge.atomic.staged_directory`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import staged_directory
from .data import ImageSplit, load_images
from .kinds import MODEL_CONFIG, MODEL_WEIGHTS, read_kind


def data_settings(args: argparse.Namespace, split: ImageSplit) -> dict:
    """The data part of `vision.json`, from `genforge vision train`'s shared flags."""
    return {
        "data": args.data if args.data == "digits" else str(Path(args.data).resolve()),
        "size": split.train.size,
        "channels": split.train.channels,
        "labels_csv": None if args.labels is None else str(Path(args.labels).resolve()),
        "class_names": list(split.train.class_names),
    }


def training_split(args: argparse.Namespace) -> ImageSplit:
    """The images `--data`, `--size`, `--channels` and `--labels` name."""
    return load_images(args.data, size=args.size, channels=args.channels, labels_csv=args.labels)


def test_split(config: dict) -> ImageSplit:
    """The split a saved model was trained on, rebuilt from its `vision.json`."""
    return load_images(
        config["data"], size=config["size"], channels=config["channels"], labels_csv=config["labels_csv"]
    )


def save_model_dir(out: str | Path, config: dict, model: torch.nn.Module) -> Path:
    """Write `config` (with `kind`) and the model's weights into `out`, replacing it atomically."""
    if "kind" not in config:
        raise ValueError("a vision model's config must name its kind")
    out = Path(out)
    with staged_directory(out) as staging:
        (staging / MODEL_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(
            {name: value.detach().contiguous().cpu() for name, value in model.state_dict().items()},
            staging / MODEL_WEIGHTS,
        )
    return out


def read_settings(model_dir: str | Path, kind: str) -> dict:
    """`vision.json` of a saved model, refusing a directory of another kind."""
    found = read_kind(model_dir)
    if found != kind:
        raise ValueError(f"{model_dir} holds a {found!r} model, not a {kind!r} one")
    return json.loads((Path(model_dir) / MODEL_CONFIG).read_text())


def read_model_dir(model_dir: str | Path, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """`vision.json` and the weights of a saved model, refusing a directory of another kind."""
    config = read_settings(model_dir, kind)
    weights = Path(model_dir) / MODEL_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{model_dir} has no {MODEL_WEIGHTS}; the model directory is incomplete")
    return config, load_file(weights)
