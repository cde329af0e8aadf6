"""genforge.vision.cli: `genforge vision train/sample/eval/ask` through a parser built from
`add_commands`, with tiny models; bad requests are refused with a clear message."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from genforge.vision import metrics
from genforge.vision.classifier import DigitClassifier
from genforge.vision.cli import VISION_KINDS, add_commands, read_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genforge")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["vision", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_cli")
    vae, gan = root / "vae", root / "gan"
    common = ["--data", "digits", "--size", "16"]
    _run(["train", "vae", *common, "--out", str(vae), "--epochs", "1", "--hidden", "4", "--batch-size", "256"])
    _run(["train", "gan", *common, "--out", str(gan), "--steps", "2", "--hidden", "4", "--conditional"])
    return vae, gan


def test_the_registry_and_each_kinds_flags():
    assert {"vae", "gan"} <= set(VISION_KINDS)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(
        ["vision", "train", "gan", "--data", "d", "--out", "o", "--penalty", "r1", "--conditional"]
    )
    assert (args.penalty, args.conditional, args.size, args.seed) == ("r1", True, 16, 0)
    args = parser.parse_args(["vision", "train", "vae", "--data", "d", "--out", "o", "--beta", "4"])
    assert args.beta == 4.0 and args.likelihood == "bernoulli"
    with pytest.raises(SystemExit):  # a GAN flag is no VAE flag
        parser.parse_args(["vision", "train", "vae", "--data", "d", "--out", "o", "--penalty", "r1"])


def test_sample_writes_a_grid_and_refuses_what_the_model_cannot_do(trained, tmp_path, capsys):
    vae, gan = trained
    assert _run(["sample", "--model", str(vae), "--num", "6", "--columns", "3", "--out", str(tmp_path / "v.png")]) == 0
    assert capsys.readouterr().out.strip().endswith("v.png")
    with Image.open(tmp_path / "v.png") as grid:
        assert grid.size == (4 * (3 * 17 + 1), 4 * (2 * 17 + 1))  # 16-pixel cells, 1-pixel borders, scale 4
    with pytest.raises(ValueError, match="--guidance 3.0 needs a class-conditional model"):
        _run(["sample", "--model", str(vae), "--guidance", "3", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="--class needs a class-conditional model"):
        _run(["sample", "--model", str(vae), "--class", "3", "--out", str(tmp_path / "x.png")])
    assert _run(["sample", "--model", str(gan), "--num", "4", "--class", "9", "--out", str(tmp_path / "g.png")]) == 0
    with pytest.raises(ValueError, match=r"--class 10 is not one of the model's 10 classes \(0=zero"):
        _run(["sample", "--model", str(gan), "--class", "10", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="no guidance scale"):
        _run(["sample", "--model", str(gan), "--guidance", "2", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="not a genforge vision model"):
        _run(["sample", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")])


def test_eval_prints_a_table_and_writes_json(trained, tmp_path, capsys, monkeypatch):
    vae, gan = trained
    # The plumbing, not the numbers: an untrained classifier spares training the real one here.
    torch.manual_seed(0)
    stand_in = DigitClassifier().eval()
    monkeypatch.setattr(metrics, "digits_classifier", lambda size: stand_in)
    assert _run(["eval", "--model", str(vae), "--num", "50"]) == 0
    table = capsys.readouterr().out
    assert "negative_elbo" in table and "fid" in table and "inception_score" in table
    report = json.loads((vae / "eval.json").read_text())
    assert report["kind"] == "vae" and report["negative_elbo"] > 0 and report["fid"] > 0
    assert 0 <= report["classes_covered"] <= 1 and "conditional_accuracy" not in report
    out = tmp_path / "gan_eval.json"
    assert _run(["eval", "--model", str(gan), "--num", "50", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert 0 <= report["conditional_accuracy"] <= 1 and report["num_samples"] == 50
    with pytest.raises(ValueError, match="at least 10"):
        _run(["eval", "--model", str(gan), "--num", "5"])


def test_ask_is_refused_for_models_that_answer_nothing(trained, tmp_path):
    vae, _ = trained
    Image.new("L", (8, 8), 200).save(tmp_path / "digit.png")
    with pytest.raises(ValueError, match="a vae model answers no questions"):
        _run(["ask", "--model", str(vae), "--image", str(tmp_path / "digit.png"), "which digit is this?"])
    image = read_image(tmp_path / "digit.png", size=16, channels=1)
    assert image.shape == (1, 16, 16) and abs(image.mean().item() - 200 / 255) < 1e-3
    assert read_image(tmp_path / "digit.png", channels=3).shape == (3, 8, 8)
    (tmp_path / "not.png").write_text("text")
    with pytest.raises(ValueError, match="not an image"):
        read_image(tmp_path / "not.png")


class _MeanFeatures(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)


def test_a_folder_of_images_trains_and_needs_a_feature_net_for_fid(tmp_path):
    for label, value in (("dark", 30), ("light", 220)):
        for index in range(6):
            pixels = np.full((8, 8), value, dtype=np.uint8)
            pixels[index, :] = 255 - value  # one stripe per image, so images differ
            (tmp_path / "images" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(tmp_path / "images" / label / f"{index}.png")
    model = tmp_path / "vae"
    _run(["train", "vae", "--data", str(tmp_path / "images"), "--size", "8", "--out", str(model), "--epochs", "1"])
    assert json.loads((model / "vision.json").read_text())["class_names"] == ["dark", "light"]
    with pytest.raises(ValueError, match="needs a feature network"):
        _run(["eval", "--model", str(model), "--num", "10"])
    torch.jit.save(torch.jit.script(_MeanFeatures()), str(tmp_path / "features.pt"))
    assert _run(["eval", "--model", str(model), "--num", "10", "--feature-net", str(tmp_path / "features.pt")]) == 0
    report = json.loads((model / "eval.json").read_text())
    assert report["fid"] >= 0 and "inception_score" not in report and report["negative_elbo"] > 0
