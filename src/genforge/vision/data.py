"""Image data for the vision models: scikit-learn's bundled digits, or a folder of images.

The digits (Alpaydin & Kaynak 1998; 1,797 grayscale 8x8 images of ten classes) ship inside
scikit-learn, so every model here trains without a download. They are upsampled to the size a
model asks for and split once, stratified, with a fixed seed, so every model and metric sees the
same test images. Each image also gets a caption from its label ("a handwritten seven"), for the
contrastive and vision-language models.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten {name}",
    "a photo of the digit {name}",
    "the number {name}, written by hand",
    "a drawing of a {name}",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_FRACTION = 0.2
SPLIT_SEED = 0


class ImageDataError(ValueError):
    """Images genforge cannot use as given; the message says what is accepted."""


@dataclass
class ImageSet:
    """Images `[N, C, H, W]` in [0, 1] with integer labels `[N]` and the labels' names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    def captions(self, template: int | None = None, seed: int = 0) -> list[str]:
        """One caption per image from its label: a fixed template, or one drawn per image."""
        rng = np.random.default_rng(seed)
        picks = [template] * len(self) if template is not None else rng.integers(len(CAPTION_TEMPLATES), size=len(self))
        return [
            caption(self.class_names[label], CAPTION_TEMPLATES[pick])
            for label, pick in zip(self.labels.tolist(), picks)
        ]


@dataclass
class ImageSplit:
    train: ImageSet
    test: ImageSet


def caption(name: str, template: str = CAPTION_TEMPLATES[0]) -> str:
    return template.format(name=name)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square images to `size` x `size` (bilinear, antialiased when shrinking), kept in [0, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    antialias = size < images.shape[-1]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias).clamp(
        0.0, 1.0
    )


def load_digits(size: int = 16) -> ImageSplit:
    """The bundled digits at `size` x `size`, one channel, split 80/20 stratified by label."""
    if size < 8:
        raise ImageDataError(f"image size {size} is below the digits' own 8 pixels; use 8, 16 or 32")
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=bunch.target
    )
    images = resize(images, size)
    return ImageSplit(
        train=ImageSet(images[train_idx], labels[train_idx], DIGIT_NAMES),
        test=ImageSet(images[test_idx], labels[test_idx], DIGIT_NAMES),
    )


def load_image_folder(
    root: str | Path, size: int | None = None, channels: int | None = None, labels_csv: str | Path | None = None
) -> ImageSplit:
    """A folder of PNG/JPEG images, labelled by sub-folder (`root/<label>/*.png`) or by a CSV
    of `filename,label` rows, split like the digits.

    Mixed sizes are resized to `size` when one is given and refused otherwise; mixed grayscale
    and colour images are converted to `channels` (1 or 3) when given and refused otherwise.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise ImageDataError(f"{root} is not a directory; give a folder of images (sub-folders per label, or --labels)")
    files, names = _labelled_files(root, labels_csv)
    if not files:
        raise ImageDataError(f"no {'/'.join(IMAGE_SUFFIXES)} images found under {root}")
    if channels not in (None, 1, 3):
        raise ImageDataError(f"channels must be 1 (grayscale) or 3 (RGB), not {channels}")
    opened = [Image.open(path) for path, _ in files]
    modes = {"L" if image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB" for image in opened}
    if channels is None and len(modes) > 1:
        raise ImageDataError(
            f"{root} mixes grayscale and colour images; pass channels=1 or 3 (--channels) to convert them all"
        )
    mode = {1: "L", 3: "RGB"}[channels] if channels else modes.pop()
    sizes = {image.size for image in opened}
    if size is None:
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
            raise ImageDataError(
                f"{root} holds images of {len(sizes)} sizes ({shown}); pass a size (--size) to resize them"
            )
        width, height = sizes.pop()
        if width != height:
            raise ImageDataError(f"images are {width}x{height}; pass a size to resize them to a square")
        size = width
    arrays = [
        np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32) for image in opened
    ]
    images = torch.from_numpy(np.stack(arrays)) / 255.0
    images = images.unsqueeze(1) if mode == "L" else images.permute(0, 3, 1, 2)
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(labels)))
    cut = max(1, round(len(labels) * TEST_FRACTION)) if len(labels) > 1 else 0
    test, train = order[:cut], order[cut:]
    return ImageSplit(
        train=ImageSet(images[train], labels[train], names), test=ImageSet(images[test], labels[test], names)
    )


def _labelled_files(root: Path, labels_csv: str | Path | None) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    if labels_csv is not None:
        with open(labels_csv, newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
        if rows and rows[0][:2] == ["filename", "label"]:
            rows = rows[1:]
        bad = [row for row in rows if len(row) < 2]
        if bad:
            raise ImageDataError(f"{labels_csv}: each row must be filename,label; got {bad[0]}")
        names = tuple(sorted({row[1] for row in rows}))
        missing = [row[0] for row in rows if not (root / row[0]).is_file()]
        if missing:
            raise ImageDataError(f"{labels_csv} names {len(missing)} files not under {root}, e.g. {missing[0]}")
        return [(root / row[0], names.index(row[1])) for row in rows], names
    folders = sorted(path for path in root.iterdir() if path.is_dir())
    if folders:
        names = tuple(folder.name for folder in folders)
        return [(path, index) for index, folder in enumerate(folders) for path in _images_in(folder)], names
    return [(path, 0) for path in _images_in(root)], ("image",)


def _images_in(folder: Path) -> Sequence[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


def load_images(source: str, size: int = 16, channels: int | None = None, labels_csv: str | None = None) -> ImageSplit:
    """`"digits"` or a folder path, as `genforge vision train --data` takes it."""
    if source == "digits":
        return load_digits(size)
    return load_image_folder(source, size=size, channels=channels, labels_csv=labels_csv)


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 4) -> Path:
    """Images `[N, C, H, W]` in [0, 1] as one PNG grid (nearest-neighbour upscaled by `scale`)."""
    from PIL import Image

    count, chans, height, width = images.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = torch.ones(chans, rows * (height + 1) + 1, columns * (width + 1) + 1)
    for index, image in enumerate(images.detach().float().clamp(0, 1).cpu()):
        row, col = divmod(index, columns)
        grid[:, 1 + row * (height + 1) : 1 + row * (height + 1) + height, 1 + col * (width + 1) :][:, :, :width] = image
    pixels = (grid * 255).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = pixels[0].numpy() if chans == 1 else pixels.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
