"""The `genforge serve` flags of `genforge.ops` (routing, outcome log, live drift monitor) and
the one call that installs them on a built app: `serve/cli.py` adds `add_serve_arguments(parser)`
to its parser and calls `install_from_args(app, args)` once the app is built."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .routing import SPEC_HELP, parse_route

__all__ = ["add_serve_arguments", "install_from_args", "embedder_from_name"]


def _route_spec(value: str) -> str:
    """argparse type of --route: the syntax is checked before any model loads (the names
    against the served models once they are)."""
    try:
        parse_route(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _records_file(value: str) -> str:
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value} (a JSONL of records with a 'prompt')")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("routing and monitoring (docs/operations.md)")
    group.add_argument(
        "--route",
        type=_route_spec,
        action="append",
        default=[],
        metavar="NAME=V1:W1,V2:W2",
        help=f"serve NAME from several served models by weight, sticky per user (the 'user' field) or API key: "
        f"{SPEC_HELP}; e.g. chat=v1:0.9,v2:0.1 (repeatable)",
    )
    group.add_argument(
        "--route-salt", default="", metavar="SALT", help="re-draw which users get which version (a new experiment)"
    )
    group.add_argument(
        "--outcome-log",
        default=None,
        metavar="FILE",
        help="append one JSON line per generation request (route, version, user hash, latency, tokens, finish "
        "reason) and per POST /v1/feedback; read by `genforge monitor ab` and `monitor report`",
    )
    group.add_argument(
        "--log-text",
        action="store_true",
        help="also log each prompt and reply text in --outcome-log (off by default: they may hold personal data)",
    )
    group.add_argument(
        "--monitor",
        action="store_true",
        help="test recent requests for drift against the first --monitor-window requests (Prometheus gauges "
        "genforge_drift_*)",
    )
    group.add_argument(
        "--monitor-reference",
        type=_records_file,
        default=None,
        metavar="FILE",
        help="the reference window for --monitor from a JSONL of records with a 'prompt' (an outcome log "
        "written with --log-text, or a prompt data set); implies --monitor",
    )
    group.add_argument("--monitor-window", type=int, default=200, help="recent requests compared (default 200)")
    group.add_argument("--monitor-every", type=int, default=50, help="requests between drift checks (default 50)")
    group.add_argument("--monitor-alpha", type=float, default=0.05, help="significance of a drift alert (default 0.05)")
    group.add_argument(
        "--monitor-embedder",
        default="none",
        metavar="none|minilm|DIR",
        help="embed prompts for the MMD test: minilm (the all-MiniLM-L6-v2 weights genforge ships) or a "
        "sentence-transformers directory (default none: the per-feature tests only)",
    )


def embedder_from_name(name: str | None):
    """``none`` -> None, ``minilm`` -> the shipped all-MiniLM-L6-v2, else a directory: an
    `embed(texts) -> (n, d)` function."""
    if name is None or name.lower() == "none":
        return None
    from ..rag.embedders import EncoderEmbedder

    try:
        embedder = EncoderEmbedder(None if name.lower() == "minilm" else name, max_tokens=128)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load the embedder {name!r} (none, minilm or a sentence-transformers directory): {err}"
        ) from None
    return embedder.embed


def install_from_args(app, args: argparse.Namespace) -> Any:
    """Install what the flags ask for on ``app`` (nothing when none is given); returns the hub."""
    from .traffic import install_ops

    wants_monitor = args.monitor or args.monitor_reference is not None
    if not (args.route or args.outcome_log or wants_monitor):
        return None
    if args.log_text and not args.outcome_log:
        raise ValueError("--log-text logs into --outcome-log FILE; give that too")
    monitor = None
    if wants_monitor:
        from .live_monitor import LiveMonitor
        from .records import read_records

        reference = read_records(args.monitor_reference) if args.monitor_reference else None
        state = app.state.server
        first = state.generation_models[0]
        tokenizer = state.tokenizers[first]
        monitor = LiveMonitor(
            reference,
            window=args.monitor_window,
            every=args.monitor_every,
            alpha=args.monitor_alpha,
            embed=embedder_from_name(args.monitor_embedder),
            tokenize=lambda text: tokenizer.encode(text, add_special_tokens=False),
        )
    return install_ops(
        app,
        routes=args.route or None,
        outcome_log=args.outcome_log,
        monitor=monitor,
        log_text=args.log_text,
        salt=args.route_salt,
    )
