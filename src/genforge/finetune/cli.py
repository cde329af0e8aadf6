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
        packing=False if args.no_packing else None,
        overflow="truncate" if args.truncate else "error",
        eval_fraction=args.eval_fraction,
        eval_data=args.eval_data,
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
        num_virtual_tokens=args.num_virtual_tokens,
        prompt_init=args.prompt_init,
        prompt_init_text=args.prompt_init_text,
        encoder_type=args.encoder_type,
        encoder_hidden_size=args.encoder_hidden_size,
        prefix_projection=args.prefix_projection,
        bottleneck_size=args.bottleneck_size,
        reduction_factor=args.reduction_factor,
        adapter_activation=args.adapter_activation,
        placement=args.placement,
        target_layers=args.target_layers,
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
    from .run import METHODS

    parser = sub.add_parser(
        "finetune",
        help="fine-tune a model on instruction data (full, LoRA, DoRA, QLoRA, IA3, BitFit, adapters, prompts)",
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
    data.add_argument(
        "--seq-len", type=int, default=None, help="tokens per training row (default: the model's context, at most 1024)"
    )
    data.add_argument(
        "--no-packing",
        action="store_true",
        help="one example per row instead of packing several in each row (prompt methods never pack)",
    )
    data.add_argument("--truncate", action="store_true", help="cut examples longer than --seq-len instead of refusing")
    data.add_argument("--eval-fraction", type=float, default=0.05, help="share of each file held out for scoring")
    data.add_argument("--eval-data", nargs="+", help="held-out JSONL file(s) to score instead of splitting --data")
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
    lora = parser.add_argument_group("lora, dora, qlora, ia3, bitfit")
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    lora.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha / r)")
    lora.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input")
    lora.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    lora.add_argument(
        "--target-modules",
        nargs="+",
        help="layers to adapt (bitfit: whose biases to train): genforge names (qkv o gate_up down) or Hugging "
        "Face names (q_proj v_proj); default: every linear layer in the blocks (bitfit: every bias)",
    )
    prompts = parser.add_argument_group("prompt, ptuning, prefix")
    prompts.add_argument("--num-virtual-tokens", type=int, default=20, help="trained virtual tokens (or prefix length)")
    prompts.add_argument(
        "--prompt-init", choices=("RANDOM", "SAMPLE_VOCAB", "TEXT"), default="RANDOM", help="prompt tuning's start"
    )
    prompts.add_argument("--prompt-init-text", help="prompt tuning: the text whose embeddings start the prompt")
    prompts.add_argument("--encoder-type", choices=("MLP", "LSTM"), default="MLP", help="P-tuning's prompt encoder")
    prompts.add_argument("--encoder-hidden-size", type=int, help="P-tuning / prefix projection width")
    prompts.add_argument(
        "--prefix-projection", action="store_true", help="prefix tuning through the reparameterisation MLP"
    )
    adapters = parser.add_argument_group("adapter (bottleneck adapters)")
    adapters.add_argument("--bottleneck-size", type=int, help="the adapter's inner width")
    adapters.add_argument("--reduction-factor", type=float, help="hidden size / bottleneck size (default 16)")
    adapters.add_argument("--adapter-activation", default="relu", help="relu, gelu, gelu_tanh, silu, tanh")
    adapters.add_argument(
        "--placement", choices=("houlsby", "pfeiffer"), default="houlsby", help="after attention and MLP, or MLP only"
    )
    adapters.add_argument("--target-layers", type=int, nargs="+", help="block indices to adapt (default: all)")
    parser.set_defaults(func=cmd_finetune)
