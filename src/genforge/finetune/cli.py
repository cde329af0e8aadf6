"""`genforge merge-models` and `merge-adapter`, registered by `genforge.cli`: the commands of
fine-tuning's results. Each parses its flags, calls one library function and reports; a bad
value is the library's one-line error."""

from __future__ import annotations

import argparse

from ..console import console


def _merge_config(args, method: str | None):
    from .merge import MergeConfig

    return MergeConfig(
        method,
        weights=tuple(args.weights) if args.weights is not None else None,
        density=args.density,
        majority_sign=args.majority_sign,
        t=getattr(args, "t", None),
        seed=args.seed,
    )


def cmd_merge_models(args) -> int:
    from .merge import merge_checkpoints

    config = _merge_config(args, args.method)
    out = merge_checkpoints(args.models, args.out, config, base_dir=args.base, dtype=args.dtype)
    console.print(f"merged {len(args.models)} models by {_describe(config)} into {out}")
    return 0


def cmd_merge_adapter(args) -> int:
    from .merge import merge_adapters_into_checkpoint

    tuned = any(value is not None for value in (args.method, args.weights, args.density))
    config = _merge_config(args, args.method or "task_arithmetic") if tuned else None
    out = merge_adapters_into_checkpoint(args.model, args.adapter, args.out, config, dtype=args.dtype)
    how = f" by {_describe(config)}" if config is not None else ""
    console.print(f"merged {len(args.adapter)} adapter(s) into {args.model}{how}; wrote {out}")
    return 0


def _describe(config) -> str:
    knobs = [config.method]
    if config.weights is not None:
        knobs.append(f"weights {', '.join(f'{w:g}' for w in config.weights)}")
    if config.density is not None:
        knobs.append(f"density {config.density:g}")
    if config.t is not None:
        knobs.append(f"t {config.t:g}")
    return ", ".join(knobs)


def _merge_knobs(parser: argparse.ArgumentParser, methods: str) -> None:
    parser.add_argument(
        "--weights",
        type=float,
        nargs="+",
        metavar="W",
        help="one per model: linear averages with these (positive, normalised); task_arithmetic, ties and dare_* "
        "scale each task vector by its weight (default 1 each)",
    )
    parser.add_argument(
        "--density",
        type=float,
        help="ties and dare_*: the share of each task vector kept, in (0, 1] (ties keeps the largest, DARE a random "
        "share rescaled by 1/density)",
    )
    parser.add_argument(
        "--majority-sign",
        default="total",
        help="ties, dare_ties: elect each entry's sign by 'total' mass (the paper) or by 'frequency' (PEFT's variant)",
    )
    parser.add_argument("--seed", type=int, default=0, help="dare_*: seed of the random drop masks")
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, float16, bfloat16 or auto; default: the dtype the base (or first model) was saved in "
        "(the merge itself runs in float32)",
    )
    parser.add_argument("--out", required=True, help="directory of the merged Hugging Face checkpoint (written whole)")
    parser.epilog = methods


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge merge-models` and `merge-adapter` to the top-level parser."""
    from .merge import MERGE_METHODS

    models = sub.add_parser(
        "merge-models",
        help="merge fine-tuned models of one base (model soups, task arithmetic, TIES, DARE, SLERP)",
        description="Merge Hugging Face checkpoints of one architecture into a new checkpoint, without training. "
        "linear: the weighted average (model soups); task_arithmetic: base + sum of weight * (model - base); ties: "
        "task vectors trimmed to --density by magnitude, signs elected, agreeing values averaged; dare_linear / "
        "dare_ties: task vectors randomly dropped to --density and rescaled, then summed or TIES-merged; slerp: "
        "spherical interpolation between two models at --t.",
    )
    models.add_argument("--method", required=True, help=f"one of {', '.join(MERGE_METHODS)}")
    models.add_argument(
        "--models", required=True, nargs="+", metavar="DIR", help="the fine-tuned model directories to merge"
    )
    models.add_argument(
        "--base",
        metavar="DIR",
        help="the model they were fine-tuned from: needed by task_arithmetic, ties and dare_* (their task vectors "
        "are model - base), refused by linear and slerp",
    )
    models.add_argument("--t", type=float, help="slerp: 0 gives the first model, 1 the second (default 0.5)")
    _merge_knobs(
        models,
        "example: genforge merge-models --method ties --base base/ --models math/ code/ --weights 1 0.8 "
        "--density 0.5 --out merged/",
    )
    models.set_defaults(func=cmd_merge_models)

    adapter = sub.add_parser(
        "merge-adapter",
        help="merge PEFT adapters (LoRA, DoRA, IA3) into their base model and write a plain checkpoint",
        description="Merge a PEFT adapter into its base model and write the result as a Hugging Face checkpoint "
        "that needs no PEFT to load. One adapter merges exactly; several LoRA adapters (or --method, --weights, "
        "--density) merge their delta weights by a merge method (default task_arithmetic: the updates added).",
    )
    adapter.add_argument("--model", required=True, metavar="DIR", help="the base model directory")
    adapter.add_argument(
        "--adapter", required=True, nargs="+", metavar="DIR", help="PEFT adapter directories (adapter_config.json)"
    )
    adapter.add_argument(
        "--method",
        help="several LoRA adapters: linear, task_arithmetic (default), ties, dare_linear or dare_ties over their "
        "delta weights",
    )
    _merge_knobs(adapter, "example: genforge merge-adapter --model base/ --adapter my-lora/ --out merged/")
    adapter.set_defaults(func=cmd_merge_adapter)
