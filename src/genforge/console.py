"""The command line's console: progress, notes and errors on stderr, so that stdout carries
only a command's result and can be piped into another program.

`soft_wrap=True`: rich would otherwise break lines at the terminal width (80 columns when
stderr is not a terminal), splitting a message with a long path in the middle of a sentence.
A message is printed whole and the terminal, if any, wraps it.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False, soft_wrap=True)
# A command's result when it is formatted text (tables, explanations): stdout, found at print time.
stdout_console = Console(highlight=False, soft_wrap=True)


def print_error(message: object) -> None:
    """`error: <message>` on stderr, on one line; brackets in the message (paths, lists) are
    printed as they are, not read as rich markup."""
    console.print(f"[bold red]error:[/bold red] {escape(str(message))}")
