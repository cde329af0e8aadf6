"""`genforge safety moderate FILE|-` and `genforge safety injection FILE|-` (the prompt-injection
scan; `scan_reports` gives the same reports to `genforge safety scan`).

For the `genforge safety` registry (safety/cli.py) the module has `add_arguments(parser)` and
`run(args) -> int`, which serve both commands by the ``guard_action`` default the registry sets
(``"moderate"`` or ``"injection"``); ``add_*_arguments`` and ``run_*`` are each command alone. Input is a file or ``-`` (stdin), read as bytes and decoded as UTF-8
with undecodable bytes replaced, so binary garbage gets a result rather than a traceback; with
``--lines`` each non-blank line is a separate text. Output is a readable table, or JSON Lines
with ``--json``. The exit status is 0 when nothing is flagged and 1 when something is, so a
script can gate on it.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = [
    "add_arguments",
    "run",
    "add_moderate_arguments",
    "run_moderate",
    "add_scan_arguments",
    "run_scan",
    "scan_reports",
    "read_texts",
]
GUARD_ACTIONS = ("moderate", "injection")


def read_texts(source: str, lines: bool) -> list[tuple[str, str]]:
    """(label, text) pairs from a file or ``-``: the whole input, or each non-blank line."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else open(source, "rb").read()
    except OSError as err:
        raise ValueError(f"cannot read {source}: {err.strerror}") from None
    text = data.decode("utf-8", errors="replace")
    name = "stdin" if source == "-" else source
    if not lines:
        return [(name, text)]
    return [(f"{name}:{n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="FILE|-", help="text to check; - reads stdin")
    parser.add_argument("--lines", action="store_true", help="check each non-blank line as its own text")
    parser.add_argument("--json", action="store_true", help="one JSON object per text instead of a table")


def add_moderate_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="CATEGORY=P",
        help="override a category's threshold (repeatable), e.g. violence=0.7",
    )


def _thresholds(values: list[str]) -> dict[str, float]:
    thresholds = {}
    for value in values:
        category, sep, number = value.partition("=")
        try:
            thresholds[category] = float(number)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--threshold takes CATEGORY=P with P in (0, 1], got {value!r}")
    return thresholds


def run_moderate(args) -> int:
    from .moderation import CATEGORIES, Moderator

    moderator = Moderator(thresholds=_thresholds(args.threshold))
    texts = read_texts(args.input, args.lines)
    results = moderator.moderate_many([t for _, t in texts])
    for (label, _), result in zip(texts, results):
        if args.json:
            print(json.dumps({"input": label, **result.to_dict()}))
        else:
            scores = "  ".join(f"{c} {result.scores[c]:.2f}" for c in CATEGORIES)
            verdict = f"FLAGGED ({', '.join(result.flagged_categories)})" if result.flagged else "ok"
            notes = f"  [{'; '.join(result.notes)}]" if result.notes else ""
            print(f"{label}: {verdict}  {scores}{notes}")
    return 1 if any(r.flagged for r in results) else 0


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--rules-only", action="store_true", help="pattern rules only (no classifier, no model load)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="injection score that flags (default: the classifier's)"
    )


def scan_reports(texts: list[tuple[str, str]], rules_only: bool = False, threshold: float | None = None) -> list[dict]:
    """The injection scan of (label, text) pairs as dicts (`InjectionResult.to_dict` plus ``input``)."""
    from .injection import InjectionDetector

    detector = InjectionDetector(use_classifier=not rules_only, threshold=threshold)
    results = detector.scan_many([t for _, t in texts])
    return [{"input": label, **result.to_dict()} for (label, _), result in zip(texts, results)]


def run_scan(args) -> int:
    reports = scan_reports(read_texts(args.input, args.lines), args.rules_only, args.threshold)
    for report in reports:
        if args.json:
            print(json.dumps({"injection": report}))
            continue
        classifier = report["classifier_score"]
        scored = f"score {report['score']:.2f}" + (f" (classifier {classifier:.2f})" if classifier is not None else "")
        verdict = f"INJECTION ({', '.join(report['categories']) or 'classifier'})" if report["flagged"] else "ok"
        extras = [f"rule {h['rule']}{' (quoted)' if h['quoted'] else ''} in {h['view']}" for h in report["rule_hits"]]
        extras += [f"trick {name}" for name in report["tricks"]] + report["notes"]
        print(f"{report['input']}: {verdict}  {scored}" + (f"  [{'; '.join(extras)}]" if extras else ""))
    return 1 if any(r["flagged"] for r in reports) else 0


def _action(value) -> str:
    if value not in GUARD_ACTIONS:
        raise ValueError(f"guard_action {value!r} is not one of {', '.join(GUARD_ACTIONS)}; set it in SAFETY_COMMANDS")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `genforge safety moderate` or `injection`, by the parser's ``guard_action`` default."""
    if _action(parser.get_default("guard_action")) == "moderate":
        add_moderate_arguments(parser)
    else:
        add_scan_arguments(parser)


def run(args) -> int:
    return run_moderate(args) if _action(getattr(args, "guard_action", None)) == "moderate" else run_scan(args)
