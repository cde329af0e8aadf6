"""Quality of genforge's VAE and GAN on the bundled digits, measured, not looked at.

Trains the β-VAE, the unconditional DCGAN and the class-conditional DCGAN at 16x16 on the
digits' train split, then scores 1,000 samples of each against the 360-image test split with
the digits classifier (`genforge.vision.metrics`): FID, Inception Score, the share of classes
covered and the class histogram's KL to uniform, conditional accuracy for the conditional GAN,
and the VAE's negative ELBO on the test split. A reference row scores 1,000 *real* training
images the same way: the FID a perfect generator would get with this many images.

Writes benchmarks/results/vision_quality.{json,md} and the PNG grids under
benchmarks/results/vision/.

    python benchmarks/vision_quality.py            # all three models, one after the other
    python benchmarks/vision_quality.py --jobs 3   # in three processes (one thread each)
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, write_results

from genforge.vision.classifier import accuracy, digits_classifier
from genforge.vision.data import load_digits, save_grid
from genforge.vision.gan import GANConfig, GANTraining, class_coverage_figure, train_gan
from genforge.vision.metrics import sample_report
from genforge.vision.vae import VAEConfig, VAETraining, held_out_negative_elbo, save_figures, train_vae

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = RESULTS / "vision"
SIZE = 16
SAMPLES = 1000


def grey_entropy_floor(images: torch.Tensor) -> float:
    """Nats per image no Bernoulli decoder can beat on grey-level pixels: sum of H(pixel)."""
    x = images.double().clamp(1e-12, 1 - 1e-12)
    return (-(x * x.log() + (1 - x) * (1 - x).log())).flatten(1).sum(1).mean().item()


def run_vae(args) -> dict:
    torch.set_num_threads(args.threads)
    split = load_digits(SIZE)
    started = time.perf_counter()
    model, losses = train_vae(
        split.train.images, VAEConfig(size=SIZE), VAETraining(epochs=args.vae_epochs, progress=False)
    )
    seconds = time.perf_counter() - started
    save_figures(model, split.test.images, split.test.labels, FIGURES / "vae")
    samples = model.sample(SAMPLES, torch.Generator().manual_seed(0))
    report = sample_report(samples, split.test.images, digits_classifier(SIZE))
    elbo = held_out_negative_elbo(model, split.test.images)
    return {
        "model": "VAE (β=1, Bernoulli, 4x4x4 latents)",
        "train": f"{args.vae_epochs} epochs",
        "train_seconds": round(seconds, 1),
        **report,
        **{f"test_{k}": v for k, v in elbo.items()},
        "test_grey_entropy_floor": grey_entropy_floor(split.test.images),
        "final_train_loss": losses[-1],
    }


def run_gan(args, conditional: bool) -> dict:
    torch.set_num_threads(args.threads)
    split = load_digits(SIZE)
    config = GANConfig(size=SIZE, num_classes=10 if conditional else 0)
    started = time.perf_counter()
    model, history = train_gan(
        split.train.images, split.train.labels, config, GANTraining(steps=args.gan_steps, progress=False)
    )
    seconds = time.perf_counter() - started
    name = "cgan" if conditional else "gan"
    class_coverage_figure(model, FIGURES / name)
    samples = model.sample(SAMPLES, generator=torch.Generator().manual_seed(0))
    wanted = torch.arange(SAMPLES) % 10 if conditional else None
    report = sample_report(samples, split.test.images, digits_classifier(SIZE), wanted)
    return {
        "model": "conditional DCGAN (projection D)" if conditional else "DCGAN",
        "train": f"{args.gan_steps} steps",
        "train_seconds": round(seconds, 1),
        **report,
        "final_losses": history[-1],
    }


def run_reference(args) -> dict:
    torch.set_num_threads(args.threads)
    split = load_digits(SIZE)
    classifier = digits_classifier(SIZE)
    real = split.train.images[:SAMPLES]
    save_grid(split.test.images[:100], FIGURES / "real_test_digits.png", columns=10)
    return {
        "model": "real training digits (reference)",
        "train": "-",
        "train_seconds": 0.0,
        **sample_report(real, split.test.images, classifier, split.train.labels[:SAMPLES]),
        "classifier_test_accuracy": accuracy(classifier, split.test.images, split.test.labels),
    }


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# Vision quality: VAE and GAN on the digits (16x16)",
        "",
        f"1,000 samples per model against the {rows[0]['num_reference']}-image test split; features and labels "
        "from genforge's digits classifier (FID on its 128-d penultimate layer, not InceptionV3: numbers compare "
        f"models here, not with papers). `python benchmarks/vision_quality.py --jobs {result['jobs']}`; "
        f"{result['threads']} torch thread(s) per model on a {result['machine']['cores']}-core machine "
        "shared with other work, so times are loose.",
        "",
        "| model | training | time (s) | FID ↓ | IS ↑ | classes covered | class KL to uniform | conditional accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        accuracy_cell = f"{row['conditional_accuracy']:.3f}" if "conditional_accuracy" in row else "-"
        lines.append(
            f"| {row['model']} | {row['train']} | {row['train_seconds']:.0f} | {row['fid']:.1f} | "
            f"{row['inception_score']:.2f} ± {row['inception_score_std']:.2f} | {row['classes_covered']:.2f} | "
            f"{row['class_kl_to_uniform']:.4f} | {accuracy_cell} |"
        )
    vae = next(row for row in rows if row["model"].startswith("VAE"))
    lines += [
        "",
        f"VAE negative ELBO on the test split: **{vae['test_negative_elbo']:.1f} nats per image** "
        f"(reconstruction {vae['test_reconstruction_nll']:.1f} + KL {vae['test_kl']:.1f}); the grey levels' own "
        f"entropy, which no Bernoulli decoder can go below, is {vae['test_grey_entropy_floor']:.1f} nats.",
        "",
        "Grids: `benchmarks/results/vision/` (vae/{samples,reconstructions,interpolation}.png, gan/samples.png, "
        "cgan/samples.png with one class per row, real_test_digits.png).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-epochs", type=int, default=30)
    parser.add_argument("--gan-steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once, each in its own process")
    args = parser.parse_args(argv)
    digits_classifier(SIZE)  # trained once and cached before the workers read it
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(run_reference, args),
            pool.submit(run_vae, args),
            pool.submit(run_gan, args, False),
            pool.submit(run_gan, args, True),
        ]
        rows = [future.result() for future in futures]
    result = {
        "machine": describe(),
        "threads": args.threads,
        "jobs": args.jobs,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    write_results(RESULTS, "vision_quality", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
