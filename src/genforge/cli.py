"""The `genforge` command: a thin view over the library.

Each subsystem keeps its commands beside its code and adds them here; each command parses
its flags, calls one library function and prints what happened:

    quickstart                               genforge/quickstart.py
    generate, chat, convert, watermark       genforge/generate/cli.py
    tokenizer, data, pretrain, size          genforge/train/cli.py
    finetune, merge-models, merge-adapter    genforge/finetune/cli.py
    eval                                     genforge/evaluate/cli.py
    quantize, prune, export                  genforge/quantize/cli.py
    align                                    genforge/align/cli.py
    rag                                      genforge/rag/cli.py
    agent                                    genforge/agents/cli.py
    prompt                                   genforge/prompting/cli.py
    safety                                   genforge/safety/cli.py
    model-card                               genforge/safety/card_cli.py
    vision                                   genforge/vision/cli.py
    serve, bench                             genforge/serve/cli.py
    registry                                 genforge/ops/registry_cli.py
    monitor                                  genforge/ops/monitor_cli.py
    concepts                                 genforge/concepts/cli.py

Results go to stdout, everything else (progress, notes, errors) to stderr through
`genforge.console`.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import quickstart
from .agents import cli as agents_cli
from .align import cli as align_cli
from .concepts import cli as concepts_cli
from .console import console, print_error
from .evaluate import cli as evaluate_cli
from .finetune import cli as finetune_cli
from .generate import cli as generate_cli
from .ops import monitor_cli, registry_cli
from .prompting import cli as prompting_cli
from .quantize import cli as quantize_cli
from .rag import cli as rag_cli
from .safety import card_cli
from .safety import cli as safety_cli
from .serve import cli as serve_cli
from .train import cli as train_cli
from .vision import cli as vision_cli

# In the order `genforge --help` lists them.
SUBSYSTEMS = (
    quickstart,
    generate_cli,
    train_cli,
    finetune_cli,
    align_cli,
    evaluate_cli,
    quantize_cli,
    rag_cli,
    agents_cli,
    prompting_cli,
    safety_cli,
    card_cli,
    vision_cli,
    serve_cli,
    registry_cli,
    monitor_cli,
    concepts_cli,
)

# Exit status of a command whose reader closed stdout early: 128 + SIGPIPE, as a shell reports
# for `cat`, `yes` or `seq` in `... | head`.
EXIT_STDOUT_CLOSED = 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genforge",
        description="genforge: the generative-AI stack in one codebase: train, load Hugging Face checkpoints, "
        "decode, serve (OpenAI-compatible), retrieve with citations and evaluate. Each command has --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for subsystem in SUBSYSTEMS:
        subsystem.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        # Output small enough to sit in stdout's buffer meets a closed pipe only here, not at exit.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_STDOUT_CLOSED
    # A user's mistake (a bad flag value, a missing or unreadable file) is one line, not a traceback.
    except (ValueError, OSError) as err:
        print_error(err)
        return 2
    except KeyboardInterrupt:
        console.print("[dim]interrupted[/dim]")
        return 130


def _silence_stdout() -> None:
    """The reader of stdout (`head`, `grep -m1`) closed the pipe: stop quietly.

    Point stdout at /dev/null, so that the interpreter's last flush of what is still buffered
    does not raise a second BrokenPipeError at exit (the recipe of Python's `signal` docs;
    restoring SIGPIPE's default instead would also kill `genforge serve` when a client leaves).
    """
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (a test's capture): nothing to flush there
        pass


if __name__ == "__main__":
    sys.exit(main())
