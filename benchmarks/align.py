"""The DPO step, genforge against TRL's `DPOTrainer`, on the same model, pairs and settings.

Made on the spot, nothing downloaded: a random Llama-layout decoder (hidden 256, 4 layers,
a 8192-token vocabulary) saved as a Hugging Face directory with a small byte-level BPE
tokenizer, and preference pairs whose prompt and answers are strings of random digits (one
token each), so that every pair is exactly `--prompt-tokens` + 2 x `--answer-tokens` tokens and
both sides process the same tokens per step whatever their batch order.

Both sides: DPO (sigmoid), beta 0.1, LoRA r=8 / alpha 16 on every linear layer of the blocks
(the reference: the base with the adapter off), AdamW at the same rate, the same batch, no
gradient checkpointing, float32, reference log-probabilities computed once before training
(TRL's `precompute_ref_log_probs=True`; its default recomputes them every step), dropout off.
Each side runs in its own process, so its peak resident memory (VmHWM) is its own. Tokens/s
counts the real tokens of the step's pairs (prompt + chosen and prompt + rejected) over the
wall time of the training steps, the first step (warm-up) left out.

    PYTHONPATH=src:tests python benchmarks/align.py   # writes benchmarks/results/align.{json,md}

The goal (issue 17): genforge's DPO step >= 1.5x TRL's tokens/s, peak memory <= TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src"), str(HERE.parent / "tests")]

MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=688, vocab_size=8192)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(directory: Path, args) -> None:
    """The model directory and the pairs file."""
    from finetune_shared import tiny_chat_model_dir

    tiny_chat_model_dir(directory / "model", seed=0, max_position_embeddings=512, **MODEL)
    rng = random.Random(0)

    def digits(count: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(count))

    with open(directory / "pairs.jsonl", "w") as handle:
        for _ in range(args.pairs):
            record = {
                "prompt": digits(args.prompt_tokens),
                "chosen": digits(args.answer_tokens - 1),  # + eos
                "rejected": digits(args.answer_tokens - 1),
            }
            handle.write(json.dumps(record) + "\n")


def run_genforge(directory: Path, args) -> dict:
    import torch

    from genforge.align.preference import PreferenceConfig, train_preferences

    torch.set_num_threads(args.threads)
    out = directory / "genforge-run"
    config = PreferenceConfig(
        model_dir=directory / "model",
        data=directory / "pairs.jsonl",
        out_dir=out,
        loss="dpo",
        method="lora",
        beta=0.1,
        lr=args.lr,
        max_steps=args.steps,
        batch_size=args.batch_size,
        eval_fraction=0.0,
        target_modules=["qkv", "o", "gate_up", "down"],
        progress=False,
    )
    started = time.perf_counter()
    train_preferences(config)
    total = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["tokens"] / r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return {"step_seconds": steps, "wall_s": total, "peak_rss_mib": peak_rss_mib()}


def run_trl(directory: Path, args) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(directory / "model", torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory / "model")
    dataset = load_dataset("json", data_files=str(directory / "pairs.jsonl"), split="train")
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            times.append(time.perf_counter() - self.started)

    config = DPOConfig(
        output_dir=str(directory / "trl-run"),
        beta=0.1,
        loss_type=["sigmoid"],
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        max_length=args.prompt_tokens + args.answer_tokens + 8,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    return {"step_seconds": times, "wall_s": total, "peak_rss_mib": peak_rss_mib()}


def side(name: str, directory: Path, args) -> dict:
    command = [sys.executable, __file__, "--side", name, "--dir", str(directory)]
    command += [f"--{key.replace('_', '-')}={value}" for key, value in _settings(args).items()]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _settings(args) -> dict:
    keys = ("steps", "batch_size", "pairs", "prompt_tokens", "answer_tokens", "lr", "threads")
    return {key: getattr(args, key) for key in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=("genforge", "trl"))
    parser.add_argument("--dir", default="/tmp/genforge-bench-align")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    if args.side:
        result = (run_genforge if args.side == "genforge" else run_trl)(directory, args)
        print(json.dumps(result))
        return 0
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    prepare(directory, args)
    tokens_per_step = args.batch_size * 2 * (args.prompt_tokens + args.answer_tokens)
    sides = {}
    for name in ("genforge", "trl"):
        measured = side(name, directory, args)
        timed = measured["step_seconds"][1:]  # the first step warms up
        measured["tokens_per_s"] = tokens_per_step * len(timed) / sum(timed)
        # The fastest step: the least disturbed by other jobs on a shared machine.
        measured["best_step_tokens_per_s"] = tokens_per_step / min(timed)
        sides[name] = measured
    import peft
    import transformers
    import trl
    from machine import describe, write_results

    speed = sides["genforge"]["tokens_per_s"] / sides["trl"]["tokens_per_s"]
    best = sides["genforge"]["best_step_tokens_per_s"] / sides["trl"]["best_step_tokens_per_s"]
    memory = sides["genforge"]["peak_rss_mib"] / sides["trl"]["peak_rss_mib"]
    load = os.getloadavg()
    result = {
        "machine": describe(trl=trl.__version__, peft=peft.__version__, transformers=transformers.__version__),
        "load_average": [round(x, 2) for x in load],
        "settings": _settings(args) | {"model": MODEL, "tokens_per_step": tokens_per_step},
        "sides": sides,
        "speedup": speed,
        "best_step_speedup": best,
        "memory_ratio": memory,
    }
    rows = "\n".join(
        f"| {name} | {s['tokens_per_s']:,.0f} | {s['best_step_tokens_per_s']:,.0f} | {s['peak_rss_mib']:,.0f} | "
        f"{s['wall_s']:.1f} |"
        for name, s in sides.items()
    )
    m = result["machine"]
    markdown = (
        "# DPO step: genforge vs TRL DPOTrainer\n\n"
        f"LoRA r=8 on every linear layer, batch {args.batch_size} pairs of {args.prompt_tokens} + 2 x "
        f"{args.answer_tokens} tokens, {args.steps} steps (first left out), reference log-probs precomputed on "
        f"both sides; Llama hidden 256, 4 layers, vocab 8192; float32, {args.threads} threads.\n\n"
        "| side | tokens/s (mean) | tokens/s (fastest step) | peak RSS (MiB) | wall (s, incl. reference pass) |\n"
        "|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"genforge / TRL: **{speed:.2f}x** tokens/s over the timed steps, **{best:.2f}x** on each side's fastest "
        f"step, **{memory:.2f}x** peak memory (goal: >= 1.5x, <= 1.0x).\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, TRL {m['trl']}, PEFT {m['peft']}, "
        f"transformers {m['transformers']}; load average {load[0]:.1f} (shared with other jobs: noisy).\n\n"
        "Reproduce: `PYTHONPATH=src:tests python benchmarks/align.py`.\n"
    )
    write_results(args.out, "align", result, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
