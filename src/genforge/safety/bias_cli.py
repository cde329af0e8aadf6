"""`genforge safety bias`: WEAT/SEAT effect sizes on a sentence encoder, CrowS-Pairs-style
pseudo-log-likelihood pairs on a masked LM, or counterfactual log-likelihoods on a causal LM;
a JSON summary on stdout (and in --out)."""

from __future__ import annotations

import argparse
import json

KINDS = ("seat", "weat", "crows-pairs", "counterfactual")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .bias import CLASSIC_TESTS

    parser.description = (
        "Measure bias. seat/weat: association effect sizes with permutation p-values on a sentence encoder "
        "(default: the offline all-MiniLM-L6-v2); crows-pairs: stereotype preference of a masked LM; "
        "counterfactual: log-likelihood gaps when a demographic term is swapped in prompts to a causal LM."
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--model", default=None, metavar="DIR", help="the model (encoder for seat/weat: optional)")
    parser.add_argument("--tests", default=None, help=f"seat/weat: comma-separated subset of {','.join(CLASSIC_TESTS)}")
    parser.add_argument("--permutations", type=int, default=10_000, help="seat/weat: random splits for the p-value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON here (atomically)")


def measure(args: argparse.Namespace) -> dict:
    from . import bias

    if args.kind in ("seat", "weat"):
        from ..encoder import SentenceEncoder

        names = list(bias.CLASSIC_TESTS) if args.tests is None else [t.strip() for t in args.tests.split(",")]
        unknown = [n for n in names if n not in bias.CLASSIC_TESTS]
        if unknown:
            raise ValueError(f"--tests: unknown {unknown}; accepted: {', '.join(bias.CLASSIC_TESTS)}")
        if args.permutations < 1:
            raise ValueError(f"--permutations must be positive, got {args.permutations}")
        encoder = SentenceEncoder(args.model)
        templates = bias.SEAT_TEMPLATES if args.kind == "seat" else None
        results = {
            name: bias.run_association_test(
                bias.CLASSIC_TESTS[name],
                encoder.encode,
                templates=templates,
                permutations=args.permutations,
                seed=args.seed,
            ).to_dict()
            for name in names
        }
        return {"kind": args.kind, "encoder": args.model or "all-MiniLM-L6-v2", "tests": results}
    if args.model is None:
        raise ValueError(f"{args.kind} needs --model DIR")
    from ..loading import load_for_inference

    loaded = load_for_inference(args.model)
    if args.kind == "crows-pairs":
        return {"kind": args.kind, "model": args.model, **bias.crows_pairs(loaded.model, loaded.tokenizer).to_dict()}
    result = bias.counterfactual_loglikelihoods(loaded.model, loaded.tokenizer)
    return {"kind": args.kind, "model": args.model, **result.to_dict()}


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text

    text = json.dumps(measure(args), indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0
