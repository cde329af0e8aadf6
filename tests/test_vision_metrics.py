"""genforge.vision.metrics: FID against torchmetrics' Fréchet distance, Inception Score against its
formula on known distributions, conditional accuracy, mode coverage, and user feature networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import _compute_fid

from genforge.vision.metrics import (
    conditional_accuracy,
    feature_statistics,
    fid_from_features,
    fid_from_images,
    frechet_distance,
    inception_score,
    load_feature_net,
    mode_coverage,
    sample_report,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _feature_sets(count_a: int, count_b: int, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    a = torch.randn(count_a, dim, generator=generator, dtype=torch.float64) @ mixing
    b = torch.randn(count_b, dim, generator=generator, dtype=torch.float64) @ (mixing * 0.7) + 0.5
    return a, b


@pytest.mark.parametrize("count_a,count_b,dim", [(500, 400, 16), (300, 300, 64), (40, 30, 64)])
def test_fid_equals_torchmetrics_frechet_distance(count_a, count_b, dim):
    # The last case has fewer images than dimensions: singular covariances, where sqrtm-style
    # implementations meet imaginary parts and the symmetric form must still agree.
    a, b = _feature_sets(count_a, count_b, dim)
    mu_a, sigma_a = feature_statistics(a)
    mu_b, sigma_b = feature_statistics(b)
    ours = frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    theirs = _compute_fid(*(torch.from_numpy(x) for x in (mu_a, sigma_a, mu_b, sigma_b))).item()
    assert ours == pytest.approx(theirs, abs=1e-3, rel=1e-6)
    assert fid_from_features(a, b) == pytest.approx(ours)


def test_fid_is_zero_on_equal_sets_symmetric_and_a_mean_shift_for_equal_covariances():
    a, b = _feature_sets(300, 300, 8)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-9)
    shift = torch.arange(8, dtype=torch.float64)
    assert fid_from_features(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-9)


def test_fid_refuses_mismatched_sizes_and_too_few_images():
    with pytest.raises(ValueError, match="disagree in size"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="differ in shape"):
        fid_from_images(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 16, 16), feature_net=lambda x: x.flatten(1))


def test_inception_score_on_known_distributions():
    classes = 10
    balanced_one_hot = torch.eye(classes).repeat(20, 1)  # confident and spread over all classes
    mean, std = inception_score(balanced_one_hot, splits=10)
    assert mean == pytest.approx(classes) and std == pytest.approx(0.0, abs=1e-9)
    one_class = torch.zeros(200, classes)
    one_class[:, 3] = 1
    assert inception_score(one_class, splits=4)[0] == pytest.approx(1.0)
    uniform = torch.full((200, classes), 1 / classes)  # unsure about every image
    assert inception_score(uniform, splits=4)[0] == pytest.approx(1.0)
    # Two classes, each image 0.9/0.1 and half the images each way: exp(KL(p || [0.5, 0.5])).
    halves = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).repeat(50, 1)
    expected = math.exp(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))
    assert inception_score(halves, splits=1)[0] == pytest.approx(expected)


def test_inception_score_refuses_logits_and_too_few_images():
    with pytest.raises(ValueError, match="softmax"):
        inception_score(torch.randn(20, 10), splits=2)
    with pytest.raises(ValueError, match="N >= splits"):
        inception_score(torch.eye(10)[:5], splits=10)


def test_mode_coverage_counts_classes_and_kl_to_uniform():
    balanced = mode_coverage(torch.arange(100) % 10)
    assert balanced["classes_covered"] == 1.0 and balanced["kl_to_uniform"] == pytest.approx(0.0, abs=1e-12)
    collapsed = mode_coverage(torch.full((50,), 7))
    assert collapsed["classes_covered"] == pytest.approx(0.1)
    assert collapsed["kl_to_uniform"] == pytest.approx(math.log(10))
    assert collapsed["class_shares"][7] == 1.0
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        mode_coverage(torch.tensor([0, 10]))


def test_digit_metrics_separate_real_digits_from_noise(classifier16, digits16):
    test, train = digits16.test, digits16.train
    assert conditional_accuracy(classifier16, test.images, test.labels) > 0.9
    assert conditional_accuracy(classifier16, test.images, (test.labels + 1) % 10) < 0.1
    noise = torch.rand(300, 1, 16, 16)
    real_fid = fid_from_images(train.images[:300], test.images, classifier16.embed)
    noise_fid = fid_from_images(noise, test.images, classifier16.embed)
    assert real_fid * 10 < noise_fid
    report = sample_report(train.images[:300], test.images, classifier16, train.labels[:300])
    assert report["fid"] == pytest.approx(real_fid)
    assert report["inception_score"] > 7 and report["classes_covered"] == 1.0 and report["conditional_accuracy"] > 0.9


class _TinyFeatures(torch.nn.Module):
    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 2)
        return pooled if return_features else pooled.flatten(1)[:, :1]


def test_a_torchscript_feature_net_is_resized_scaled_and_called_for_features(tmp_path):
    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(_TinyFeatures()), str(path))
    net = load_feature_net(path, input_size=32, pixel_scale=255.0)
    images = torch.rand(6, 1, 16, 16)
    features = net(images)
    assert features.shape == (6, 3)  # grey repeated to RGB; the 4-d features average-pooled
    expected = (torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear") * 255).mean(dim=(2, 3))
    assert torch.allclose(features, expected.repeat(1, 3), atol=1e-3)
    assert fid_from_images(images, images, net) == pytest.approx(0.0, abs=1e-6)
    (tmp_path / "bad.pt").write_bytes(b"not a module")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        load_feature_net(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_feature_net(tmp_path / "missing.pt")
