"""`genforge concepts`: the generative-AI concepts genforge implements, where each lives, and a
demo of each (`genforge concepts show ID`)."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys

from ..console import stdout_console
from . import GROUPS, find_concept, load_concept_map, repository_root, resolve


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "concepts",
        help="the concepts genforge implements: code, tests, references, docs and a demo of each",
        description="List the generative-AI concepts genforge implements, grouped as the field teaches them, "
        "each with the code that implements it, the test that verifies it and against what, and its doc "
        "section. `genforge concepts show ID` explains one and runs its demo.",
    )
    parser.add_argument("--group", choices=GROUPS, help="only this group")
    parser.add_argument("--search", help="only concepts whose id, name or summary contains this text")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per concept) instead of a table")
    parser.set_defaults(func=_list)
    actions = parser.add_subparsers(dest="concepts_action", metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="explain one concept and run its demo",
        description="Print a concept's explanation, the code that implements it (file and line), the tests "
        "that verify it and the doc section, then run its demo (or, in a source checkout, its tests).",
    )
    show.add_argument("concept", help="a concept id, e.g. rope, lora, paged_attention")
    show.add_argument("--no-run", action="store_true", help="explain only; run neither the demo nor the tests")
    show.set_defaults(func=_show)


def _list(args: argparse.Namespace) -> int:
    concepts = [c for c in load_concept_map() if args.group in (None, c.group)]
    if args.search:
        needle = args.search.lower()
        concepts = [c for c in concepts if needle in f"{c.id} {c.name} {c.summary}".lower()]
    if args.json:
        print(json.dumps([concept.as_dict() for concept in concepts], indent=1))
        return 0
    from rich.table import Table

    table = Table(title=f"{len(concepts)} concepts", show_lines=False)
    for column in ("group", "id", "concept", "code", "verified against"):
        table.add_column(column, overflow="fold")
    for concept in concepts:
        table.add_row(concept.group, concept.id, concept.name, concept.code[0], concept.reference)
    from rich.console import Console

    # Piped output has no terminal width to follow: 160 columns keep a row to a line or two.
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)
    return 0


def _show(args: argparse.Namespace) -> int:
    concept = find_concept(args.concept)
    out = stdout_console.print
    out(f"[bold]{concept.name}[/bold]  ({concept.group} / {concept.id})\n")
    out(concept.summary.strip() + "\n")
    out("[bold]implemented by[/bold]")
    for reference in concept.code:
        out(f"  {reference}  {_location(reference)}")
    out("[bold]verified by[/bold]")
    for test in concept.tests:
        out(f"  {test}")
    out(f"  against: {concept.reference}")
    out(f"[bold]explained in[/bold] {concept.doc}")
    if concept.benchmark:
        out(f"[bold]measured by[/bold] {concept.benchmark}")
    if args.no_run:
        return 0
    if concept.demo:
        out(f"\n[bold]demo[/bold] ({concept.demo})")
        resolve(concept.demo)()
        return 0
    root = repository_root()
    command = [sys.executable, "-m", "pytest", "-q", *concept.tests]
    if root is None:
        out("\nno demo; in a source checkout, this runs its tests: " + " ".join(command[2:]))
        return 0
    out(f"\n[bold]demo[/bold]: running its tests ({' '.join(command[2:])})")
    return subprocess.call(command, cwd=root)


def _location(reference: str) -> str:
    try:
        target = inspect.unwrap(resolve(reference))
        path = inspect.getsourcefile(target)
        line = inspect.getsourcelines(target)[1]
    except (TypeError, OSError, ImportError, AttributeError):
        return ""
    root = repository_root()
    shown = str(path)
    if root is not None and shown.startswith(str(root)):
        shown = shown[len(str(root)) + 1 :]
    return f"[dim]({shown}:{line})[/dim]"
