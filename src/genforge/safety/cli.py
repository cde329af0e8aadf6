"""`genforge safety COMMAND`, registered by `genforge.cli`: one subcommand per safety tool.

Each command's module under `genforge.safety` owns it: `add_arguments(parser)` adds its flags and
`run(args) -> int` calls the library and reports; a bad value is the library's one-line error.
`SAFETY_COMMANDS` lists them, so a new tool plugs in with one entry, e.g.
`"moderate": SafetyCommand("moderate_cli", "classify text into moderation categories")` for
`genforge/safety/moderate_cli.py`. `defaults` are set on the subcommand's parser before
`add_arguments` runs (read with `parser.get_default`), so one module serves several names: the
PII module serves `scan`, `redact` and `restore`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SafetyCommand:
    """One `genforge safety NAME`: the module under `genforge.safety` that defines
    `add_arguments(parser)` and `run(args) -> int`, the line `--help` shows, and defaults set on
    the subcommand's parser before `add_arguments` runs."""

    module: str
    help: str
    defaults: Mapping[str, Any] = field(default_factory=dict)


# In the order `genforge safety --help` lists them.
SAFETY_COMMANDS: dict[str, SafetyCommand] = {
    "scan": SafetyCommand(
        "pii_cli", "find personal data (PII) in text: JSON lines of findings", {"pii_action": "scan"}
    ),
    "redact": SafetyCommand(
        "pii_cli", "replace personal data: mask, placeholder, pseudonym or reversible", {"pii_action": "redact"}
    ),
    "restore": SafetyCommand(
        "pii_cli", "put back what a reversible redaction replaced (needs its vault and key)", {"pii_action": "restore"}
    ),
    "injection": SafetyCommand(
        "guard_cli", "scan text for prompt injection and jailbreaks", {"guard_action": "injection"}
    ),
    "moderate": SafetyCommand(
        "guard_cli", "moderate text: violence, self-harm, sexual, hate, illicit", {"guard_action": "moderate"}
    ),
    "mia": SafetyCommand(
        "privacy_cli", "membership inference: how well an attacker tells training members from non-members"
    ),
    "redteam": SafetyCommand(
        "redteam_cli", "attack a model (templates x goals x mutations) and report attack success rates"
    ),
    "bias": SafetyCommand(
        "bias_cli",
        "measure bias: WEAT/SEAT effect sizes, CrowS-Pairs pseudo-log-likelihood, counterfactual log-likelihoods",
    ),
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge safety` and its subcommands to the top-level parser."""
    parser = sub.add_parser(
        "safety",
        help="guardrails and privacy: find and redact personal data, moderate text",
        description="Safety tools. Each is a subcommand with its own flags (genforge safety COMMAND --help); "
        "they read a file or stdin (-) and write results to stdout.",
        epilog="example: genforge safety redact notes.txt --style placeholder > redacted.txt",
    )
    commands = parser.add_subparsers(dest="safety_command", required=True, metavar="COMMAND")
    for name, command in SAFETY_COMMANDS.items():
        module = importlib.import_module(f"{__package__}.{command.module}")
        child = commands.add_parser(name, help=command.help)
        child.set_defaults(**command.defaults)
        module.add_arguments(child)
        child.set_defaults(func=module.run)


__all__ = ["SAFETY_COMMANDS", "SafetyCommand", "add_commands"]
