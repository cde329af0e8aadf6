"""`genforge` commands of this subsystem, registered by `genforge.cli.build_parser`."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this subsystem's subcommands to the top-level parser."""
