"""Alignment that visibly works, on an embedded task: multi-digit addition (`genforge.align.arithmetic`).

A small decoder is trained here from scratch to add, then briefly on sums from a buggy adder
that loses the carry out of the top column, so that its greedy answers are right on sums that
do not overflow and mostly wrong on those that do. Each alignment method then starts from that
base and reports the same `AlignmentReport`: greedy exact match on held-out problems before and
after, and the mean per-token KL of the aligned model to the base on its own samples of
held-out prompts (exact over the vocabulary).

Methods (`METHODS`): DPO on (correct > incorrect) pairs from the base's own samples, and GRPO
with the exact-match reward on groups of the model's own samples. A method is a function
(base_dir, out_dir, args) -> AlignmentReport ending with `arithmetic.evaluate_alignment`.

    python benchmarks/align_addition.py                 # 3 digits, a few minutes on a CPU
    python benchmarks/align_addition.py --digits 2      # the test's setting, under a minute

Writes benchmarks/results/align_addition.json and .md (with the machine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import describe, write_results

from genforge.align.arithmetic import (
    TASK_RECORD,
    AdditionTask,
    AlignmentReport,
    DPOSettings,
    GRPOSettings,
    PretrainSettings,
    accuracy_interval,
    dpo_on_addition,
    grpo_on_addition,
    pretrain_addition,
    read_task,
)

# The base per number of digits: 3 digits need a wider, deeper model and more steps to learn
# the task before the buggy-adder phase (measured on this benchmark's CPU).
BASES = {
    2: PretrainSettings(),
    3: PretrainSettings(hidden=128, layers=3, train_problems=20_000, steps=900, lr=3e-3),
}


# DPO's learning rate per number of digits: the 3-digit model is larger, and 3e-4 moved it far
# (KL 0.88 nats/token, 48% -> 59%) where 1e-4 moved it less and further up (KL 0.17, 49% -> 95%).
DPO_LR = {2: 3e-4, 3: 1e-4}


def run_dpo(base_dir: Path, out_dir: Path, args) -> AlignmentReport:
    lr = args.dpo_lr if args.dpo_lr is not None else DPO_LR[args.digits]
    settings = DPOSettings(prompts=args.dpo_prompts, beta=args.beta, lr=lr, steps=args.dpo_steps, seed=args.seed)
    return dpo_on_addition(base_dir, out_dir, settings, held_out=args.held_out)


def run_grpo(base_dir: Path, out_dir: Path, args) -> AlignmentReport:
    settings = GRPOSettings(steps=args.grpo_steps, lr=args.grpo_lr, seed=args.seed)
    return grpo_on_addition(base_dir, out_dir, settings, held_out=args.held_out)


# method name -> (base_dir, out_dir, args) -> AlignmentReport.
METHODS: dict[str, Callable[[Path, Path, argparse.Namespace], AlignmentReport]] = {"dpo": run_dpo, "grpo": run_grpo}


def markdown(result: dict) -> str:
    base = result["base"]
    lines = [
        f"# Alignment on {result['digits']}-digit addition",
        "",
        f"Base: {base['parameters']:,} parameters; dev accuracy after learning to add "
        f"{base['dev_accuracy_pretrained']:.1%}, after imitating the buggy adder {base['dev_accuracy']:.1%}; "
        f"{base['seconds']:.0f} s to train.",
        "",
        "| method | held-out accuracy before | after | gain | KL to base (nats/token) | seconds to align |",
        "|---|---|---|---|---|---|",
    ]
    for report in result["methods"]:
        lines.append(
            f"| {report['method']} | {report['accuracy_before']:.1%} | {report['accuracy_after']:.1%} "
            f"(±{report['interval_after']:.1%}) | {report['gain']:+.1%} | {report['kl_to_reference']:.3f} "
            f"| {report['seconds']:.0f} |"
        )
    lines.append("")
    for report in result["methods"]:
        before, after = report["details"]["accuracy_before_by_sum"], report["details"]["accuracy_after_by_sum"]
        lines.append(
            f"{report['method']}: sums that overflow {before['overflowing']:.1%} -> {after['overflowing']:.1%}, "
            f"sums that do not {before['not_overflowing']:.1%} -> {after['not_overflowing']:.1%}."
        )
    lines += [
        "",
        f"Held-out problems: {result['held_out']} (± is the 95% normal interval of the accuracy). The KL is "
        "exact over the vocabulary, averaged over every token the aligned model samples (temperature 1) for "
        "the held-out prompts.",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['threads']} threads, torch "
        f"{result['machine']['torch']}.",
        "",
        f"Command: `python benchmarks/align_addition.py --digits {result['digits']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=int, default=3, choices=sorted(BASES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--held-out", type=int, default=500, help="held-out problems to measure on")
    parser.add_argument("--dpo-prompts", type=int, default=DPOSettings.prompts)
    parser.add_argument("--dpo-steps", type=int, default=DPOSettings.steps)
    parser.add_argument("--dpo-lr", type=float, help="default: 3e-4 for 2 digits, 1e-4 for 3")
    parser.add_argument("--beta", type=float, default=DPOSettings.beta, help="DPO's beta")
    parser.add_argument("--grpo-steps", type=int, default=GRPOSettings.steps)
    parser.add_argument("--grpo-lr", type=float, default=GRPOSettings.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: these models are per-op overhead)"
    )
    parser.add_argument("--work", help="keep the base and the runs here (default: a temporary directory)")
    parser.add_argument(
        "--base", help="a base made before by this script (WORK/base), to align again without training it"
    )
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="align-addition-") as scratch:
        work = Path(args.work or scratch)
        if args.base is not None:
            base_dir = Path(args.base)
            base = json.loads((base_dir / TASK_RECORD).read_text())
            if read_task(base_dir).digits != args.digits:
                parser.error(f"{base_dir} is a {read_task(base_dir).digits}-digit base; pass --digits to match")
        else:
            base_dir = work / "base"
            settings = BASES[args.digits]
            settings.seed = args.seed
            base = pretrain_addition(base_dir, AdditionTask(digits=args.digits, seed=args.seed), settings)
        print(
            f"base: dev accuracy {base['dev_accuracy_pretrained']:.1%} -> {base['dev_accuracy']:.1%} "
            f"after the buggy adder ({base['seconds']:.0f} s)"
        )
        reports = []
        for name in args.methods:
            report = METHODS[name](base_dir, work / name, args)
            print(
                f"{name}: held-out accuracy {report.accuracy_before:.1%} -> {report.accuracy_after:.1%}, "
                f"KL {report.kl_to_reference:.3f} ({report.seconds:.0f} s)"
            )
            reports.append(
                report.to_json()
                | {"interval_after": accuracy_interval(report.accuracy_after, report.held_out_problems)}
            )
    result = {
        "digits": args.digits,
        "held_out": args.held_out,
        "base": base,
        "methods": reports,
        "seconds": time.perf_counter() - started,
        "machine": describe(),
        "threads": torch.get_num_threads(),
    }
    write_results(args.results, "align_addition", result, markdown(result))


if __name__ == "__main__":
    main()
