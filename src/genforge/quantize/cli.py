"""Compression commands, registered by `genforge.cli`: `genforge prune` and `genforge export`.

Each command parses its flags, calls one library function and reports (what it wrote as JSON on
stdout, notes on stderr); a bad value is the library's one-line error.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ..console import console

# Calibration text by default: this much of the standard library's source, on every machine.
DEFAULT_CALIBRATION_BYTES = 400_000


def _calibration_text(path: str | None) -> str:
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"calibration file {path} does not exist") from None
    from ..quickstart import stdlib_source_files

    files = stdlib_source_files(DEFAULT_CALIBRATION_BYTES)
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def _method(value: str) -> str:
    from .prune import PruneError, parse_n_m

    if value in ("magnitude", "neurons", "heads"):
        return value
    try:
        n, m = parse_n_m(value)
    except PruneError:
        raise argparse.ArgumentTypeError(f"{value!r} is none of magnitude, neurons, heads or N:M (e.g. 2:4)") from None
    return f"{n}:{m}"


def cmd_prune(args) -> int:
    import torch

    from ..checkpoint import load_model, read_generation_config, save_model
    from ..tokenizer import Tokenizer
    from .prune import calibration_rows, prune_model

    if args.method == "heads" and args.sparsity is None:
        raise ValueError("--method heads needs --sparsity (the share of each layer's heads to remove)")
    tokenizer = Tokenizer.from_dir(args.model) if (Path(args.model) / "tokenizer.json").exists() else None
    model = load_model(args.model, dtype=torch.float32)
    calibration = None
    if args.method == "heads":
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json; head pruning tokenizes its calibration text with it")
        source = args.calibration or "the standard library's source"
        ids = tokenizer.encode(_calibration_text(args.calibration), add_special_tokens=False)
        seq_len = min(args.seq_len, model.config.max_position_embeddings)
        calibration = calibration_rows(ids, seq_len, args.samples)
        console.print(f"head importance on {len(calibration)} sequences of {seq_len} tokens from {source}")
    result, _ = prune_model(model, args.method, args.sparsity, calibration, scope=args.scope, head_unit=args.head_unit)
    save_model(model, args.out, tokenizer, generation_config=read_generation_config(args.model))
    if result.config_changes:
        changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in result.config_changes.items())
        console.print(
            f"{result.method}: {changes}; parameters {result.parameters_before:,} -> {result.parameters_after:,}; "
            f"wrote {args.out}"
        )
    else:
        console.print(
            f"{result.method}: {result.zero_fraction:.1%} of the blocks' linear weights are zero; the shapes are "
            f"unchanged, so the saved model is as large as before (dense safetensors); wrote {args.out}"
        )
    print(json.dumps(result.to_json()))
    return 0


def _add_prune_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prune",
        help="prune a model: magnitude, N:M (2:4), MLP neurons or attention heads",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Prune a Hugging Face model directory and write the result as another one. "
        "magnitude and N:M zero weights and keep every shape (the saved model is as large as before, "
        "dense safetensors); neurons and heads remove them, the same number in every layer, so the "
        "model gets smaller and faster and config.json records the new sizes (transformers loads it). "
        "Neurons are chosen by weight magnitude, heads by the gradient of the loss on calibration text "
        "(Michel et al. 2019). Measure the cost with `genforge eval ppl`.",
        epilog="example: genforge prune --model smollm/ --method heads --sparsity 0.25 --out smollm-heads/",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory (config.json, safetensors)")
    parser.add_argument(
        "--method",
        required=True,
        type=_method,
        metavar="{magnitude,2:4,neurons,heads}",
        help="magnitude: smallest |w|; N:M (2:4, or any N:M): N largest of every M input weights of a row; "
        "neurons: MLP neurons; heads: attention heads",
    )
    parser.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="share in [0, 1) of the weights (magnitude), neurons or heads per layer to remove; not used by N:M",
    )
    parser.add_argument("--out", required=True, help="directory to write the pruned model to")
    parser.add_argument(
        "--scope",
        choices=("global", "layer"),
        default="global",
        help="magnitude: one threshold over all layers, or the same share from each",
    )
    parser.add_argument(
        "--head-unit",
        choices=("query", "group"),
        default="query",
        help="heads under GQA: query heads from every key/value group, or whole groups",
    )
    calibration = parser.add_argument_group("calibration (heads)")
    calibration.add_argument(
        "--calibration", default=None, help="UTF-8 text file (default: the Python standard library's source)"
    )
    calibration.add_argument("--samples", type=int, default=64, help="calibration sequences")
    calibration.add_argument(
        "--seq-len", type=int, default=256, help="tokens per calibration sequence (at most the model's context)"
    )
    parser.set_defaults(func=cmd_prune)


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


def cmd_export_onnx(args) -> int:
    from .onnx_export import export_onnx

    result = export_onnx(args.model, args.out, last_logits_only=args.last_logits_only)
    report = {
        "path": str(result.path),
        "family": result.family,
        "opset": result.opset,
        "bytes": result.num_bytes,
        "external_data": str(result.external_data) if result.external_data else None,
        "logits": "last" if result.last_logits_only else "all",
        "inputs": list(result.input_names),
        "outputs": list(result.output_names),
    }
    print(json.dumps(report, indent=2))
    return 0


def _add_export_command(sub: argparse._SubParsersAction) -> None:
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

    from .onnx_export import SUPPORTED_ONNX_FAMILIES

    onnx_parser = export_sub.add_parser(
        "onnx",
        help="one ONNX graph with a key/value cache, for onnxruntime",
        description="Write a Hugging Face model directory as an ONNX graph that takes input_ids, attention_mask "
        "and each layer's past keys/values, and returns logits and the present keys/values; one graph serves "
        f"the prefill and every decode step. Families: {', '.join(SUPPORTED_ONNX_FAMILIES)}. Weights beyond 2 GiB "
        "go to FILE.data beside it. See docs/compression.md, 'Export to ONNX'.",
    )
    onnx_parser.add_argument("--model", required=True, help="Hugging Face model directory (float weights)")
    onnx_parser.add_argument("--out", required=True, help="the .onnx file to write (its directory must exist)")
    onnx_parser.add_argument(
        "--last-logits-only",
        action="store_true",
        help="return logits for the last position only (all that generation reads); default: every position",
    )
    onnx_parser.set_defaults(func=cmd_export_onnx)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge prune` and `genforge export` to the top-level parser."""
    _add_prune_command(sub)
    _add_export_command(sub)
