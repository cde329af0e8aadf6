"""Compression commands, registered by `genforge.cli`: `genforge quantize`, `genforge prune` and
`genforge export`.

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


def _calibration_text(path: str | None, default_bytes: int = DEFAULT_CALIBRATION_BYTES) -> str:
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"calibration file {path} does not exist") from None
    from ..quickstart import stdlib_source_files

    files = stdlib_source_files(default_bytes)
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


# Bytes of default calibration text per calibration token asked for: more than any tokenizer
# spends on Python source (about 3 to 4), so the default text is long enough.
_DEFAULT_TEXT_BYTES_PER_TOKEN = 8


def calibration_token_rows(tokenizer, path: str | None, samples: int, sequence_length: int) -> list:
    """`samples` rows of `sequence_length` token ids, each a (1, L) LongTensor, cut in order from
    the text of `path` (default: the Python standard library's source, on every machine).
    Refused (ValueError) when the text is too short for that many rows, saying how to give more."""
    from .prune import calibration_rows

    if samples < 1 or sequence_length < 2:
        raise ValueError(
            f"calibration needs --samples >= 1 and --sequence-length >= 2; got {samples}, {sequence_length}"
        )
    wanted = samples * sequence_length
    text = _calibration_text(path, max(DEFAULT_CALIBRATION_BYTES, wanted * _DEFAULT_TEXT_BYTES_PER_TOKEN))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < wanted:
        source = f"the calibration file {path}" if path else "the standard library's source"
        raise ValueError(
            f"{source} gives {len(ids)} tokens, fewer than --samples {samples} x --sequence-length {sequence_length} "
            f"= {wanted}; give a longer --calibration file, or lower --samples or --sequence-length"
        )
    rows = calibration_rows(ids, sequence_length, samples)
    return [row.unsqueeze(0) for row in rows]


def cmd_quantize(args) -> int:
    import time

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..checkpoint import load_model, read_generation_config
    from ..tokenizer import Tokenizer
    from .methods import METHODS, QuantizeOptions, quantize_model
    from .saved import save_quantized

    started = time.perf_counter()
    spec = METHODS[args.method]
    has_tokenizer = (Path(args.model) / "tokenizer.json").exists()
    if spec.needs_calibration and not has_tokenizer:
        raise ValueError(f"{args.model} has no tokenizer.json; --method {args.method} tokenizes its calibration text")
    if args.calibration is not None and not spec.needs_calibration:
        console.print(f"[yellow]note:[/yellow] --method {args.method} needs no calibration; --calibration is not read")
    generation_config = read_generation_config(args.model)
    tokenizer = Tokenizer.from_dir(args.model) if has_tokenizer else None
    model = load_model(args.model, dtype=torch.float32)
    calibration = None
    if spec.needs_calibration:
        length = min(args.sequence_length, model.config.max_position_embeddings)
        if length < args.sequence_length:
            console.print(f"calibration rows of {length} tokens, the model's context (not {args.sequence_length})")
        calibration = calibration_token_rows(tokenizer, args.calibration, args.samples, length)
        source = args.calibration or "the standard library's source"
        console.print(f"calibration: {len(calibration)} sequences of {length} tokens from {source}")
    exclude = args.exclude if args.exclude is not None else METHODS[args.method].default_exclude
    selection = QuantizeOptions(include=args.include, exclude=exclude)
    total = len(selection.layer_names(model))  # a bad pattern fails here, before the bar is drawn
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[layer]}"))
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"quantizing ({args.method})", total=total, layer="")
        options = QuantizeOptions(
            bits=args.bits,
            group_size=args.group_size,
            include=args.include,
            exclude=exclude,
            progress=lambda name: bar.update(task, advance=1, layer=name),
        )
        summary = quantize_model(model, args.method, calibration, options)
    if calibration is not None:
        summary["details"]["calibration"] = {
            "source": args.calibration or "python standard library source",
            "samples": len(calibration),
            "sequence_length": calibration[0].shape[1],
        }
    save_quantized(model, args.out, tokenizer, generation_config, method=args.method, details=summary)
    summary = {"out": str(args.out), **summary, "seconds": round(time.perf_counter() - started, 2)}
    console.print(
        f"{args.method}: {summary['layers_quantized']} layers at {summary['bits_per_weight']:.2f} bits per weight; "
        f"model {summary['bytes_before'] / 2**20:.2f} -> {summary['bytes_after'] / 2**20:.2f} MiB; wrote {args.out}"
    )
    print(json.dumps(summary, indent=2))
    return 0


def _add_quantize_command(sub: argparse._SubParsersAction) -> None:
    from .methods import METHODS

    parser = sub.add_parser(
        "quantize",
        help="quantize a model's linear layers and save it for genforge generate, chat, serve and eval",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Quantize the linear layers of a Hugging Face model directory and write a quantized model "
        "directory (config.json with a quantization_config, safetensors, tokenizer) that genforge generate, chat, "
        "serve and eval ppl load as it is. The LM head stays in floating point (quantized too by int8 and int4) unless --exclude says otherwise. "
        "Methods: "
        + "; ".join(
            f"{name}: {m.summary}{' (reads calibration text)' if m.needs_calibration else ''}"
            for name, m in METHODS.items()
        )
        + ". Measure the cost with `genforge eval ppl`; see docs/compression.md.",
        epilog="example: genforge quantize --model smollm/ --method nf4 --out smollm-nf4/",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory (config.json, safetensors)")
    parser.add_argument("--method", required=True, choices=list(METHODS), help="quantization method")
    parser.add_argument("--out", required=True, help="directory to write the quantized model to")
    parser.add_argument("--bits", type=int, default=None, help="weight bits, where the method offers a choice")
    parser.add_argument(
        "--group-size", type=int, default=None, help="input columns sharing a scale (nf4: its block size, 64)"
    )
    parser.add_argument(
        "--include", nargs="+", default=None, metavar="PATTERN", help="only these linear layers (globs over names)"
    )
    parser.add_argument(
        "--exclude",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="linear layers kept in floating point. Default: lm_head, except for int8 and int4, whose kernels "
        "run the head faster quantized; a list replaces the default, so name lm_head in it to keep the head fp",
    )
    calibration = parser.add_argument_group("calibration (methods that read text)")
    calibration.add_argument(
        "--calibration", default=None, help="UTF-8 text file (default: the Python standard library's source)"
    )
    calibration.add_argument("--samples", type=int, default=128, help="calibration sequences")
    calibration.add_argument(
        "--sequence-length",
        "--seq-len",
        dest="sequence_length",
        type=int,
        default=512,
        help="tokens per calibration sequence (at most the model's context)",
    )
    parser.set_defaults(func=cmd_quantize)


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
    """Add `genforge quantize`, `genforge prune` and `genforge export` to the top-level parser."""
    _add_quantize_command(sub)
    _add_prune_command(sub)
    _add_export_command(sub)
