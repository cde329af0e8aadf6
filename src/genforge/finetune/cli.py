"""`genforge finetune`, registered by `genforge.cli`: adapt a Hugging Face model to instruction
data with one of the fine-tuning methods. It parses, calls `finetune.run.finetune`, prints."""

from __future__ import annotations

import argparse
import json

from ..console import console


def cmd_finetune(args) -> int:
    from ..train.distributed import destroy_distributed, init_distributed
    from .run import FinetuneConfig, check_config, finetune

    config = FinetuneConfig(
        model_dir=args.model,
        data=args.data,
        out_dir=args.out,
        method=args.method,
        data_weights=args.data_weights,
        mixture_temperature=args.mixture_temperature,
        seq_len=args.seq_len,
        packing=not args.no_packing,
        overflow="truncate" if args.truncate else "error",
        eval_fraction=args.eval_fraction,
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
        replay_data=args.replay_data,
        replay_share=args.replay_share,
        ewc_fisher=args.ewc_fisher,
        ewc_data=args.ewc_data,
        ewc_strength=args.ewc_strength,
        save_fisher=args.save_fisher,
        fisher_examples=args.fisher_examples,
    )
    check_config(config)  # before a process group is joined or a file read
    context, config.device = init_distributed(args.device)
    try:
        result = finetune(config, resume=args.resume, distributed=context)
    finally:
        destroy_distributed()
    if context.is_main:
        before = "n/a" if result.val_loss_before is None else f"{result.val_loss_before:.4f}"
        after = "n/a" if result.val_loss_after is None else f"{result.val_loss_after:.4f}"
        console.print(
            f"{result.method}: trained {result.trainable_parameters:,} of {result.total_parameters:,} parameters "
            f"({result.trainable_share:.2%}) for {result.steps} steps on {result.train_examples:,} examples; "
            f"held-out loss {before} -> {after} ({result.held_out_examples} examples); "
            f"{result.tokens_per_s:,.0f} tok/s, peak RSS {result.peak_rss_mib:,.0f} MiB"
        )
        print(json.dumps(result.to_json()))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge finetune` to the top-level parser."""
    from .continual import EWC_STRENGTH
    from .run import METHODS

    parser = sub.add_parser(
        "finetune",
        help="fine-tune a model on instruction data (full, LoRA, DoRA, QLoRA, IA3)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Supervised fine-tuning of a Hugging Face model directory on JSONL instruction data "
        "({'messages': [...]}, {'prompt', 'completion'} or Alpaca {'instruction', 'input', 'output'}), the loss on "
        "the assistant's tokens only. Adapter methods freeze the model and write a PEFT adapter directory "
        "(OUT/adapter) that peft.PeftModel.from_pretrained loads; full fine-tuning writes OUT/model. A held-out "
        "share of the data is scored before and after. Interrupted runs continue with --resume; under torchrun "
        "every rank trains its slice of each batch.",
        epilog="example: genforge finetune --model smollm/ --data chat.jsonl --method lora --rank 16 --out runs/lora",
    )
    parser.add_argument(
        "--model", required=True, help="Hugging Face model directory (config.json, safetensors, tokenizer)"
    )
    parser.add_argument("--data", required=True, nargs="+", help="JSONL file(s); several train as one mixture")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics, the adapter or model")
    parser.add_argument("--method", choices=tuple(METHODS), default="lora", help="what to train")
    data = parser.add_argument_group("data")
    data.add_argument("--seq-len", type=int, default=512, help="tokens per training row")
    data.add_argument(
        "--no-packing", action="store_true", help="one example per row instead of packing several in each row"
    )
    data.add_argument("--truncate", action="store_true", help="cut examples longer than --seq-len instead of refusing")
    data.add_argument("--eval-fraction", type=float, default=0.05, help="share of each file held out for scoring")
    data.add_argument("--data-weights", type=float, nargs="+", help="mixture weights, one per --data file")
    data.add_argument(
        "--mixture-temperature", type=float, help="mix files in proportion to size ** (1 / T) (T5's temperature)"
    )
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=100, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    train.add_argument("--lr", type=float, help="peak learning rate (default: the method's usual one)")
    train.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument(
        "--eval-every", type=int, default=0, help="score the held-out data every N steps (0: at the end)"
    )
    train.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    train.add_argument("--seed", type=int, default=0, help="seeds the split, the mixture, the order and the init")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--device", default="cpu", help="cpu or cuda")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    lora = parser.add_argument_group("lora, dora, qlora, ia3")
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    lora.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha / r)")
    lora.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input")
    lora.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    lora.add_argument(
        "--target-modules",
        nargs="+",
        help="layers to adapt: genforge names (qkv o gate_up down) or Hugging Face names (q_proj v_proj); "
        "default: every linear layer in the blocks",
    )
    continual = parser.add_argument_group(
        "continual learning",
        "keep an earlier task while training a new one: replay its examples, or hold the weights it relies on "
        "with elastic weight consolidation (task A with --save-fisher, then task B with --ewc-fisher A/fisher.safetensors)",
    )
    continual.add_argument(
        "--replay-data", nargs="+", help="earlier task's JSONL file(s) to replay (their training split)"
    )
    continual.add_argument(
        "--replay-share", type=float, default=0.25, help="share of the training examples drawn from --replay-data"
    )
    continual.add_argument("--ewc-fisher", help="EWC file (Fisher and anchor) written by an earlier --save-fisher run")
    continual.add_argument(
        "--ewc-data", nargs="+", help="earlier task's JSONL file(s): compute the Fisher from them on the loaded model"
    )
    continual.add_argument("--ewc-strength", type=float, default=EWC_STRENGTH, help="EWC penalty strength (lambda)")
    continual.add_argument(
        "--save-fisher", action="store_true", help="write OUT/fisher.safetensors at the end, for a later run's EWC"
    )
    continual.add_argument(
        "--fisher-examples", type=int, default=256, help="examples the per-example Fisher is averaged over (at most)"
    )
    parser.set_defaults(func=cmd_finetune)
