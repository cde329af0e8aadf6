import numpy as np
import pytest
import torch
from PIL import Image

from genforge.vision.classifier import accuracy, digits_classifier
from genforge.vision.data import ImageDataError, load_digits, load_image_folder, save_grid


def test_digits_split_is_fixed_stratified_and_in_range(digits16):
    assert (len(digits16.train), len(digits16.test)) == (1437, 360)
    assert digits16.train.images.shape[1:] == (1, 16, 16)
    assert 0.0 <= digits16.train.images.min() and digits16.train.images.max() <= 1.0
    counts = torch.bincount(digits16.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ten classes of ~36
    again = load_digits(16)
    assert torch.equal(again.test.labels, digits16.test.labels)
    assert digits16.test.captions(template=0)[0].startswith("a handwritten ")


def test_digits_refuse_sizes_below_eight():
    with pytest.raises(ImageDataError, match="below the digits"):
        load_digits(4)


def _write(path, size, mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(path)


def test_folder_labels_from_subfolders_and_csv(tmp_path):
    for label in ("cat", "dog"):
        for i in range(5):
            _write(tmp_path / label / f"{i}.png", 12, value=200 if label == "dog" else 10)
    split = load_image_folder(tmp_path)
    assert split.train.class_names == ("cat", "dog")
    assert len(split.train) + len(split.test) == 10 and split.train.images.shape[1:] == (1, 12, 12)
    images = torch.cat([split.train.images, split.test.images])
    labels = torch.cat([split.train.labels, split.test.labels])
    assert torch.all(images[labels == 1] > 0.7) and torch.all(images[labels == 0] < 0.1)
    (tmp_path / "labels.csv").write_text("filename,label\ncat/0.png,a\ndog/1.png,b\n")
    assert load_image_folder(tmp_path, labels_csv=tmp_path / "labels.csv").train.class_names == ("a", "b")


def test_folder_mixed_sizes_and_modes_are_refused_or_converted(tmp_path):
    _write(tmp_path / "a.png", 8)
    _write(tmp_path / "b.png", 10)
    with pytest.raises(ImageDataError, match="2 sizes"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=16).train.images.shape[-1] == 16
    _write(tmp_path / "c.png", 8, mode="RGB")
    with pytest.raises(ImageDataError, match="mixes grayscale and colour"):
        load_image_folder(tmp_path, size=8)
    assert load_image_folder(tmp_path, size=8, channels=3).train.channels == 3
    with pytest.raises(ImageDataError, match="not a directory"):
        load_image_folder(tmp_path / "a.png")


def test_grid_png_has_one_cell_per_image(tmp_path):
    path = save_grid(torch.rand(6, 1, 8, 8), tmp_path / "grid.png", columns=3, scale=2)
    width, height = Image.open(path).size
    assert (width, height) == ((3 * 9 + 1) * 2, (2 * 9 + 1) * 2)


@pytest.mark.slow
def test_classifier_reads_the_test_split_and_is_cached(digits16, classifier16, tmp_path_factory):
    assert accuracy(classifier16, digits16.test.images, digits16.test.labels) >= 0.95
    assert classifier16.embed(digits16.test.images[:5]).shape == (5, 128)
    cache = next(tmp_path_factory.getbasetemp().glob("vision_cache*"))
    reloaded = digits_classifier(16, cache_dir=cache)
    assert torch.equal(reloaded.predict(digits16.test.images[:8]), classifier16.predict(digits16.test.images[:8]))
