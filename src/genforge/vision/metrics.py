"""How good are generated images? FID, Inception Score, conditional accuracy and mode coverage.

- Fréchet Inception Distance (Heusel et al. 2017): fit a Gaussian to the features of real and of
  generated images and take the Fréchet (2-Wasserstein) distance between the two,
  `|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`. Lower is better; 0 for equal statistics.
- Inception Score (Salimans et al. 2016): `exp E_x KL(p(y|x) || p(y))`, high when each image is
  classified confidently and the classes are spread; between 1 and the number of classes.
- Conditional accuracy: the share of images drawn for class c that the classifier reads as c.
- Mode coverage: the share of classes that occur among the samples' predicted labels, and the
  KL divergence of the predicted-class histogram to the uniform one (0 when balanced; a GAN that
  collapses onto a few digits scores high).

On the digits the feature network is genforge's digits classifier (`classifier.py`: its 128-d
penultimate layer, and its softmax for IS), the role InceptionV3 plays for natural images. A user
with InceptionV3 weights can pass them as a TorchScript file (`load_feature_net`); genforge never
downloads any. The numbers are comparable with each other, not with published FIDs on ImageNet
features.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .classifier import DigitClassifier, digits_classifier

FeatureNet = Callable[[torch.Tensor], torch.Tensor]  # images [N, C, H, W] in [0, 1] -> features [N, D]


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean `[D]` and unbiased covariance `[D, D]` of features `[N, D]`, in float64."""
    array = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2 images; got shape {tuple(array.shape)}")
    return array.mean(axis=0), np.cov(array, rowvar=False)


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """The Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b).

    The trace of the square root of `sigma_a @ sigma_b` is taken from the symmetric form
    `sqrt(sigma_a) sigma_b sqrt(sigma_a)`, which is similar to the product (same eigenvalues) but
    symmetric positive semi-definite, so `eigh` gives real eigenvalues whose square roots sum to
    the trace. pytorch-fid calls `scipy.linalg.sqrtm` on the non-symmetric product instead, which
    on near-singular covariances (fewer images than feature dimensions, dead features) returns
    small imaginary parts and sometimes non-finite values; it then adds 1e-6 to the diagonals and
    drops imaginary parts below 1e-3. Here the same rounding shows up as tiny negative
    eigenvalues, which are clamped to zero: the exact answer for a PSD matrix, without the ad-hoc
    offset. Computed in float64 throughout.
    """
    mu_a, mu_b = np.asarray(mu_a, dtype=np.float64), np.asarray(mu_b, dtype=np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, dtype=np.float64), np.asarray(sigma_b, dtype=np.float64)
    dim = mu_a.shape[0]
    if mu_b.shape != (dim,) or sigma_a.shape != (dim, dim) or sigma_b.shape != (dim, dim):
        raise ValueError(
            f"means and covariances disagree in size: mu {mu_a.shape} vs {mu_b.shape}, "
            f"sigma {sigma_a.shape} vs {sigma_b.shape}; both sets must come from one feature network"
        )
    root_a = _psd_sqrt(sigma_a)
    product = root_a @ sigma_b @ root_a
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (negative rounding-error eigenvalues set to 0)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def fid_from_features(features_a, features_b) -> float:
    """FID between two feature sets `[N, D]` and `[M, D]`."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def fid_from_images(images_a: torch.Tensor, images_b: torch.Tensor, feature_net: FeatureNet | None = None) -> float:
    """FID between two image sets `[N, C, H, W]` in [0, 1]; features from `feature_net`, by
    default the digits classifier at the images' size (trained on first use and cached)."""
    _check_images(images_a, "first image set")
    _check_images(images_b, "second image set")
    if images_a.shape[1:] != images_b.shape[1:]:
        raise ValueError(f"image sets differ in shape: {tuple(images_a.shape[1:])} vs {tuple(images_b.shape[1:])}")
    net = feature_net or digits_classifier(images_a.shape[-1]).embed
    with torch.no_grad():
        return fid_from_features(net(images_a), net(images_b))


