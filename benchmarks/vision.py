"""Diffusion on the digits: sampling speed against diffusers, and guidance against accuracy.

Two measurements, each written to benchmarks/results/vision.{json,md} (merged with what an
earlier part wrote) and plots under benchmarks/results/vision/:

- `--part speed`: images/s of DDPM and DDIM sampling with genforge's UNet and scheduler
  against diffusers' `DDPMPipeline` / `DDIMPipeline` built on the same UNet weights (a random
  `UNet2DModel` of the size trained below, loaded into genforge with `load_diffusers_unet`) and
  the same scheduler configuration, timed alternately in one process. Both draw batches of
  `--batch` images in inference mode; the ratio is genforge / diffusers.
- `--part train`: a class-conditional DDPM on the digits at 16x16 (cosine schedule, epsilon
  prediction, label dropout 0.15, EMA), trained with genforge's `train_diffusion`; the model
  directory is saved to `--model-dir` and the training time recorded.
- `--part fid`: FID and Inception Score of that model's samples (`--per-class` of each digit, DDIM)
  at guidance 0, 1 and 3 against the test split, beside the VAE's and GANs' from
  results/vision_quality.json, all with the same digits-classifier features.
- `--part guidance`: from that model, `--per-class` samples of each digit at guidance scales
  0, 1, 2, 3, 5, 8 (DDIM, `--steps` steps), labelled by the digits classifier: conditional
  accuracy per scale (plot), and one sample grid per scale (a row per digit).

    python benchmarks/vision.py --part speed
    python benchmarks/vision.py --part train --model-dir /tmp/genforge_ddpm_digits16
    python benchmarks/vision.py --part guidance --model-dir /tmp/genforge_ddpm_digits16
    python benchmarks/vision.py --part fid --model-dir /tmp/genforge_ddpm_digits16 --per-class 100 --steps 25

Timings on a shared machine are noisy: compare the ratio measured within one run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import describe, write_results

from genforge.vision.classifier import digits_classifier
from genforge.vision.data import load_digits, save_grid
from genforge.vision.diffusion import (
    DiffusionModel,
    TrainSettings,
    load_diffusion_model,
    sample_diffusion,
    save_diffusion_model,
    to_images,
    to_model_space,
    train_diffusion,
)
from genforge.vision.schedulers import DDPMScheduler, ScheduleConfig
from genforge.vision.unet import UNet, UNetConfig, load_diffusers_unet

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = RESULTS / "vision"
GUIDANCE_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)
# Sized for two shared CPU cores (about 0.6 s a step of 32 on one thread): attention at 8x8 and
# 4x4, one residual block per level.
DIGITS_UNET = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(24, 48, 48),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=16,
    norm_num_groups=8,
)
DIGITS_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def merge_results(update: dict) -> dict:
    path = RESULTS / "vision.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.update(update)
    result["machine"] = describe(**_peer_versions())
    result["machine"]["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    write_results(RESULTS, "vision", result, markdown(result))
    return result


def _peer_versions() -> dict:
    try:
        import diffusers

        return {"diffusers": diffusers.__version__}
    except ImportError:
        return {}


def markdown(result: dict) -> str:
    lines = ["# Diffusion on the digits", ""]
    machine = result.get("machine", {})
    lines.append(
        f"Machine: {machine.get('cpu')} ({machine.get('cores')} cores, {machine.get('threads')} torch threads, "
        f"CPU capability {machine.get('cpu_capability')}), torch {machine.get('torch')}, "
        f"diffusers {machine.get('diffusers')}."
    )
    if "speed" in result:
        speed = result["speed"]
        lines += [
            "",
            f"## Sampling speed (batch {speed['batch']}, {speed['image_size']}x{speed['image_size']}, "
            f"UNet {speed['parameters'] / 1e6:.2f} M parameters, {speed['threads']} thread, same weights and scheduler)",
            "",
            "| sampler | steps | genforge images/s | diffusers images/s | ratio |",
            "|---|---|---|---|---|",
        ]
        lines.insert(
            len(lines) - 2,
            f"DDIM samples of the two from the same noise differ by at most {speed['max_output_difference']:.1e}.\n",
        )
        for row in speed["rows"]:
            lines.append(
                f"| {row['sampler']} | {row['steps']} | {row['genforge_images_per_s']:.2f} | "
                f"{row['diffusers_images_per_s']:.2f} | {row['ratio']:.2f}x |"
            )
    if "training" in result:
        training = result["training"]
        lines += [
            "",
            "## Class-conditional DDPM on digits 16x16",
            "",
            f"{training['parameters'] / 1e6:.2f} M parameters, {training['epochs']} epochs ({training['steps']} "
            f"steps of {training['batch_size']}), {training['seconds'] / 60:.1f} min on {training['threads']} "
            f"threads; final loss {training['final_loss']:.4f}. Model: `{training['model_dir']}`.",
        ]
    if "guidance" in result:
        guidance = result["guidance"]
        lines += [
            "",
            f"## Conditional accuracy against guidance scale ({guidance['per_class']} samples per digit, "
            f"{guidance['sampler']} {guidance['steps']} steps; digits classifier)",
            "",
            "| guidance scale | accuracy | classes covered |",
            "|---|---|---|",
        ]
        for row in guidance["rows"]:
            lines.append(f"| {row['scale']:g} | {row['accuracy']:.3f} | {row['classes_covered']} |")
        lines += ["", "![accuracy vs guidance](vision/guidance_accuracy.png)"]
    if "fid" in result:
        fid = result["fid"]
        lines += [
            "",
            f"## FID against the test split ({fid['samples']} samples per model, digits-classifier features; "
            f"DDPM sampled with {fid['sampler']} {fid['steps']} steps)",
            "",
            "| model | FID | Inception Score |",
            "|---|---|---|",
        ]
        for row in fid["rows"]:
            lines.append(f"| {row['model']} | {row['fid']:.1f} | {row['inception_score']:.2f} |")
    return "\n".join(lines) + "\n"


def part_train(args) -> None:
    torch.set_num_threads(args.threads)
    split = load_digits(16)
    config = UNetConfig(**DIGITS_UNET, num_class_embeds=len(split.train.class_names) + 1)
    torch.manual_seed(args.seed)
    unet = UNet(config)
    schedule = ScheduleConfig(**DIGITS_SCHEDULE)
    settings = TrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, cond_drop=0.15, seed=args.seed
    )

    def progress(epoch: int, loss: float) -> None:
        print(f"epoch {epoch + 1}/{settings.epochs} loss {loss:.4f}", file=sys.stderr, flush=True)

    result = train_diffusion(
        unet, DDPMScheduler(schedule), to_model_space(split.train.images), split.train.labels, settings, progress
    )
    training = {
        "parameters": sum(p.numel() for p in unet.parameters()),
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "steps": result.steps,
        "seconds": result.seconds,
        "threads": args.threads,
        "final_loss": result.losses[-1],
        "losses": result.losses,
        "model_dir": str(args.model_dir),
    }
    save_diffusion_model(
        DiffusionModel(result.model, schedule, 16, 1, split.train.class_names, None, training), args.model_dir
    )
    merge_results({"training": training})
    print(json.dumps({k: v for k, v in training.items() if k != "losses"}, indent=2))


def digit_samples(model, labels: torch.Tensor, scale: float, args) -> torch.Tensor:
    """16x16 digits of `labels` at guidance `scale`, from the same seeded noise for every scale."""
    generator = torch.Generator().manual_seed(args.seed)
    samples = sample_diffusion(
        model.unet, model.schedule, (len(labels), 1, 16, 16), labels, scale, args.sampler, args.steps, 0.0, generator
    )
    return to_images(samples)


def part_guidance(args) -> None:
    torch.set_num_threads(args.threads)
    model = load_diffusion_model(args.model_dir)
    classifier = digits_classifier(16)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    rows = []
    PLOTS.mkdir(parents=True, exist_ok=True)
    for scale in GUIDANCE_SCALES:
        start = time.perf_counter()
        images = digit_samples(model, labels, scale, args)
        predicted = classifier.predict(images).argmax(-1)
        row = {
            "scale": scale,
            "accuracy": (predicted == labels).float().mean().item(),
            "classes_covered": int(predicted.unique().numel()),
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        # A row per digit, the first ten samples of each.
        shown = images.view(10, args.per_class, 1, 16, 16)[:, : min(10, args.per_class)].reshape(-1, 1, 16, 16)
        save_grid(shown, PLOTS / f"guidance_{scale:g}.png", columns=min(10, args.per_class))
    plot_accuracy(rows, PLOTS / "guidance_accuracy.png")
    merge_results(
        {
            "guidance": {
                "per_class": args.per_class,
                "sampler": args.sampler,
                "steps": args.steps,
                "model_dir": str(args.model_dir),
                "rows": rows,
            }
        }
    )


FID_SCALES = (0.0, 1.0, 3.0)


def part_fid(args) -> None:
    from genforge.vision.data import load_digits
    from genforge.vision.metrics import fid_from_images, inception_score

    torch.set_num_threads(args.threads)
    model = load_diffusion_model(args.model_dir)
    classifier = digits_classifier(16)
    reference = load_digits(16).test.images
    labels = torch.arange(10).repeat(args.per_class)  # classes interleaved: IS splits must each hold all ten
    rows = []
    for scale in FID_SCALES:
        images = digit_samples(model, labels, scale, args)
        score, _ = inception_score(classifier.predict(images), 10)
        rows.append(
            {
                "model": f"DDPM, guidance {scale:g}",
                "fid": fid_from_images(images, reference, classifier.embed),
                "inception_score": score,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    quality = RESULTS / "vision_quality.json"
    if quality.is_file():
        for entry in json.loads(quality.read_text()).get("rows", []):
            rows.append({"model": entry["model"], "fid": entry["fid"], "inception_score": entry["inception_score"]})
    merge_results({"fid": {"samples": len(labels), "sampler": args.sampler, "steps": args.steps, "rows": rows}})


def plot_accuracy(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot([row["scale"] for row in rows], [100 * row["accuracy"] for row in rows], marker="o")
    axis.axhline(10, color="grey", linestyle=":", label="chance")
    axis.set_xlabel("guidance scale s")
    axis.set_ylabel("conditional accuracy (%)")
    axis.set_title("Classifier-free guidance on digits 16x16")
    axis.set_ylim(0, 100)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def part_speed(args) -> None:
    import diffusers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    settings = {key: value for key, value in DIGITS_UNET.items()}
    reference = diffusers.UNet2DModel(**settings).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    directory = Path(args.scratch)
    reference.save_pretrained(directory, safe_serialization=True)
    ours = load_diffusers_unet(directory)
    schedule = ScheduleConfig(**DIGITS_SCHEDULE)
    pipelines = {
        "ddpm": diffusers.DDPMPipeline(reference, reference_scheduler(diffusers.DDPMScheduler, schedule)),
        "ddim": diffusers.DDIMPipeline(reference, reference_scheduler(diffusers.DDIMScheduler, schedule)),
    }
    for pipeline in pipelines.values():
        pipeline.set_progress_bar_config(disable=True)
    shape = (args.batch, 1, 16, 16)
    rows = []
    for sampler, steps in (("ddpm", args.ddpm_steps), ("ddim", args.ddim_steps)):

        def run_genforge(sampler: str = sampler, steps: int = steps) -> None:
            with torch.inference_mode():
                sample_diffusion(ours, schedule, shape, sampler=sampler, steps=steps, generator=torch.Generator())

        def run_diffusers(sampler: str = sampler, steps: int = steps) -> None:
            pipeline = pipelines[sampler]
            with torch.inference_mode():
                if sampler == "ddim":
                    pipeline(
                        batch_size=args.batch,
                        num_inference_steps=steps,
                        eta=0.0,
                        use_clipped_model_output=True,
                        output_type="np",
                    )
                else:
                    pipeline(batch_size=args.batch, num_inference_steps=steps, output_type="np")

        times = {"genforge": [], "diffusers": []}
        run_genforge(), run_diffusers()  # warm-up
        for _ in range(args.repeats):
            for name, run in (("genforge", run_genforge), ("diffusers", run_diffusers)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        ours_rate = args.batch / statistics.median(times["genforge"])
        theirs_rate = args.batch / statistics.median(times["diffusers"])
        row = {
            "sampler": sampler,
            "steps": steps,
            "genforge_images_per_s": ours_rate,
            "diffusers_images_per_s": theirs_rate,
            "ratio": ours_rate / theirs_rate,
            "genforge_seconds": times["genforge"],
            "diffusers_seconds": times["diffusers"],
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    merge_results(
        {
            "speed": {
                "batch": args.batch,
                "image_size": 16,
                "parameters": sum(p.numel() for p in ours.parameters()),
                "threads": args.threads,
                "max_output_difference": check_same_samples(ours, reference, schedule),
                "rows": rows,
            }
        }
    )


def reference_scheduler(cls, schedule: ScheduleConfig):
    """diffusers' scheduler `cls` with the settings of `schedule` it takes (DDPM has no
    `set_alpha_to_one`, DDIM no `variance_type`)."""
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{key: value for key, value in schedule.to_dict().items() if key in accepted})


def check_same_samples(ours: UNet, reference, schedule: ScheduleConfig) -> float:
    """Largest difference between genforge's and diffusers' DDIM samples from the same noise."""
    import diffusers

    generator = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        mine = sample_diffusion(ours, schedule, (4, 1, 16, 16), sampler="ddim", steps=10, generator=generator)
        noise = torch.randn((4, 1, 16, 16), generator=torch.Generator().manual_seed(7))
        scheduler = reference_scheduler(diffusers.DDIMScheduler, schedule)
        scheduler.set_timesteps(10)
        theirs = noise
        for timestep in scheduler.timesteps:
            output = reference(theirs, timestep).sample
            theirs = scheduler.step(output, timestep, theirs, use_clipped_model_output=True).prev_sample
    return (mine - theirs).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("speed", "train", "guidance", "fid"), required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/genforge_ddpm_digits16"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16, help="speed: images per sampling call")
    parser.add_argument("--ddpm-steps", type=int, default=100, help="speed: DDPM steps (a spaced subset of 1000)")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scratch", default="/tmp/genforge_vision_speed_unet")
    args = parser.parse_args(argv)
    {"speed": part_speed, "train": part_train, "guidance": part_guidance, "fid": part_fid}[args.part](args)


if __name__ == "__main__":
    main()
