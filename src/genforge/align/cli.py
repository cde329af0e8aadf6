"""`genforge align`, registered by `genforge.cli`: align a model to preference pairs with DPO and
its family (`align.preference`). The command parses its flags, calls `train_preferences` and
reports; a bad value is the library's one-line error."""

from __future__ import annotations

import argparse
import json

from ..console import console


def cmd_align(args) -> int:
    from ..train.distributed import destroy_distributed, init_distributed
    from .preference import PreferenceConfig, check_config, train_preferences

    config = PreferenceConfig(
        model_dir=args.model,
        data=args.data,
        out_dir=args.out,
        loss=args.loss,
        method=args.method,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        gamma=args.gamma,
        eval_data=args.eval_data,
        eval_fraction=args.eval_fraction,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        overflow="error" if args.no_truncate else "truncate",
        reference_model=args.reference_model,
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
    check_config(config)  # before a process group is joined or a file read
    context, config.device = init_distributed(args.device)
    try:
        result = train_preferences(config, resume=args.resume, distributed=context)
    finally:
        destroy_distributed()
    if context.is_main:

        def scores(evaluation) -> str:
            if not evaluation:
                return "n/a"
            return (
                f"accuracy {evaluation['val_rewards/accuracies']:.1%}, margin {evaluation['val_rewards/margins']:+.3f}"
            )

        cut = f"; {result.truncated_pairs} prompts cut to fit" if result.truncated_pairs else ""
        console.print(
            f"{result.loss} ({result.method}): trained {result.trainable_parameters:,} of {result.total_parameters:,} "
            f"parameters for {result.steps} steps on {result.train_pairs:,} pairs{cut}; held-out "
            f"({result.held_out_pairs} pairs) {scores(result.before)} -> {scores(result.after)}; "
            f"{result.tokens_per_s:,.0f} tok/s, peak RSS {result.peak_rss_mib:,.0f} MiB; wrote {result.output_dir}"
        )
        print(json.dumps(result.to_json()))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..finetune.cli import add_lora_arguments, add_training_arguments

    """Add `genforge align` to the top-level parser."""
    from .preference import PREFERENCE_LOSSES, PREFERENCE_METHODS

    losses = "\n".join(f"  {name:7s} {spec.summary}" for name, spec in PREFERENCE_LOSSES.items())
    parser = sub.add_parser(
        "align",
        help="align a model to preference pairs (DPO, IPO, cDPO, hinge, robust DPO, ORPO, SimPO)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a Hugging Face model directory on JSONL preference pairs {'prompt', 'chosen', "
        "'rejected'} (plain text, or chat messages rendered with the model's chat template). The reference "
        "model's log-probabilities are computed once before training (with LoRA: the base, adapters off). "
        "Writes OUT/adapter (a PEFT adapter that `genforge generate --adapter` loads) or OUT/model (--method "
        "full), metrics.jsonl with rewards, margins and accuracies per step, and preference.json with the "
        "held-out scores before and after. Interrupted runs continue with --resume; under torchrun every rank "
        f"trains its slice of each batch.\n\nlosses:\n{losses}",
        epilog="example: genforge align dpo --model sft-model/ --data pairs.jsonl --out runs/dpo --beta 0.1",
    )
    parser.add_argument("loss", choices=tuple(PREFERENCE_LOSSES), help="the objective (see above)")
    parser.add_argument(
        "--model", required=True, help="Hugging Face model directory (config.json, safetensors, tokenizer)"
    )
    parser.add_argument("--data", required=True, help="JSONL preference pairs")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics, the adapter or model")
    parser.add_argument("--method", choices=PREFERENCE_METHODS, default="lora", help="what to train (default lora)")
    knobs = parser.add_argument_group("the loss")
    knobs.add_argument(
        "--beta",
        type=float,
        help="strength of the pull to the reference (dpo family; inverse temperature), the odds-ratio weight "
        "(orpo) or the reward scale (simpo); default 0.1, simpo 2.0",
    )
    knobs.add_argument(
        "--label-smoothing",
        type=float,
        help="cdpo, robust: the assumed share of flipped labels, in (0, 0.5) (default 0.1); simpo: optional",
    )
    knobs.add_argument("--gamma", type=float, default=0.5, help="simpo: the target reward margin (default 0.5)")
    knobs.add_argument(
        "--reference-model", help="dpo family: a model directory (same tokenizer) to take as the reference"
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--max-length", type=int, help="tokens of prompt + longer answer (default: the context, at most 1024)"
    )
    data.add_argument("--max-prompt-length", type=int, help="tokens of the prompt (default: no own limit)")
    data.add_argument(
        "--no-truncate",
        action="store_true",
        help="refuse a pair over a limit instead of cutting its prompt from the left (answers are never cut)",
    )
    data.add_argument("--eval-fraction", type=float, default=0.05, help="share of the pairs held out (default 0.05)")
    data.add_argument("--eval-data", help="held-out JSONL pairs to score instead of splitting --data")
    add_training_arguments(
        parser,
        unit="pairs",
        lr_help="peak learning rate (default: 5e-5 for adapters, 1e-6 for full)",
        seed_help="seeds the split, the order and the adapter's init",
    )
    add_lora_arguments(
        parser,
        "lora, dora, qlora",
        "layers to adapt: genforge names (qkv o gate_up down) or Hugging Face names (q_proj v_proj); default: "
        "every linear layer in the blocks",
    )
    parser.set_defaults(func=cmd_align)
