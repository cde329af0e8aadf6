"""Alignment steps, genforge against TRL in one run, on the same model, data and settings: the
DPO step against `DPOTrainer` and the GRPO step (generation + update) against `GRPOTrainer`.

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

GRPO, both sides: 8 prompts of `--grpo-prompt-tokens` random digits, 8 samples each (64
completions per step) of up to 64 new tokens at temperature 1, LoRA r=8 / alpha 16 on every
linear layer of the blocks, beta 0.04 (so each step also scores the samples under the
reference, the base with the adapter off), one update per rollout (TRL's defaults: loss
"dapo", rewards scaled per group), the same reward function (the share of digits in the
completion), float32. TRL generates with transformers' `generate` (its default without vLLM),
genforge with its own batched generator. A step's wall time is timed from its start to its
end (generation, reward, reference pass, forward, backward, optimizer), the first step left
out; each side reports its mean completion length, so that the work compared is the same.

    PYTHONPATH=src:tests python benchmarks/align.py   # writes benchmarks/results/align.{json,md}
    PYTHONPATH=src:tests python benchmarks/align.py --part grpo   # one half; the file keeps the other

The goals (issue 17): genforge's DPO step >= 1.5x TRL's tokens/s, peak memory <= TRL's; its
GRPO step >= 2x faster than TRL's.
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


# ------------------------------------------------------------------------------------- GRPO
GRPO_SAMPLES = 8
GRPO_NEW_TOKENS = 64
GRPO_BETA = 0.04


def prepare_grpo(directory: Path, args) -> None:
    rng = random.Random(1)
    with open(directory / "prompts.jsonl", "w") as handle:
        for _ in range(args.grpo_prompts):
            handle.write(
                json.dumps({"prompt": "".join(rng.choice("0123456789") for _ in range(args.grpo_prompt_tokens))})
            )
            handle.write("\n")


def digit_share(prompts, completions, **columns):
    """The reward of both sides: the share of a completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


