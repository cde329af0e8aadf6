"""Train the guards' classifier heads from the labelled sets shipped in ``safety/data/``.

    python -m genforge.safety.train_guards [--out DIR] [--seed 0]

writes ``injection_heads.json`` (one ``injection`` head) and ``moderation_heads.json`` (one head
per moderation category) with their cross-validated thresholds and out-of-fold metrics. The
committed files were written by this command with the defaults; tests/test_safety_guards_models.py
re-trains and checks it gets the same heads. Training embeds a few hundred short texts with
all-MiniLM-L6-v2 and fits logistic regression: under a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import numpy as np

from .embedding_heads import ENCODER_NAME, HeadSet, data_hash, embed, shared_encoder, train_head
from .injection import HEADS_FILE as INJECTION_HEADS
from .injection import load_injection_set
from .moderation import CATEGORIES, load_moderation_set
from .moderation import HEADS_FILE as MODERATION_HEADS
from .obfuscation import reveal

__all__ = ["train_injection_heads", "train_moderation_heads", "main"]


def _vectors(texts: list[str], encoder=None) -> np.ndarray:
    # The classifier reads what the detectors read at run time: the normalised view.
    return embed([reveal(t).text for t in texts], encoder)


def train_injection_heads(records: list[dict] | None = None, seed: int = 0, encoder=None) -> HeadSet:
    records = records if records is not None else load_injection_set()
    vectors = _vectors([r["text"] for r in records], encoder)
    head, metrics = train_head(vectors, [r["label"] for r in records], seed)
    return HeadSet({"injection": head}, ENCODER_NAME, vectors.shape[1], data_hash(records), {"injection": metrics})


def train_moderation_heads(records: list[dict] | None = None, seed: int = 0, encoder=None) -> HeadSet:
    records = records if records is not None else load_moderation_set()
    vectors = _vectors([r["text"] for r in records], encoder)
    heads, metrics = {}, {}
    for category in CATEGORIES:
        labels = [int(category in r["categories"]) for r in records]
        heads[category], metrics[category] = train_head(vectors, labels, seed)
    return HeadSet(heads, ENCODER_NAME, vectors.shape[1], data_hash(records), metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="directory for the heads (default: the package's safety/data)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(str(resources.files("genforge.safety") / "data"))
    out.mkdir(parents=True, exist_ok=True)
    encoder = shared_encoder()
    for name, head_set in (
        (INJECTION_HEADS, train_injection_heads(seed=args.seed, encoder=encoder)),
        (MODERATION_HEADS, train_moderation_heads(seed=args.seed, encoder=encoder)),
    ):
        head_set.save(out / name)
        for head, metrics in head_set.metrics.items():
            print(
                f"{name} {head}: threshold {head_set.heads[head].threshold:.3f}, out-of-fold ROC-AUC "
                f"{metrics['roc_auc']:.3f}, precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f} "
                f"({metrics['positives']} positive / {metrics['negatives']} negative)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
