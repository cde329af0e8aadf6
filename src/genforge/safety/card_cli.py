"""`genforge model-card --model DIR`: write a Hugging Face model card from the run's records."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "model-card",
        help="write a Hugging Face model card (README.md) from a model and its run's records",
        description="Write README.md with Hub metadata: architecture and size, training steps and losses, "
        "evaluation, bias/red-team/privacy figures found beside the model, and intended-use text to edit.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="the model directory (config.json, weights)")
    parser.add_argument("--run", default=None, metavar="DIR", help="the run directory (default: the model's parent)")
    parser.add_argument("--out", default=None, help="where to write (default: DIR/README.md)")
    parser.add_argument("--license", default="other", help="the licence identifier for the metadata")
    parser.add_argument("--base-model", default=None, help="the Hub id of the model this one was trained from")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..console import console
    from .model_card import write_model_card

    path = write_model_card(args.model, args.out, run_dir=args.run, license=args.license, base_model=args.base_model)
    console.print(f"wrote {path}: edit the paragraphs marked EDIT before publishing")
    return 0