def run_genforge_grpo(directory: Path, args) -> dict:
    import torch

    from genforge.align.grpo import GRPOConfig, train_grpo

    torch.set_num_threads(args.grpo_threads)
    out = directory / "genforge-grpo"
    config = GRPOConfig(
        out_dir=out,
        method="lora",
        prompts_per_step=args.grpo_prompts,
        samples_per_prompt=GRPO_SAMPLES,
        max_new_tokens=GRPO_NEW_TOKENS,
        temperature=1.0,
        beta=GRPO_BETA,
        lr=args.lr,
        max_steps=args.grpo_steps,
        target_modules=["qkv", "o", "gate_up", "down"],
        progress=False,
    )
    started = time.perf_counter()
    train_grpo(directory / "model", directory / "prompts.jsonl", [digit_share], config)
    total = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_seconds": [r["step_s"] for r in records],
        "generation_seconds": [r["generation_s"] for r in records],
        "completion_length": [r["completions/mean_length"] for r in records],
        "wall_s": total,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_trl_grpo(directory: Path, args) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.grpo_threads)
    model = AutoModelForCausalLM.from_pretrained(directory / "model", torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory / "model")
    dataset = load_dataset("json", data_files=str(directory / "prompts.jsonl"), split="train")
    times: list[float] = []
    lengths: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            times.append(time.perf_counter() - self.started)

        def on_log(self, *unused, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    rows = args.grpo_prompts * GRPO_SAMPLES
    config = GRPOConfig(
        output_dir=str(directory / "trl-grpo"),
        num_generations=GRPO_SAMPLES,
        per_device_train_batch_size=rows,
        generation_batch_size=rows,
        gradient_accumulation_steps=1,
        max_completion_length=GRPO_NEW_TOKENS,
        temperature=1.0,
        beta=GRPO_BETA,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        max_steps=args.grpo_steps,
        gradient_checkpointing=False,
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
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[digit_share],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    return {"step_seconds": times, "completion_length": lengths, "wall_s": total, "peak_rss_mib": peak_rss_mib()}


SIDES = {"genforge": run_genforge, "trl": run_trl, "genforge-grpo": run_genforge_grpo, "trl-grpo": run_trl_grpo}


def side(name: str, directory: Path, args) -> dict:
    command = [sys.executable, __file__, "--side", name, "--dir", str(directory)]
    command += [f"--{key.replace('_', '-')}={value}" for key, value in _settings(args).items()]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _settings(args) -> dict:
    keys = (
        "steps",
        "batch_size",
        "pairs",
        "prompt_tokens",
        "answer_tokens",
        "lr",
        "threads",
        "grpo_steps",
        "grpo_prompts",
        "grpo_prompt_tokens",
        "grpo_threads",
    )
    return {key: getattr(args, key) for key in keys}


def measure_dpo(directory: Path, args) -> dict:
    tokens_per_step = args.batch_size * 2 * (args.prompt_tokens + args.answer_tokens)
    sides = {}
    for name in ("genforge", "trl"):
        measured = side(name, directory, args)
        timed = measured["step_seconds"][1:]  # the first step warms up
        measured["tokens_per_s"] = tokens_per_step * len(timed) / sum(timed)
        # The fastest step: the least disturbed by other jobs on a shared machine.
        measured["best_step_tokens_per_s"] = tokens_per_step / min(timed)
        sides[name] = measured
    return {
        "settings": {key: getattr(args, key) for key in _settings(args) if not key.startswith("grpo")}
        | {"model": MODEL, "tokens_per_step": tokens_per_step},
        "sides": sides,
        "speedup": sides["genforge"]["tokens_per_s"] / sides["trl"]["tokens_per_s"],
        "best_step_speedup": sides["genforge"]["best_step_tokens_per_s"] / sides["trl"]["best_step_tokens_per_s"],
        "memory_ratio": sides["genforge"]["peak_rss_mib"] / sides["trl"]["peak_rss_mib"],
    }


def measure_grpo(directory: Path, args) -> dict:
    prepare_grpo(directory, args)
    sides = {}
    for name in ("genforge", "trl"):
        measured = side(f"{name}-grpo", directory, args)
        timed = measured["step_seconds"][1:]  # the first step warms up
        measured["mean_step_s"] = sum(timed) / len(timed)
        measured["best_step_s"] = min(timed)
        lengths = measured["completion_length"][1:] or measured["completion_length"]
        measured["mean_completion_length"] = sum(lengths) / len(lengths) if lengths else float("nan")
        sides[name] = measured
    return {
        "settings": {
            "steps": args.grpo_steps,
            "prompts": args.grpo_prompts,
            "samples_per_prompt": GRPO_SAMPLES,
            "prompt_tokens": args.grpo_prompt_tokens,
            "max_new_tokens": GRPO_NEW_TOKENS,
            "beta": GRPO_BETA,
            "lr": args.lr,
            "threads": args.grpo_threads,
            "model": MODEL,
        },
        "sides": sides,
        "speedup": sides["trl"]["mean_step_s"] / sides["genforge"]["mean_step_s"],
        "best_step_speedup": sides["trl"]["best_step_s"] / sides["genforge"]["best_step_s"],
        "memory_ratio": sides["genforge"]["peak_rss_mib"] / sides["trl"]["peak_rss_mib"],
    }


def dpo_markdown(dpo: dict) -> str:
    settings = dpo["settings"]
    rows = "\n".join(
        f"| {name} | {s['tokens_per_s']:,.0f} | {s['best_step_tokens_per_s']:,.0f} | {s['peak_rss_mib']:,.0f} | "
        f"{s['wall_s']:.1f} |"
        for name, s in dpo["sides"].items()
    )
    return (
        "## DPO step: genforge vs TRL DPOTrainer\n\n"
        f"LoRA r=8 on every linear layer, batch {settings['batch_size']} pairs of {settings['prompt_tokens']} + 2 x "
        f"{settings['answer_tokens']} tokens, {settings['steps']} steps (first left out), reference log-probs "
        "precomputed on both sides; Llama hidden 256, 4 layers, vocab 8192; float32, "
        f"{settings['threads']} threads.\n\n"
        "| side | tokens/s (mean) | tokens/s (fastest step) | peak RSS (MiB) | wall (s, incl. reference pass) |\n"
        "|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"genforge / TRL: **{dpo['speedup']:.2f}x** tokens/s over the timed steps, **{dpo['best_step_speedup']:.2f}x** "
        f"on each side's fastest step, **{dpo['memory_ratio']:.2f}x** peak memory (goal: >= 1.5x, <= 1.0x).\n"
    )


def grpo_markdown(grpo: dict) -> str:
    settings = grpo["settings"]
    rows = "\n".join(
        f"| {name} | {s['mean_step_s']:.2f} | {s['best_step_s']:.2f} | "
        + (
            f"{sum(s['generation_seconds'][1:]) / len(s['generation_seconds'][1:]):.2f}"
            if "generation_seconds" in s
            else "n/a"
        )
        + f" | {s['mean_completion_length']:.1f} | {s['peak_rss_mib']:,.0f} |"
        for name, s in grpo["sides"].items()
    )
    return (
        "## GRPO step: genforge vs TRL GRPOTrainer (transformers generation)\n\n"
        f"{settings['prompts']} prompts of {settings['prompt_tokens']} tokens x {settings['samples_per_prompt']} samples, "
        f"up to {settings['max_new_tokens']} new tokens at temperature 1; LoRA r=8 on every linear layer; beta "
        f"{settings['beta']} (a reference pass with the adapter off), one update per rollout, loss dapo; "
        f"{settings['steps']} steps (first left out); Llama hidden 256, 4 layers, vocab 8192; float32, "
        f"{settings['threads']} threads.\n\n"
        "| side | s/step (mean) | s/step (fastest) | of which generation (s) | completion tokens (mean) | "
        "peak RSS (MiB) |\n"
        "|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"genforge / TRL: **{grpo['speedup']:.2f}x** faster per step over the timed steps, "
        f"**{grpo['best_step_speedup']:.2f}x** on each side's fastest step, **{grpo['memory_ratio']:.2f}x** peak "
        "memory (goal: >= 2x).\n"
    )


def _earlier(path: Path) -> dict:
    """The results file as it is: each half is kept when only the other one runs."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if "sides" in earlier:  # the file before the GRPO half existed: DPO alone, at the top level
        earlier = {
            "dpo": {k: earlier[k] for k in ("settings", "sides", "speedup", "best_step_speedup", "memory_ratio")}
        }
    return earlier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "dpo", "grpo"), default="all")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grpo-steps", type=int, default=4)
    parser.add_argument("--grpo-prompts", type=int, default=8)
    parser.add_argument("--grpo-prompt-tokens", type=int, default=32)
    # One thread: on a shared 2-core machine a second OpenMP thread spends most of a small
    # decode step waiting at barriers for a core (measured 8x slower under a load of 10).
    parser.add_argument("--grpo-threads", type=int, default=1)
    parser.add_argument("--side", choices=tuple(SIDES))
    parser.add_argument("--dir", default="/tmp/genforge-bench-align")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    if args.side:
        print(json.dumps(SIDES[args.side](directory, args)))
        return 0
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    prepare(directory, args)
    import peft
    import transformers
    import trl
    from machine import describe, write_results

    result = _earlier(Path(args.out) / "align.json")
    if args.part in ("all", "dpo"):
        result["dpo"] = measure_dpo(directory, args)
    if args.part in ("all", "grpo"):
        result["grpo"] = measure_grpo(directory, args)
    load = os.getloadavg()
    result["machine"] = describe(trl=trl.__version__, peft=peft.__version__, transformers=transformers.__version__)
    result["load_average"] = [round(x, 2) for x in load]
    m = result["machine"]
    parts = [dpo_markdown(result["dpo"])] if "dpo" in result else []
    parts += [grpo_markdown(result["grpo"])] if "grpo" in result else []
    markdown = (
        "# Alignment steps: genforge vs TRL\n\n"
        + "\n".join(parts)
        + f"\nMachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, TRL {m['trl']}, PEFT {m['peft']}, "
        f"transformers {m['transformers']}; load average {load[0]:.1f} at the end of the last run ({args.part}) "
        "(shared with other jobs: noisy; each ratio comes from one run, both sides measured back to back).\n\n"
        "Reproduce: `PYTHONPATH=src:tests python benchmarks/align.py [--part dpo|grpo]`.\n"
    )
    write_results(args.out, "align", result, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
