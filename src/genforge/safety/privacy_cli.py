"""The command line of privacy: the DP-SGD flags that `genforge pretrain` and `genforge finetune`
share, and `genforge safety mia` (membership inference against a trained model). Parsing only;
the work is `safety.privacy` and `safety.membership`. Nothing heavy is imported at module level,
so registering these flags costs the CLI's start-up nothing."""

from __future__ import annotations

import argparse
import json


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value!r}")
    return number


def _probability(value: str) -> float:
    number = _positive_float(value)
    if number >= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1), got {value!r}")
    return number


def add_dp_arguments(parser: argparse.ArgumentParser) -> None:
    """The DP-SGD flags (`--dp-noise` turns DP-SGD on)."""
    group = parser.add_argument_group(
        "differential privacy (DP-SGD, Abadi et al. 2016)",
        "Poisson-sampled batches (expected size: batch size x grad accum), each example's gradient clipped "
        "and Gaussian noise added; the run reports epsilon at --dp-delta (RDP accountant) per step and at the end.",
    )
    group.add_argument(
        "--dp-noise",
        type=_non_negative_float,
        default=None,
        metavar="SIGMA",
        help="noise multiplier: noise std / clipping norm (turns DP-SGD on)",
    )
    group.add_argument(
        "--dp-max-grad-norm",
        type=_positive_float,
        default=1.0,
        metavar="C",
        help="clip each example's gradient to this L2 norm (default 1.0)",
    )
    group.add_argument(
        "--dp-delta",
        type=_probability,
        default=1e-5,
        help="delta of the (epsilon, delta) guarantee; below 1 / training examples (default 1e-5)",
    )


def dp_config(args: argparse.Namespace):
    """The `DPConfig` the flags ask for, or None without --dp-noise."""
    if getattr(args, "dp_noise", None) is None:
        return None
    from .privacy import DPConfig

    config = DPConfig(args.dp_noise, args.dp_max_grad_norm, args.dp_delta)
    config.validate()
    return config


# ------------------------------------------------------------------------------ safety mia
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`genforge safety mia`'s flags."""
    parser.add_argument("--model", required=True, help="the target model directory (config.json, weights, tokenizer)")
    parser.add_argument(
        "--members", required=True, help="texts trained on: JSONL (a 'text' field) or one example per line"
    )
    parser.add_argument("--non-members", required=True, help="texts not trained on, in the same format")
    parser.add_argument(
        "--reference",
        nargs="+",
        default=(),
        metavar="DIR",
        help="reference model(s) trained like the target on other data: the calibrated attack; two or more "
        "also run offline LiRA",
    )
    parser.add_argument("--text-field", default="text", help="the JSONL field holding the text (default 'text')")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences scored at once (default 16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write the ROC curves (log-log) here")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    """Score the candidates, print AUC and TPR at 1% FPR per attack (a table on stderr, JSON on stdout)."""
    from ..atomic import atomic_write_text
    from ..console import console
    from .membership import MembershipError, membership_inference, plot_roc, read_texts, results_json

    if args.batch_size < 1:
        raise MembershipError(f"--batch-size must be a positive integer, got {args.batch_size}")
    members = read_texts(args.members, args.text_field)
    non_members = read_texts(args.non_members, args.text_field)
    results = membership_inference(
        args.model, members, non_members, args.reference, batch_size=args.batch_size, device=args.device
    )
    for name, result in results.items():
        console.print(
            f"{name}: AUC {result.auc:.3f}, TPR at 1% FPR {result.tpr_at_1pct_fpr:.1%} "
            f"({result.members} members, {result.non_members} non-members)"
        )
    if args.plot:
        console.print(f"ROC curves in {plot_roc(results, args.plot, title=f'membership inference: {args.model}')}")
    text = results_json(results)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    print(json.dumps(json.loads(text)))
    return 0


__all__ = ["add_arguments", "add_dp_arguments", "dp_config", "run"]
