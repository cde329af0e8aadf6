"""`genforge export gguf`, registered by `genforge.cli`.

Each command parses its flags, calls `genforge.quantize` and prints what it wrote as JSON on
stdout; notes go to stderr.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from ..console import console


def cmd_export_gguf(args) -> int:
    from rich.markup import escape

    from .gguf_export import export_gguf

    result = export_gguf(
        args.model, args.out, args.type, pre_tokenizer=args.pre_tokenizer, show_progress=console.is_terminal
    )
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    report = {
        "path": str(result.path),
        "architecture": result.architecture,
        "type": result.type,
        "bytes": result.num_bytes,
        "tensors": dict(sorted(Counter(result.tensor_types.values()).items())),
        "pre_tokenizer": result.pre_tokenizer,
    }
    print(json.dumps(report, indent=2))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge export ...` to the top-level parser."""
    from .gguf_export import GGUF_TYPES, SUPPORTED_GGUF_FAMILIES

    export = sub.add_parser(
        "export", help="export a model for another runtime", description="Export a model for another runtime."
    )
    export_sub = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    gguf = export_sub.add_parser(
        "gguf",
        help="one GGUF file for llama.cpp, ollama and LM Studio",
        description="Write a Hugging Face model directory (config.json, safetensors, tokenizer.json) as one GGUF "
        f"file for llama.cpp, ollama and LM Studio. Families: {', '.join(SUPPORTED_GGUF_FAMILIES)}. "
        "See docs/compression.md, 'Export to GGUF'.",
    )
    gguf.add_argument("--model", required=True, help="Hugging Face model directory")
    gguf.add_argument("--out", required=True, help="the .gguf file to write")
    gguf.add_argument(
        "--type",
        default="f16",
        choices=GGUF_TYPES,
        help="weight type: f32, f16 (default), q8_0 (8.5 bits per weight) or q4_0 (4.5); norms stay f32",
    )
    gguf.add_argument(
        "--pre-tokenizer",
        default=None,
        help="llama.cpp's name for the tokenizer's pre-tokenizer, where it cannot be read off tokenizer.json",
    )
    gguf.set_defaults(func=cmd_export_gguf)
