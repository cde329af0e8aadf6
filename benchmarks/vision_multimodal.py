"""CLIP and the LLaVA-style VLM on the bundled digits: quality reached and the training time.

CLIP (`genforge vision train clip` defaults: a 2-layer ViT on 16x16 digits with 4x4 patches and a
2-layer text transformer, width 64, 40 epochs) is measured by zero-shot accuracy on the test
split (prompt ensemble over the four caption templates) and image<->text recall@1 (a hit is a
retrieved item of the query's digit). The VLM (`genforge vision train vlm` defaults on that
CLIP's frozen image encoder: a 2-layer decoder of width 64, text-only pretraining, stage 1
projector-only on captions, stage 2 projector + LoRA on questions and captions) is measured by
the share of test images whose greedy answer to "which digit is this?" is exactly the digit's
name, after stage 1 and after stage 2, and by the share of generated captions naming the right
digit.

    python benchmarks/vision_multimodal.py     # writes benchmarks/results/vision_multimodal.{json,md}
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from machine import describe, write_results

from genforge.vision.clip import load_clip
from genforge.vision.clip_cli import CLIP_KIND, VLM_KIND, vlm_metrics
from genforge.vision.data import load_digits
from genforge.vision.vlm import train_vlm


def _flags(kind, **values) -> argparse.Namespace:
    """The kind's training flags at their defaults, as `genforge vision train KIND` parses them."""
    parser = argparse.ArgumentParser()
    for flag, default in (("--data", "digits"), ("--out", ""), ("--size", 16), ("--seed", 0)):
        parser.add_argument(flag, default=default, type=type(default))
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--labels", default=None)
    kind.add_train_arguments(parser)
    return argparse.Namespace(**{**vars(parser.parse_args([])), **values})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--keep", default=None, help="keep the trained models in this directory")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vision_multimodal_"))

    started = time.perf_counter()
    clip_dir = CLIP_KIND.train(_flags(CLIP_KIND, out=str(root / "clip"), seed=args.seed))
    clip_seconds = time.perf_counter() - started
    clip_metrics = CLIP_KIND.evaluate(clip_dir, argparse.Namespace())
    clip_settings = load_clip(clip_dir)[2]

    # The VLM trained through the library call the CLI makes, to also read stage 1's accuracy.
    split = load_digits(16)
    clip = load_clip(clip_dir)[0]
    flags = _flags(VLM_KIND, seed=args.seed)
    started = time.perf_counter()
    result = train_vlm(
        clip.vision,
        split.train.images,
        split.train.labels,
        split.train.class_names,
        hidden_size=flags.hidden,
        layers=flags.lm_layers,
        projector=flags.projector,
        pretrain_steps=flags.pretrain_steps,
        stage1_steps=flags.stage1_steps,
        stage2_steps=flags.stage2_steps,
        batch_size=flags.batch_size,
        lr=flags.lr,
        seed=args.seed,
        eval_images=split.test.images,
        eval_labels=split.test.labels,
    )
    vlm_seconds = time.perf_counter() - started
    vlm = vlm_metrics(result.model, result.tokenizer, split.test)

    record = {
        "clip": {
            **clip_metrics,
            "train_seconds": clip_settings["train_seconds"],
            "train_and_eval_seconds": clip_seconds,
            "final_loss": clip_settings["final_loss"],
            "config": clip_settings["config"],
        },
        "vlm": {
            "digit_accuracy_after_stage1": result.stage1_accuracy,
            **vlm,
            "stage_seconds": result.seconds,
            "train_seconds": sum(result.seconds.values()),
            "wall_seconds_with_stage1_eval": vlm_seconds,
            "final_losses": {stage: losses[-1] for stage, losses in result.losses.items()},
            "decoder": result.model.config.lm,
            "projector": result.model.config.projector,
        },
        "seed": args.seed,
        "test_images": len(split.test),
        "machine": describe(),
    }
    c, v = record["clip"], record["vlm"]
    lines = [
        "# CLIP and the LLaVA-style VLM on the digits",
        "",
        f"`python benchmarks/vision_multimodal.py` (seed {args.seed}; {len(split.test)} test images at 16x16; "
        f"{record['machine']['cores']} cores, torch threads: {record['machine']['threads']}; shared with other work, "
        "so times are indicative).",
        "",
        "| model | metric | value | training time |",
        "|---|---|---|---|",
        f"| CLIP | zero-shot accuracy (4-template ensemble) | {c['zero_shot_accuracy']:.1%} | "
        f"{c['train_seconds']:.0f} s |",
        f"| CLIP | image->text recall@1 (same digit) | {c['image_to_text_recall@1']:.1%} | |",
        f"| CLIP | text->image recall@1 (same digit) | {c['text_to_image_recall@1']:.1%} | |",
        f"| VLM | digit accuracy after stage 1 (projector only, captions) | {v['digit_accuracy_after_stage1']:.1%} | "
        f"{v['stage_seconds']['pretrain']:.0f} s pretrain + {v['stage_seconds']['stage1']:.0f} s |",
        f"| VLM | digit accuracy after stage 2 (projector + LoRA) | {v['digit_accuracy']:.1%} | "
        f"+ {v['stage_seconds']['stage2']:.0f} s |",
        f"| VLM | captions naming the right digit | {v['caption_accuracy']:.1%} | |",
        "",
    ]
    write_results(args.out, "vision_multimodal", record, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
