"""The flags `genforge align` subcommands share, and the torchrun launch they share.

Every alignment command reads a model directory and a data file and writes a run directory,
trains with the fine-tuning run's loop (`finetune.cli.add_training_arguments`: steps, batches,
schedule, checkpoints, --resume) and, for adapter methods, its LoRA flags
(`finetune.cli.add_lora_arguments`). Commands over preference-style data (reward, the DPO
family, KTO) also share the length limits and the held-out split. A subcommand module (see
`align.cli.ALIGN_COMMANDS`) builds its parser from these and maps the parsed flags to its
config with `training_fields`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..finetune.cli import add_lora_arguments, add_training_arguments


def add_run_arguments(
    parser: argparse.ArgumentParser, data_help: str, methods: tuple[str, ...], method_help: str = "what to train"
) -> None:
    """--model, --data, --out and --method (the first of `methods` is the default)."""
    parser.add_argument(
        "--model", required=True, help="Hugging Face model directory (config.json, safetensors, tokenizer)"
    )
    parser.add_argument("--data", required=True, help=data_help)
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics, the adapter or model")
    parser.add_argument("--method", choices=methods, default=methods[0], help=f"{method_help} (default {methods[0]})")


def add_length_arguments(parser: argparse.ArgumentParser, unit: str = "pairs") -> argparse._ArgumentGroup:
    """The "data" group: length limits (prompts cut from the left, completions never) and the
    held-out split. Returns the group, for a command's own data flags."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--max-length", type=int, help="tokens of prompt + the longest completion (default: the context, at most 1024)"
    )
    data.add_argument("--max-prompt-length", type=int, help="tokens of the prompt (default: no own limit)")
    data.add_argument(
        "--no-truncate",
        action="store_true",
        help=f"refuse {unit} over a limit instead of cutting the prompt from the left (completions are never cut)",
    )
    data.add_argument("--eval-fraction", type=float, default=0.05, help=f"share of the {unit} held out (default 0.05)")
    data.add_argument("--eval-data", help=f"held-out JSONL {unit} to score instead of splitting --data")
    return data


def add_shared_training_arguments(parser: argparse.ArgumentParser, unit: str, lr_help: str) -> None:
    """The training flags (with --resume) and the LoRA flags of an alignment command."""
    add_training_arguments(
        parser, unit=unit, lr_help=lr_help, seed_help="seeds the split, the order and the adapter's (and head's) init"
    )
    add_lora_arguments(
        parser,
        "lora, dora, qlora",
        "layers to adapt: genforge names (qkv o gate_up down) or Hugging Face names (q_proj v_proj); default: "
        "every linear layer in the blocks",
    )


def training_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields every alignment config shares, from the parsed flags."""
    fields = dict(
        model_dir=args.model,
        data=args.data,
        out_dir=args.out,
        method=args.method,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        device=args.device,
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        use_rslora=args.rslora,
        target_modules=args.target_modules,
    )
    if hasattr(args, "max_length"):
        fields |= dict(
            eval_data=args.eval_data,
            eval_fraction=args.eval_fraction,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            overflow="error" if args.no_truncate else "truncate",
        )
    return fields


def launch(train: Callable[..., Any], config: Any, check: Callable[[Any], None], resume: bool):
    """Check `config` before a process group is joined or a file read, join torchrun's group
    (a single process without it), run `train(config, resume=, distributed=)`, leave the group.
    Returns (the result, the distributed context)."""
    from ..train.distributed import destroy_distributed, init_distributed

    check(config)
    context, config.device = init_distributed(config.device)
    try:
        result = train(config, resume=resume, distributed=context)
    finally:
        destroy_distributed()
    return result, context


__all__ = [
    "add_length_arguments",
    "add_run_arguments",
    "add_shared_training_arguments",
    "launch",
    "training_fields",
]
