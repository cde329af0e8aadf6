"""Every fine-tuning method on one task, measured side by side: full fine-tuning, LoRA, DoRA,
QLoRA, IA3, BitFit, bottleneck adapters, prompt tuning, P-tuning and prefix tuning, each with
the same base, data, steps, batch and seed, and what each trains, costs and reaches.

Everything is made on the spot, nothing is downloaded:

- the base: a small Llama-style decoder pretrained on standard-library source
  (`finetune_base.pretrain_base`), or a base made earlier (`--base DIR`);
- the task: a function's signature and the docstring's opening quotes -> its one-line summary
  (`genforge.finetune.tasks.docstring_task`), from the standard-library files the base was not
  pretrained on, only records that fit a row whole (the prompt methods' rows are shorter by
  their virtual tokens). Three disjoint splits: a held-out test set (every number below), a
  development set (only for choosing learning rates) and the training set.

Each run is `genforge.finetune.run.finetune` in its own process, so that the peak resident
memory is the method's own. Per method: the held-out loss before and after (nats per
completion token), greedy exact match after (the saved model, or the base with the saved
adapter put on it by `load_for_inference(base, adapter=...)`, as `genforge generate
--adapter` decodes), trainable parameters and their share, peak RSS, training tokens/s and
wall time.

Learning rates. The methods' default rates (`finetune.run.METHODS`) are the usual ones for
pretrained models of millions to billions of parameters; this base is tiny and briefly trained,
and full fine-tuning's 2e-5 barely moves it in a few hundred steps. So full fine-tuning and LoRA,
the pair the goal compares, each get a small sweep, chosen by the development set's loss
(never the test set's); DoRA and QLoRA take LoRA's chosen rate (the same parametrisation);
the other methods run at their defaults.

The goal (issue 16): LoRA at rank 8 reaches within 10% of full fine-tuning's held-out loss.
Beside it, two partial full fine-tunings (`DIAGNOSTICS`, off with --no-diagnostics) show where
a difference lies: only the layers LoRA adapts, at full rank, and only what LoRA leaves frozen.

    PYTHONPATH=src python benchmarks/finetune_methods.py   # writes benchmarks/results/finetune_methods.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from finetune_base import SEQ_LEN, add_base_arguments, fitting_records, pretrain_base, pretraining_files, read_base
from machine import describe, write_results
from torch import nn

from genforge.atomic import atomic_write_text
from genforge.finetune.run import METHODS, FinetuneConfig, Method, finetune
from genforge.finetune.tasks import docstring_task, exact_match, write_jsonl
from genforge.loading import load_for_inference
from genforge.tokenizer import Tokenizer

SEED = 0
VIRTUAL_TOKENS = 20  # the prompt methods' (FinetuneConfig's default)
GOAL_RATIO = 1.10  # LoRA r=8's held-out loss at most 10% above full fine-tuning's
ADAM_BYTES_PER_TRAINABLE = 4 + 4 + 8  # fp32 gradient, and AdamW's two fp32 moments


# ------------------------------------------------------------------------ where the gap comes from
def _train_block_linears(model: nn.Module, config, tokenizer) -> nn.Module:
    """Full-rank training of exactly the weights LoRA adapts here (every linear layer of the
    blocks): LoRA's ceiling at any rank."""
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, nn.Linear):
            module.weight.requires_grad_(True)
    return model


def _train_embeddings_and_norms(model: nn.Module, config, tokenizer) -> nn.Module:
    """Training only what LoRA leaves frozen: the token embedding (tied to the output head here)
    and the norms."""
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if name.startswith("embed_tokens.") or name.startswith("lm_head.") or name.endswith("norm.weight"):
            parameter.requires_grad_(True)
    return model


