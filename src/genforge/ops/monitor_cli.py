"""`genforge monitor report` (a drift report between two windows of records) and `genforge
monitor ab` (A/B significance from a server's outcome log); the integrator registers
`add_commands` in `genforge.cli`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..console import console

__all__ = ["add_commands", "cmd_report", "cmd_ab"]


def _alpha(value: str) -> float:
    try:
        alpha = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number between 0 and 1, got {value!r}") from None
    if not 0 < alpha < 1:
        raise argparse.ArgumentTypeError(f"alpha must lie strictly between 0 and 1, got {value}")
    return alpha


def cmd_report(args) -> int:
    from ..atomic import atomic_write_text
    from .drift import compare_windows
    from .records import read_records
    from .report import write_drift_report
    from .serving import embedder_from_name

    if Path(args.out).suffix.lower() not in (".html", ".htm", ".md"):
        raise ValueError(f"--out must end in .html or .md, got {args.out}")
    if args.permutations < 19:
        raise ValueError(f"--permutations must be >= 19, got {args.permutations}")
    reference, current = read_records(args.reference), read_records(args.current)
    embed = embedder_from_name(args.embedder)
    with console.status(f"testing {len(current)} current against {len(reference)} reference records"):
        report = compare_windows(
            reference, current, alpha=args.alpha, embed=embed, permutations=args.permutations, seed=args.seed
        )
        written = write_drift_report(report, args.out, title=args.title)
    for test, adjusted in zip(report.tests, report.adjusted_p_values):
        if adjusted is None:
            mark = f"PSI {test.details['level']}"
        else:
            mark = "[red]DRIFT[/red]" if adjusted < args.alpha else "ok"
        console.print(f"{test.feature:24s} {test.test:15s} stat {test.statistic:10.4g}  p {test.p_value:.3g}  {mark}")
    verdict = "[red]drift detected[/red]" if report.drifted else "no drift detected"
    family = sum(p is not None for p in report.adjusted_p_values)
    console.print(f"{verdict} (alpha {args.alpha}, Holm over {family} tests); wrote {written[0]}")
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2))
    return 1 if args.fail_on_drift and report.drifted else 0


def cmd_ab(args) -> int:
    from ..atomic import atomic_write_text
    from .ab import ab_compare, ab_markdown
    from .records import read_records

    comparisons = ab_compare(read_records(args.log), baseline=args.baseline, route=args.route)
    print(ab_markdown(comparisons, args.alpha))
    if args.json:
        atomic_write_text(args.json, json.dumps([c.to_dict(args.alpha) for c in comparisons], indent=2))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge monitor {report,ab}` to the top-level parser."""
    monitor = sub.add_parser(
        "monitor",
        help="drift reports and A/B significance from served traffic",
        description="Drift between two windows of requests, and A/B tests between routed versions "
        "(docs/operations.md).",
    )
    commands = monitor.add_subparsers(dest="monitor_command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="drift report (HTML or Markdown, with plots) of current records against reference records",
        description="Per-feature KS, PSI, chi-square and rate tests on prompts and replies, and an embedding "
        "MMD permutation test; Holm's correction over all tests. Records: JSONL with 'prompt' (and 'reply', "
        "'completion_tokens', 'guard_hit', 'judge_score'), e.g. an outcome log written with --log-text.",
    )
    report.add_argument("--reference", required=True, metavar="FILE", help="JSONL records of the reference window")
    report.add_argument("--current", required=True, metavar="FILE", help="JSONL records of the current window")
    report.add_argument("--out", required=True, metavar="FILE", help="report.html (self-contained) or report.md")
    report.add_argument("--json", default=None, metavar="FILE", help="also write every test as JSON")
    report.add_argument("--alpha", type=_alpha, default=0.05, help="significance level (default 0.05)")
    report.add_argument(
        "--embedder",
        default="minilm",
        metavar="minilm|none|DIR",
        help="prompt embeddings for the MMD test (default minilm, shipped offline; none skips the test)",
    )
    report.add_argument(
        "--permutations", type=int, default=1000, help="permutations of the MMD and PSI tests (default 1000)"
    )
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--title", default="Drift report")
    report.add_argument("--fail-on-drift", action="store_true", help="exit with status 1 when drift is detected")
    report.set_defaults(func=cmd_report)
    ab = commands.add_parser(
        "ab",
        help="significance of the difference between routed versions, from an outcome log",
        description="Each version of each route against the baseline: error rate, feedback, latency, "
        "completion tokens and truncation rate, with the tests of genforge.evaluate.stats.",
    )
    ab.add_argument("--log", required=True, metavar="FILE", help="the outcome log of genforge serve --outcome-log")
    ab.add_argument("--route", default=None, help="only this route (default: every route in the log)")
    ab.add_argument("--baseline", default=None, help="the version compared against (default: the most requested)")
    ab.add_argument("--alpha", type=_alpha, default=0.05, help="significance level (default 0.05)")
    ab.add_argument("--json", default=None, metavar="FILE", help="also write the comparisons as JSON")
    ab.set_defaults(func=cmd_ab)
