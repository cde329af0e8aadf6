"""Catastrophic forgetting and its remedies, measured: a small model fine-tuned on task A, then
on task B three ways (no remedy, experience replay, elastic weight consolidation), with task A's
held-out loss before and after B and task B's held-out loss for each.

Everything is made on the spot, nothing is downloaded:

- base model: a byte-level BPE tokenizer and a small Llama-style decoder, pretrained for a
  fixed number of steps on a deterministic sample of the Python standard library's source
  (`finetune_base.pretrain_base`);
- task A, arithmetic: "37+45=" -> "82" (two-digit sums);
- task B, documentation: a standard-library function's signature ("def quote(string, safe='/',
  ...):") and the docstring's opening quotes -> its one-line summary and the closing quotes
  (`genforge.finetune.tasks.docstring_task`, from files the base was not pretrained on).

Each task is a prompt/completion JSONL file with a seeded 10% held-out split (the same split in
every run: `finetune.run.split_held_out` with one seed). Every stage is a `genforge finetune`
run through the library (`finetune.run.finetune`, full fine-tuning):

    A:              --data a.jsonl --save-fisher                              (writes A/fisher.safetensors)
    B, no remedy:   --model A/model --data b.jsonl
    B, replay:      --model A/model --data b.jsonl --replay-data a.jsonl --replay-share S
    B, EWC:         --model A/model --data b.jsonl --ewc-fisher A/fisher.safetensors --ewc-strength L

The held-out losses are mean next-token losses per target (completion) token
(`finetune.continual.task_loss`), with their perplexity; "forgotten" is A's loss after B minus
after A. The EWC Fisher is the per-example empirical Fisher over 256 of A's training examples.

    PYTHONPATH=src python benchmarks/forgetting.py     # writes benchmarks/results/forgetting.{json,md}
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from finetune_base import SEQ_LEN, add_base_arguments, fitting_records, pretrain_base, pretraining_files, read_base
from machine import describe, write_results

from genforge.checkpoint import load_model
from genforge.finetune import SFTDataset, SFTRows
from genforge.finetune.continual import task_loss
from genforge.finetune.run import FinetuneConfig, finetune, split_held_out
from genforge.finetune.tasks import docstring_task, write_jsonl

EVAL_FRACTION = 0.1
SEED = 0


# ---------------------------------------------------------------------------------- the tasks
def arithmetic_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        records.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return records


def docstring_records(count: int, base: Path, seed: int) -> list[dict]:
    """`count` of the documentation task's records (`finetune.tasks.docstring_task`) from the
    standard-library files the base was not pretrained on, each short enough for a row."""
    from genforge.tokenizer import Tokenizer

    records = docstring_task(None, exclude=pretraining_files(read_base(base)), seed=seed)
    return fitting_records(records, Tokenizer.from_dir(base), SEQ_LEN)[:count]


# ------------------------------------------------------------------------------- measurement
def held_out_rows(model_dir: Path, data: Path) -> SFTRows:
    """The held-out split of `data` that every fine-tuning run here leaves out, as rows."""
    from genforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    examples = SFTDataset.from_jsonl(data, tokenizer, max_length=SEQ_LEN).examples
    _, held = split_held_out(examples, EVAL_FRACTION, SEED)
    return SFTRows(held, SEQ_LEN, tokenizer.pad_token_id, packing=False)


def score(model_dir: Path, rows: SFTRows) -> dict:
    model = load_model(model_dir, dtype=torch.float32)
    batches = (rows.batch(range(i, min(i + 32, len(rows)))) for i in range(0, len(rows), 32))
    return task_loss(model, batches)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="forgetting-"))
    started = time.perf_counter()
    base = work / "base"
    print("pretraining the base model on standard-library source ...", flush=True)
    pretrained = pretrain_base(
        base, args.corpus_bytes, args.vocab, args.hidden, args.layers, args.pretrain_steps, seed=SEED
    )
    del pretrained["files"]  # the sample is the same for every run with these settings
    print(f"  {pretrained['parameters'] / 1e6:.2f}M parameters, {pretrained['seconds']:.0f}s", flush=True)
    task_a = write_jsonl(arithmetic_records(args.examples, SEED), work / "a.jsonl")
    task_b = write_jsonl(docstring_records(args.examples, base, SEED), work / "b.jsonl")
    rows_a, rows_b = held_out_rows(base, task_a), held_out_rows(base, task_b)

    common = dict(
        method="full",
        seq_len=SEQ_LEN,
        eval_fraction=EVAL_FRACTION,
        seed=SEED,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.steps // 10,
        progress=False,
    )
    print(f"task A (arithmetic): {args.steps} steps of full fine-tuning ...", flush=True)
    run_a = finetune(
        FinetuneConfig(
            model_dir=base, data=task_a, out_dir=work / "A", max_steps=args.steps, save_fisher=True, **common
        )
    )
    after_a = run_a.output_dir
    fisher = work / "A" / "fisher.safetensors"
    rows = [
        {"model": "base (pretrained)", **_scores(base, rows_a, rows_b)},
        {"model": "after A", **_scores(after_a, rows_a, rows_b), "seconds": run_a.seconds},
    ]
    remedies = {
        "B, no remedy": {},
        f"B, replay {args.replay_share:.0%} of A": {"replay_data": task_a, "replay_share": args.replay_share},
        **{f"B, EWC strength {s:g}": {"ewc_fisher": fisher, "ewc_strength": s} for s in args.ewc_strength},
    }
    for number, (label, options) in enumerate(remedies.items()):
        print(f"{label}: {args.steps} steps ...", flush=True)
        run_b = finetune(
            FinetuneConfig(
                model_dir=after_a, data=task_b, out_dir=work / f"B{number}", max_steps=args.steps, **common, **options
            )
        )
        rows.append({"model": label, **_scores(run_b.output_dir, rows_a, rows_b), "seconds": run_b.seconds})
        print(f"  A held-out loss {rows[-1]['a_loss']:.3f}, B held-out loss {rows[-1]['b_loss']:.3f}", flush=True)
    a_after = rows[1]["a_loss"]
    for row in rows[2:]:
        row["a_forgotten"] = row["a_loss"] - a_after
    return {
        "machine": describe() | {"cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "base": pretrained,
        "tasks": {
            "A": {
                "what": "two-digit sums, '37+45=' -> '82'",
                "examples": _count_lines(task_a),
                "held_out_examples": rows_a.num_examples,
            },
            "B": {
                "what": "stdlib function signature -> its docstring summary",
                "examples": _count_lines(task_b),
                "held_out_examples": rows_b.num_examples,
            },
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "no_write")},
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _scores(model_dir: Path, rows_a: SFTRows, rows_b: SFTRows) -> dict:
    a, b = score(model_dir, rows_a), score(model_dir, rows_b)
    return {"a_loss": a["loss"], "a_ppl": a["ppl"], "b_loss": b["loss"], "b_ppl": b["ppl"]}


def markdown(result: dict) -> str:
    machine, base, settings = result["machine"], result["base"], result["settings"]
    rows, tasks = result["rows"], result["tasks"]
    plain = next(row for row in rows if row["model"] == "B, no remedy")
    lines = [
        "# Forgetting: task A's held-out loss before and after fine-tuning on task B",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_capability']}), {machine['cores']} CPUs, "
        f"{machine['threads']} torch threads; torch {machine['torch']}, Python {machine['python']}.",
        f"Base: a {base['parameters'] / 1e6:.2f}M-parameter Llama-style decoder (hidden {base['hidden']}, "
        f"{base['layers']} layers, byte-level BPE of {base['vocab']} tokens) pretrained for {base['steps']} steps "
        f"on {base['corpus_tokens']:,} tokens of standard-library source.",
        f"Task A: {tasks['A']['what']} ({tasks['A']['examples']} examples, {tasks['A']['held_out_examples']} "
        f"held out); task B: {tasks['B']['what']} ({tasks['B']['examples']} examples, "
        f"{tasks['B']['held_out_examples']} held out).",
        f"Each stage: full fine-tuning, {settings['steps']} steps of {settings['batch_size']} packed rows of "
        f"{SEQ_LEN} tokens, AdamW lr {settings['lr']:g} (warmup, cosine). Losses are nats per completion token "
        "on the held-out split.",
        "",
        "| model | A loss | A ppl | A forgotten | B loss | B ppl |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        forgotten = f"{row['a_forgotten']:+.3f}" if "a_forgotten" in row else ""
        lines.append(
            f"| {row['model']} | {row['a_loss']:.3f} | {row['a_ppl']:.2f} | {forgotten} | "
            f"{row['b_loss']:.3f} | {row['b_ppl']:.2f} |"
        )
    lines.append("")
    for row in rows[3:]:
        kept = 1 - row["a_forgotten"] / plain["a_forgotten"] if plain["a_forgotten"] > 0 else float("nan")
        lines.append(
            f"- {row['model']}: {kept:.0%} of the forgetting avoided; B's loss {row['b_loss'] - plain['b_loss']:+.3f} "
            "against no remedy."
        )
    lines += [
        "",
        f"Whole script: {result['seconds']:.0f}s. Reproduce: `PYTHONPATH=src python benchmarks/forgetting.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_base_arguments(parser)
    parser.add_argument("--examples", type=int, default=1000, help="examples per task (B has fewer: the stdlib's)")
    parser.add_argument("--steps", type=int, default=80, help="fine-tuning steps per stage")
    parser.add_argument("--batch-size", type=int, default=8, help="packed rows per fine-tuning step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--replay-share", type=float, default=0.25)
    parser.add_argument("--ewc-strength", type=float, nargs="+", default=[100.0, 1000.0, 10000.0])
    # One thread: at this size a step is many small products, which a second thread barely
    # speeds up and slows down several times when other jobs share the cores.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where forgetting.{json,md} go")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if not args.no_write:
        write_results(args.out, "forgetting", result, text)
    return 0 if all(math.isfinite(row["a_loss"]) for row in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