# Partial full fine-tuning, run beside the methods to show where full fine-tuning's advantage over
# LoRA lies. Registered (in the child process only) as methods of their own, saved as full is.
DIAGNOSTICS = {
    "full-block-linears": Method(_train_block_linears, METHODS["full"].save, METHODS["full"].lr, "model"),
    "full-embeddings-norms": Method(_train_embeddings_and_norms, METHODS["full"].save, METHODS["full"].lr, "model"),
}
DIAGNOSTIC_LABELS = {
    "full-block-linears": "full, only the layers LoRA adapts (block linears)",
    "full-embeddings-norms": "full, only what LoRA leaves frozen (embedding/head + norms)",
}


# ------------------------------------------------------------------------------ one run (child)
def run_one(spec: dict) -> dict:
    """One fine-tuning run as `spec` says, then its exact match on the test records. Runs in a
    process of its own (`--worker`): `peak_rss_mib` is this method's peak alone."""
    torch.set_num_threads(spec["threads"])
    rss_at_start = _peak_rss_mib()
    if spec["method"] in DIAGNOSTICS:
        METHODS[spec["method"]] = DIAGNOSTICS[spec["method"]]
    config = FinetuneConfig(
        model_dir=spec["base"],
        data=spec["train"],
        eval_data=spec["eval"],
        out_dir=spec["out_dir"],
        method=spec["method"],
        max_steps=spec["steps"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        warmup_steps=spec["steps"] // 10,
        seed=SEED,
        r=spec["r"],
        lora_alpha=spec["lora_alpha"],
        num_virtual_tokens=VIRTUAL_TOKENS,
        seq_len=SEQ_LEN - VIRTUAL_TOKENS if METHODS[spec["method"]].prompt else SEQ_LEN,
        progress=False,
    )
    # finetune() seeds the Trainer after the method is installed: without this, each process
    # starts torch's generator at a random seed and the adapter's initial weights differ by run.
    torch.manual_seed(SEED)
    result = finetune(config).to_json()
    # The run's own figure is getrusage's, which on Linux starts a child at its parent's peak
    # (kept across exec): this process's high-water mark is read instead.
    result["run_reported_peak_rss_mib"] = result["peak_rss_mib"]
    result["peak_rss_mib"] = _peak_rss_mib()
    result["rss_at_start_mib"] = rss_at_start
    if spec.get("exact_match_records"):
        started = time.perf_counter()
        records = [json.loads(line) for line in Path(spec["exact_match_records"]).read_text().splitlines()]
        if METHODS[spec["method"]].output == "model":  # full, BitFit: a whole model directory
            loaded = load_for_inference(result["output_dir"])
        else:
            loaded = load_for_inference(spec["base"], adapter=result["output_dir"])
        result["exact_match"] = exact_match(loaded.model, loaded.tokenizer, records)
        result["exact_match_seconds"] = time.perf_counter() - started
    return result


def _peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM where /proc has it (the high-water mark of
    this program's own address space), else getrusage's maximum."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def in_child(spec: dict, work: Path) -> dict:
    """`run_one(spec)` in a fresh Python process; its result."""
    name = Path(spec["out_dir"]).name
    spec_path, result_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), _src_dir()])))
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(result_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the {spec['method']} run failed:\n{completed.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def _src_dir() -> str:
    return str(Path(__file__).resolve().parents[1] / "src")


# ------------------------------------------------------------------------------- the benchmark
def make_task(base: Path, work: Path, held_out: int, train_examples: int) -> dict:
    """The docstring task from the files the base was not pretrained on, as three disjoint
    JSONL files: test (held out), dev (for choosing learning rates) and train."""
    tokenizer = Tokenizer.from_dir(base)
    records = docstring_task(None, exclude=pretraining_files(read_base(base)), seed=SEED)
    records = fitting_records(records, tokenizer, SEQ_LEN - VIRTUAL_TOKENS)
    if len(records) < 2 * held_out + 1:
        raise ValueError(f"only {len(records)} records fit a row; asked for {held_out} held out twice")
    test, dev, train = records[:held_out], records[held_out : 2 * held_out], records[2 * held_out :][:train_examples]
    longest = max(len(tokenizer.encode(record["completion"], add_special_tokens=False)) for record in test)
    return {
        "test": write_jsonl(test, work / "test.jsonl"),
        "dev": write_jsonl(dev, work / "dev.jsonl"),
        "train": write_jsonl(train, work / "train.jsonl"),
        "sizes": {"train": len(train), "dev": len(dev), "test": len(test), "available": len(records)},
        "max_new_tokens": longest + 4,  # room for a different split of the same text
        "example": test[0],
    }


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="finetune-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else work / "base"
    if (base / "config.json").is_file():
        print(f"reusing the base in {base}", flush=True)
        pretrained = read_base(base)
    else:
        print("pretraining the base model on standard-library source ...", flush=True)
        pretrained = pretrain_base(
            base, args.corpus_bytes, args.vocab, args.hidden, args.layers, args.pretrain_steps, seed=SEED
        )
        print(f"  {pretrained['parameters'] / 1e6:.2f}M parameters, {pretrained['seconds']:.0f}s", flush=True)
    pretrained = {key: value for key, value in pretrained.items() if key != "files"}
    task = make_task(base, work, args.held_out, args.train_examples)
    print(f"task: {task['sizes']}", flush=True)

    common = {
        "base": str(base),
        "train": str(task["train"]),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "r": args.r,
        "lora_alpha": args.lora_alpha,
        "max_new_tokens": task["max_new_tokens"],
    }

    # Learning rates for the compared pair, chosen on the development set.
    rates = {method: METHODS[method].lr for method in METHODS}
    sweep = []
    for method, candidates in (("full", args.full_lrs), ("lora", args.lora_lrs)):
        rates[method] = candidates[0]
        if method not in args.methods or len(candidates) < 2:
            continue
        for lr in candidates:
            spec = {
                **common,
                "method": method,
                "lr": lr,
                "eval": str(task["dev"]),
                "out_dir": str(work / f"sweep-{method}-{lr:g}"),
            }
            outcome = in_child(spec, work)
            sweep.append(
                {"method": method, "lr": lr, "dev_loss": outcome["val_loss_after"], "seconds": outcome["seconds"]}
            )
            print(f"  sweep {method} lr {lr:g}: dev loss {outcome['val_loss_after']:.3f}", flush=True)
        rates[method] = min((row for row in sweep if row["method"] == method), key=lambda row: row["dev_loss"])["lr"]
    rates["dora"] = rates["qlora"] = rates["lora"]
    rates |= {name: rates["full"] for name in DIAGNOSTICS}

    # Every method on the test set.
    rows = []
    for method in args.methods + (list(DIAGNOSTICS) if args.diagnostics and "full" in args.methods else []):
        spec = {
            **common,
            "method": method,
            "lr": rates[method],
            "eval": str(task["test"]),
            "out_dir": str(work / f"run-{method}"),
            "exact_match_records": str(task["test"]),
        }
        outcome = in_child(spec, work)
        outcome["lr"] = rates[method]
        outcome["diagnostic"] = method in DIAGNOSTICS
        outcome["parameters"] = _logical_parameters(outcome, pretrained["parameters"])
        outcome["share"] = outcome["trainable_parameters"] / outcome["parameters"]
        outcome["training_state_mib"] = _training_state_mib(outcome)
        rows.append(outcome)
        print(
            f"  {method} lr {rates[method]:<7g} held-out loss {outcome['val_loss_before']:.3f} -> "
            f"{outcome['val_loss_after']:.3f}, exact match {outcome['exact_match']:.1%}, "
            f"{outcome['share']:.2%} trained, peak RSS {outcome['peak_rss_mib']:.0f} MiB, "
            f"{outcome['seconds']:.0f}s",
            flush=True,
        )

    loaded = load_for_inference(base)
    test_records = [json.loads(line) for line in task["test"].read_text().splitlines()]
    base_match = exact_match(loaded.model, loaded.tokenizer, test_records)
    by_method = {row["method"]: row for row in rows}
    goal = None
    if "full" in by_method and "lora" in by_method:
        ratio = by_method["lora"]["val_loss_after"] / by_method["full"]["val_loss_after"]
        goal = {"lora_over_full": ratio, "target": GOAL_RATIO, "met": ratio <= GOAL_RATIO}
    return {
        "machine": describe() | {"cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "base": pretrained,
        "task": {
            "what": "stdlib function signature + opening quotes -> one-line docstring summary + closing quotes",
            "sizes": task["sizes"],
            "example": task["example"],
            "exact_match_max_new_tokens": task["max_new_tokens"],
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "no_write", "work", "worker")},
        "base_exact_match": base_match,
        "sweep": sweep,
        "learning_rates": {row["method"]: row["lr"] for row in rows},
        "rows": rows,
        "goal": goal,
        "seconds": time.perf_counter() - started,
    }


def _logical_parameters(row: dict, base_parameters: int) -> int:
    """The adapted model's parameters: the base's, plus the adapter's (what every method but
    full fine-tuning and BitFit adds). Counted here rather than taken from the run, whose total
    leaves out weights held as buffers (QLoRA's NF4 codes)."""
    added = 0 if row["method"] in ("full", "bitfit") or row["diagnostic"] else row["trainable_parameters"]
    return base_parameters + added


def _training_state_mib(row: dict) -> float:
    """fp32 weights, plus a gradient and AdamW's two moments per trainable parameter: the memory
    a method's training state needs, before activations (which depend on the batch, not the
    method). QLoRA's frozen NF4 weights (about half a byte each) are counted as fp32 too."""
    return (4 * row["parameters"] + ADAM_BYTES_PER_TRAINABLE * row["trainable_parameters"]) / 2**20


# --------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    machine, base, settings, task = result["machine"], result["base"], result["settings"], result["task"]
    sizes = task["sizes"]
    lines = [
        "# Fine-tuning methods side by side: the docstring task",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_capability']}), {machine['cores']} CPUs, "
        f"{machine['threads']} torch threads; torch {machine['torch']}, Python {machine['python']}.",
        f"Base: a {base['parameters'] / 1e6:.2f}M-parameter Llama-style decoder (hidden {base['hidden']}, "
        f"{base['layers']} layers, byte-level BPE of {base['vocab']} tokens) pretrained for {base['steps']} steps "
        f"on {base['corpus_tokens']:,} tokens of standard-library source.",
        f"Task: {task['what']}, from standard-library files outside the pretraining sample: {sizes['train']:,} "
        f"training, {sizes['dev']} development (learning rates only) and {sizes['test']} held-out test records.",
        f"Every method: {settings['steps']} steps of {settings['batch_size']} rows of {SEQ_LEN} tokens (packed; "
        f"the prompt methods one example per row of {SEQ_LEN - VIRTUAL_TOKENS} after {VIRTUAL_TOKENS} virtual "
        f"tokens), AdamW with {settings['steps'] // 10} warmup steps and cosine decay, seed {SEED}; LoRA, DoRA, "
        f"QLoRA r={settings['r']}, alpha {settings['lora_alpha']:g} on every linear layer of the blocks. Each run in "
        "its own process.",
        "",
        f"The base model's exact match on the test set: {result['base_exact_match']:.1%}.",
        "",
        "| method | lr | trainable | share | held-out loss before | after | exact match | peak RSS (MiB) | "
        "RSS growth (MiB) | weights + grads + AdamW (MiB) | tokens/s | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if row["diagnostic"]:
            continue
        lines.append(
            f"| {row['method']} | {row['lr']:g} | {row['trainable_parameters']:,} | {row['share']:.2%} | "
            f"{row['val_loss_before']:.3f} | {row['val_loss_after']:.3f} | {row['exact_match']:.1%} | "
            f"{row['peak_rss_mib']:.0f} | {row['peak_rss_mib'] - row['rss_at_start_mib']:.0f} | "
            f"{row['training_state_mib']:.2f} | {row['tokens_per_s']:,.0f} | {row['seconds']:.1f} |"
        )
    lines.append("")
    goal = result["goal"]
    if goal is not None:
        lines.append(
            f"**Goal: LoRA r={settings['r']}'s held-out loss / full fine-tuning's = {goal['lora_over_full']:.3f} "
            f"(target <= {goal['target']:.2f}): {'met' if goal['met'] else 'missed'}.**"
        )
        lines.append("")
    by_method = {row["method"]: row for row in result["rows"]}
    if "full" in by_method and any(row["diagnostic"] for row in result["rows"]):
        full = by_method["full"]
        lines += [
            "Where the difference lies: full fine-tuning of only part of the model, at full fine-tuning's rate.",
            "",
            "| trained | trainable | held-out loss after | / full fine-tuning's |",
            "|---|---:|---:|---:|",
        ]
        for name in ["full", "lora", *(row["method"] for row in result["rows"] if row["diagnostic"])]:
            if name in by_method:
                row = by_method[name]
                label = f"LoRA r={settings['r']}" if name == "lora" else DIAGNOSTIC_LABELS.get(name, name)
                lines.append(
                    f"| {label} | {row['trainable_parameters']:,} | {row['val_loss_after']:.3f} | "
                    f"{row['val_loss_after'] / full['val_loss_after']:.3f} |"
                )
        lines.append("")
    if result["sweep"]:
        lines += [
            "Learning-rate sweep (development-set loss after the same steps; the lowest is used above):",
            "",
            "| method | lr | dev loss |",
            "|---|---:|---:|",
        ]
        lines += [f"| {row['method']} | {row['lr']:g} | {row['dev_loss']:.3f} |" for row in result["sweep"]]
        lines.append("")
    lines += [
        "Losses are nats per completion token. Exact match: the greedy continuation of the prompt starts with "
        "the whole completion (summary and closing quotes). Peak RSS is the high-water mark (VmHWM) of the run's "
        "own process (Python, torch and the data included); RSS growth is above the mark once imported. At this model size both "
        "are dominated by the interpreter and torch: the weights + grads + AdamW column is the method's own "
        "training state in fp32 (QLoRA's NF4 base counted as fp32).",
        "",
        f"Whole script: {result['seconds']:.0f}s. Reproduce: `PYTHONPATH=src python benchmarks/finetune_methods.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_base_arguments(parser)
    parser.add_argument("--base", help="a base made by an earlier run (reused if it exists, else pretrained there)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--held-out", type=int, default=128, help="test records (and as many development records)")
    parser.add_argument("--train-examples", type=int, default=4000, help="at most this many training records")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step")
    parser.add_argument("--r", type=int, default=8, help="LoRA / DoRA / QLoRA rank")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument(
        "--full-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="swept when more than one"
    )
    parser.add_argument(
        "--no-diagnostics",
        dest="diagnostics",
        action="store_false",
        help="skip the partial full fine-tuning runs (LoRA's layers only; embeddings and norms only)",
    )
    parser.add_argument(
        "--lora-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="swept when more than one"
    )
    # One thread: at this size a step is many small products, which a second thread barely
    # speeds up and slows down several times when other jobs share the cores.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", help="where runs are written (default: a new temporary directory)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where the results go")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec_path, result_path = args.worker
        atomic_write_text(Path(result_path), json.dumps(run_one(json.loads(Path(spec_path).read_text()))))
        return 0
    result = run(args)
    text = markdown(result)
    print(text)
    if not args.no_write:
        write_results(args.out, "finetune_methods", result, text)
    return 0 if all(math.isfinite(row["val_loss_after"]) for row in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
