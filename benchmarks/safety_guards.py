"""Measure the guards: injection and moderation on the held-out sets in tests/data/safety, and
the time to scan a megabyte of hostile input (rules alone and with the classifier).

    PYTHONPATH=src python benchmarks/safety_guards.py

Prints Markdown tables (the numbers in docs/safety.md) and the machine they were taken on.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from genforge.safety.embedding_heads import binary_metrics
from genforge.safety.injection import InjectionDetector
from genforge.safety.moderation import CATEGORIES, Moderator

DATA = Path(__file__).parents[1] / "tests" / "data" / "safety"
MEGABYTE = 1_000_000


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def _row(name: str, m: dict) -> str:
    return (
        f"| {name} | {m['positives']} / {m['negatives']} | {m['roc_auc']:.3f} | {m['precision']:.3f} | "
        f"{m['recall']:.3f} |"
    )


def main() -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    detector, rules = InjectionDetector(), InjectionDetector(use_classifier=False)
    records = _records("injection_heldout.jsonl")
    labels = [r["label"] for r in records]
    results = detector.scan_many([r["text"] for r in records])
    rule_results = rules.scan_many([r["text"] for r in records])
    print("| injection detector (held out) | attacks / benign | ROC-AUC | precision | recall |")
    print("|---|---|---|---|---|")
    print(_row("rules + classifier", binary_metrics([r.score for r in results], labels, detector.threshold)))
    print(_row("classifier alone", binary_metrics([r.classifier_score for r in results], labels, detector.threshold)))
    print(_row("rules alone", binary_metrics([r.score for r in rule_results], labels, 0.5)))

    moderator = Moderator()
    records = _records("moderation_heldout.jsonl")
    results = moderator.moderate_many([r["text"] for r in records])
    print("\n| moderation category (held out) | positive / negative | ROC-AUC | precision | recall |")
    print("|---|---|---|---|---|")
    for category in CATEGORIES:
        labels = [int(category in r["categories"]) for r in records]
        metrics = binary_metrics([r.scores[category] for r in results], labels, moderator.thresholds[category])
        print(_row(f"{category} (threshold {moderator.thresholds[category]:.2f})", metrics))
    labels = [int(bool(r["categories"])) for r in records]
    print(_row("flagged (any category)", binary_metrics([float(r.flagged) for r in results], labels, 0.5)))

    hostile = {
        "one letter repeated": "a" * MEGABYTE,
        "'ignore your previous' repeated": "ignore your previous " * (MEGABYTE // 21),
        "quote characters": '"' * MEGABYTE,
        "combining-mark flood": "a" + "\u0301\u0316" * (MEGABYTE // 2),
        "binary garbage": os.urandom(MEGABYTE).decode("utf-8", "replace"),
        "whitespace only": " \n\t" * (MEGABYTE // 3),
    }
    detector.scan("warm up")
    moderator.moderate("warm up")
    print("\n| 1 MB of | rules (s) | rules + classifier (s) | moderation (s) | injection verdict |")
    print("|---|---|---|---|---|")
    for name, text in hostile.items():
        times = []
        for fn in (rules.scan, detector.scan, moderator.moderate):
            start = time.perf_counter()
            result = fn(text)
            times.append(time.perf_counter() - start)
            if fn == detector.scan:
                verdict = "flagged" if result.flagged else "clean"
        print(f"| {name} | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} | {verdict} |")


if __name__ == "__main__":
    main()
