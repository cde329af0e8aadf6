"""Uncertainty measures of a generator, calibrated and not, on a task with known answers.

A tiny decoder is trained on the spot for one- and two-digit sums ("a+b=", 0 <= a, b <= 99;
`tests/uncertainty_task.py`: 600 AdamW steps on 6,000 of the 10,000 problems) and answers
1,000 unseen ones greedily. Each answer gets a confidence from every measure of
`genforge.evaluate.uncertainty.MEASURES` (token entropy mean/max, sequence log-probability
sum/mean, agreement of 10 samples at temperature 1, discrete and likelihood-weighted
semantic entropy with exact-match clusters). The 1,000 are split in half: temperature
scaling (one scalar per measure, on the confidence's binary logit) is fitted on the
calibration half and every number is measured on the test half. ECE uses 15 equal-width
bins; AUROC is of confidence as a predictor of a right answer (unchanged by temperature
scaling, which is monotone).

    PYTHONPATH=src:tests python benchmarks/uncertainty.py   # writes benchmarks/results/uncertainty.{json,md,png}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src"), str(HERE.parent / "tests")]

from machine import describe, write_results  # noqa: E402
from uncertainty_task import decode, sum_problems, train_sum_model  # noqa: E402

from genforge.evaluate import calibration_from_confidences, reliability_diagram  # noqa: E402
from genforge.evaluate.uncertainty import (  # noqa: E402
    MEASURES,
    answer_confidences,
    auroc,
    fit_confidence_temperature,
    temperature_scaled_confidence,
)

NUM_EVAL, NUM_SAMPLES, SEED = 1000, 10, 0


def main() -> None:
    torch.manual_seed(SEED)
    problems = sum_problems(99, seed=SEED)
    started = time.perf_counter()
    model = train_sum_model(problems[:6000], steps=600, seed=SEED)
    train_s = time.perf_counter() - started
    evaluated = problems[6000 : 6000 + NUM_EVAL]
    started = time.perf_counter()
    results = answer_confidences(
        model,
        [p.prompt_ids for p in evaluated],
        lambda ids: decode(ids) or None,
        num_samples=NUM_SAMPLES,
        max_new_tokens=4,
        seed=SEED,
    )
    score_s = time.perf_counter() - started
    correct = np.array([r.answer == p.answer for r, p in zip(results, evaluated)])
    calibration, test = slice(0, NUM_EVAL // 2), slice(NUM_EVAL // 2, NUM_EVAL)

    rows = {}
    for measure in MEASURES:
        conf = np.array([r.confidences[measure] for r in results])
        temperature = fit_confidence_temperature(conf[calibration], correct[calibration])
        scaled = temperature_scaled_confidence(conf[test], temperature)
        before = calibration_from_confidences(conf[test], correct[test])
        after = calibration_from_confidences(scaled, correct[test])
        rows[measure] = {
            "auroc": auroc(conf[test], correct[test]),
            "ece": before.ece,
            "temperature": temperature,
            "ece_scaled": after.ece,
            "mean_confidence": float(conf[test].mean()),
            "mean_confidence_scaled": float(scaled.mean()),
        }
        if measure == "logprob_sum":
            reliability_diagram(
                before,
                HERE / "results" / "uncertainty-logprob_sum.png",
                title=f"p(answer), test half: ECE {before.ece:.3f}",
            )
            reliability_diagram(
                after,
                HERE / "results" / "uncertainty-logprob_sum-scaled.png",
                title=f"p(answer) temperature-scaled (T={temperature:.2f}): ECE {after.ece:.3f}",
            )

    accuracy = float(correct[test].mean())
    result = {
        "task": "a+b= for 0 <= a, b <= 99, 1000 unseen problems; calibration half / test half",
        "accuracy_test": accuracy,
        "num_samples": NUM_SAMPLES,
        "ece_bins": 15,
        "train_seconds": train_s,
        "score_seconds": score_s,
        "measures": rows,
        "machine": describe(),
    }
    lines = [
        "# Uncertainty measures on the sums task",
        "",
        f"Greedy accuracy on the test half: {accuracy:.3f} ({NUM_EVAL // 2} problems). "
        f"Temperature fitted on the other {NUM_EVAL // 2}. ECE with 15 bins.",
        "",
        "| measure | AUROC | ECE | T | ECE after scaling | mean conf. | mean conf. scaled |",
        "|---|---|---|---|---|---|---|",
    ]
    for measure, row in rows.items():
        lines.append(
            f"| {measure} | {row['auroc']:.3f} | {row['ece']:.3f} | {row['temperature']:.2f} | "
            f"{row['ece_scaled']:.3f} | {row['mean_confidence']:.3f} | {row['mean_confidence_scaled']:.3f} |"
        )
    machine = result["machine"]
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads, "
        f"torch {machine['torch']}. Training {train_s:.1f} s, scoring {score_s:.1f} s.",
        "Reliability diagrams of p(answer) before and after scaling: "
        "uncertainty-logprob_sum.png, uncertainty-logprob_sum-scaled.png.",
        "",
        "Reproduce: `PYTHONPATH=src:tests python benchmarks/uncertainty.py`.",
        "",
    ]
    write_results(HERE / "results", "uncertainty", result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
