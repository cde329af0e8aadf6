"""`genforge finetune`, `merge-models` and `merge-adapter`, registered by `genforge.cli`: adapt a
model to instruction data with one of the fine-tuning methods, and merge what fine-tuning made.
Each command parses its flags, calls one library function and reports; a bad value is the
library's one-line error."""

from __future__ import annotations

import argparse
import json

from ..console import console
from ..ops.tracking import enable_tracking
from ..safety.privacy_cli import add_dp_arguments


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
        teacher=args.teacher,
        distill=args.distill,
        distill_alpha=args.distill_alpha,
        distill_temperature=args.distill_temperature,
        distill_kind=args.distill_kind,
        replay_data=args.replay_data,
        replay_share=args.replay_share,
        ewc_fisher=args.ewc_fisher,
        ewc_data=args.ewc_data,
        ewc_strength=args.ewc_strength,
        save_fisher=args.save_fisher,
        fisher_examples=args.fisher_examples,
        dp_noise_multiplier=args.dp_noise,
        dp_max_grad_norm=args.dp_max_grad_norm,
        dp_delta=args.dp_delta,
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
        if result.privacy is not None:
            console.print(
                f"DP-SGD: (epsilon {result.privacy['epsilon']:.3f}, delta {result.privacy['delta']:g}) after "
                f"{result.privacy['steps']} steps"
            )
        print(json.dumps(result.to_json()))
    return 0


def add_training_arguments(parser: argparse.ArgumentParser, unit: str, lr_help: str, seed_help: str) -> None:
    """The "training" flags every fine-tuning-style command shares (`finetune`, `align`): steps,
    batches of `unit`, the learning-rate schedule, evaluation and checkpoint cadence, resume."""
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    train.add_argument("--batch-size", type=int, default=8, help=f"{unit} per micro-batch (default 8)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    train.add_argument("--lr", type=float, help=lr_help)
    train.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument(
        "--eval-every", type=int, default=0, help="score the held-out data every N steps (0: at the end)"
    )
    train.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    train.add_argument("--seed", type=int, default=0, help=seed_help)
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--device", default="cpu", help="cpu or cuda")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def add_lora_arguments(parser: argparse.ArgumentParser, title: str, targets_help: str) -> None:
    """The LoRA-family flags (rank, alpha, dropout, rsLoRA, target modules) under `title`."""
    lora = parser.add_argument_group(title)
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    lora.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha / r)")
    lora.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input")
    lora.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    lora.add_argument("--target-modules", nargs="+", help=targets_help)


def _add_finetune_command(sub: argparse._SubParsersAction) -> None:
    from .continual import EWC_STRENGTH
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
    add_training_arguments(
        parser,
        unit="rows",
        lr_help="peak learning rate (default: the method's usual one)",
        seed_help="seeds the split, the mixture, the order and the init",
    )
    add_lora_arguments(
        parser,
        "lora, dora, qlora, ia3, bitfit",
        "layers to adapt (bitfit: whose biases to train): genforge names (qkv o gate_up down) or Hugging "
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
    distill = parser.add_argument_group("knowledge distillation")
    distill.add_argument("--teacher", help="a model directory to distil from")
    distill.add_argument(
        "--distill",
        choices=("soft", "sequence"),
        default="soft",
        help="soft: towards the teacher's next-token distributions (same vocabulary); sequence: on the teacher's "
        "greedy answers to the training prompts",
    )
    distill.add_argument("--distill-alpha", type=float, default=0.5, help="soft: the KD share of the loss")
    distill.add_argument("--distill-temperature", type=float, default=1.0, help="soft: softmax temperature")
    distill.add_argument(
        "--distill-kind", default="forward_kl", help="soft: forward_kl, reverse_kl, tvd or jsd (generalized JSD)"
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
    add_dp_arguments(parser)
    parser.set_defaults(func=cmd_finetune)
    enable_tracking(parser)


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


def _add_merge_commands(sub: argparse._SubParsersAction) -> None:
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge finetune`, `merge-models` and `merge-adapter` to the top-level parser."""
    _add_finetune_command(sub)
    _add_merge_commands(sub)