def inception_score(probabilities: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over `splits` equal parts of `exp E_x KL(p(y|x) || p(y))`,
    from class probabilities `[N, K]` (rows sum to 1), as Salimans et al. report it."""
    probs = torch.as_tensor(probabilities, dtype=torch.float64)
    if probs.ndim != 2 or probs.shape[0] < splits or splits < 1:
        raise ValueError(f"need probabilities [N, K] with N >= splits >= 1; got {tuple(probs.shape)}, splits={splits}")
    if (probs < 0).any() or not torch.allclose(probs.sum(-1), torch.ones(len(probs), dtype=torch.float64), atol=1e-4):
        raise ValueError("probabilities must be non-negative rows summing to 1 (apply softmax to logits first)")
    scores = []
    for part in probs.tensor_split(splits):
        marginal = part.mean(0, keepdim=True)
        # 0 * log 0 = 0: a class an image gives no probability adds nothing to its KL.
        kl = torch.where(part > 0, part * (part.clamp_min(1e-300).log() - marginal.clamp_min(1e-300).log()), 0.0)
        scores.append(kl.sum(-1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def conditional_accuracy(classifier: DigitClassifier, images: torch.Tensor, wanted: torch.Tensor) -> float:
    """The share of images the classifier reads as the class they were generated for."""
    wanted = torch.as_tensor(wanted, dtype=torch.long)
    if len(wanted) != len(images):
        raise ValueError(f"{len(images)} images but {len(wanted)} wanted labels")
    return (classifier.predict(images).argmax(-1) == wanted).float().mean().item()


def mode_coverage(predicted: torch.Tensor, num_classes: int = 10, min_share: float = 0.0) -> dict:
    """From predicted labels `[N]`: the class histogram, the share of classes with more than
    `min_share` of the samples, and the histogram's KL divergence (nats) to the uniform one."""
    predicted = torch.as_tensor(predicted, dtype=torch.long)
    if predicted.ndim != 1 or len(predicted) == 0:
        raise ValueError("mode coverage needs a non-empty 1-d tensor of predicted labels")
    if predicted.min() < 0 or predicted.max() >= num_classes:
        raise ValueError(f"predicted labels must lie in [0, {num_classes}); got {predicted.min()}..{predicted.max()}")
    counts = torch.bincount(predicted, minlength=num_classes).double()
    shares = counts / counts.sum()
    present = shares > 0
    kl = (shares[present] * (shares[present] * num_classes).log()).sum().item()
    return {
        "class_shares": [round(v, 4) for v in shares.tolist()],
        "classes_covered": (shares > min_share).double().mean().item(),
        "kl_to_uniform": kl,
    }


def sample_report(
    samples: torch.Tensor,
    reference: torch.Tensor,
    classifier: DigitClassifier | None = None,
    wanted_labels: torch.Tensor | None = None,
    feature_net: FeatureNet | None = None,
    splits: int = 10,
) -> dict[str, float]:
    """The metrics of `genforge vision eval` for generated `samples` against real `reference`
    images: FID (by `feature_net`, else the classifier's features), and when a digits
    `classifier` is given the Inception Score, mode coverage and, for samples drawn for
    `wanted_labels`, conditional accuracy. Every image-generating kind reports through this."""
    _check_images(samples, "samples")
    _check_images(reference, "reference images")
    if feature_net is None and classifier is None:
        raise ValueError("give a feature network (e.g. --feature-net inception.pt) or the digits classifier")
    report: dict[str, float] = {
        "fid": fid_from_images(samples, reference, feature_net or classifier.embed),
        "num_samples": len(samples),
        "num_reference": len(reference),
    }
    if classifier is not None:
        probs = classifier.predict(samples)
        report["inception_score"], report["inception_score_std"] = inception_score(probs, min(splits, len(probs)))
        coverage = mode_coverage(probs.argmax(-1), classifier.num_classes)
        report["classes_covered"] = coverage["classes_covered"]
        report["class_kl_to_uniform"] = coverage["kl_to_uniform"]
        if wanted_labels is not None:
            report["conditional_accuracy"] = conditional_accuracy(classifier, samples, wanted_labels)
    return report


def load_feature_net(path: str | Path, input_size: int = 299, pixel_scale: float = 255.0) -> FeatureNet:
    """A user's feature extractor saved as TorchScript (`torch.jit.save`), e.g. the
    `inception-2015-12-05.pt` InceptionV3 of StyleGAN's and clean-fid's FID: images in [0, 1]
    are resized to `input_size`, grey images repeated to three channels, multiplied by
    `pixel_scale` (255 for that file, 1 for a model that takes [0, 1]); a forward that takes
    `return_features` is called with it, a 4-d output is average-pooled to `[N, D]`.

    Only TorchScript: an InceptionV3 state dict would need the architecture (torchvision's, which
    cannot be installed beside genforge's CPU torch), and genforge downloads no weights."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"feature network {path} does not exist; give a TorchScript file (torch.jit.save)")
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as err:
        raise ValueError(
            f"{path} is not a TorchScript module ({str(err).splitlines()[0]}); save one with torch.jit.save"
        ) from None
    takes_flag = "return_features" in str(getattr(module.forward, "schema", "")) or (
        "return_features" in _python_parameters(module)
    )

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False) * pixel_scale
        out = torch.cat(
            [
                _as_features(module(chunk, return_features=True) if takes_flag else module(chunk))
                for chunk in x.split(64)
            ]
        )
        return out

    return features


def _python_parameters(module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _as_features(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.ndim == 4:
        output = output.mean(dim=(2, 3))
    if output.ndim != 2:
        raise ValueError(f"the feature network returned shape {tuple(output.shape)}; it must give [N, D] features")
    return output


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a tensor [N, C, H, W] in [0, 1]; got {shape}")
    if len(images) < 2:
        raise ValueError(f"{name}: FID needs at least 2 images to estimate a covariance; got {len(images)}")


def classifier_for(config: dict) -> DigitClassifier | None:
    """The digits classifier at a saved model's size when it was trained on the digits (the
    classifier reads digits only: on a user's image folder, class metrics are left out)."""
    if config.get("data") != "digits" or config.get("channels", 1) != 1:
        return None
    return digits_classifier(config["size"])


def saved_model_sample_report(
    config: dict,
    samples: torch.Tensor,
    wanted_labels: torch.Tensor | None = None,
    feature_net_path: str | Path | None = None,
) -> dict[str, float]:
    """`sample_report` of a saved model's samples against the test split it was trained with:
    FID by the digits classifier (or a user's `--feature-net`), IS and mode coverage on digits,
    conditional accuracy when `wanted_labels` is given."""
    from .store import test_split

    reference = test_split(config).test.images
    classifier = classifier_for(config)
    feature_net = load_feature_net(feature_net_path) if feature_net_path else None
    if classifier is None and feature_net is None:
        raise ValueError(
            f"{config.get('data')} is not the digits: FID needs a feature network for these images; "
            "pass --feature-net FILE (a TorchScript InceptionV3, e.g. inception-2015-12-05.pt)"
        )
    return sample_report(samples, reference, classifier, wanted_labels, feature_net)
