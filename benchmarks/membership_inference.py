"""Membership inference against a small model, and what DP-SGD does to it, measured.

Candidates are byte-level blocks of the Python standard library's source
(`genforge.quickstart.stdlib_source_files`), cut into sequences of SEQ_LEN bytes and shuffled
with a fixed seed: MEMBERS of them train the target, as many others are the non-members, and a
disjoint population set trains the reference model. The model is a Llama-layout decoder of about
0.1M parameters, trained by genforge's Trainer (AdamW, batch 16) under each recipe:

- overfit: many epochs over the members (the memorising regime, where attacks succeed);
- normal: NORMAL_STEPS steps with weight decay 0.1, where held-out loss stopped improving (a scan
  of this recipe, evaluating every 8 steps on other blocks, found its minimum, 1.97 nats/byte,
  at 144 steps: early stopping, as a careful practitioner trains);
- DP-SGD at a few ε (δ = 1e-5): the overfit recipe's steps and batch, Poisson-sampled, each
  example clipped to norm 1 and noised with the multiplier that the RDP accountant says reaches ε.

Attacks (genforge.safety.membership), each scored by ROC AUC and TPR at 1% FPR:
- loss threshold (Yeom et al. 2018);
- reference-calibrated (Watson et al. 2022): a reference model trained by the same recipe on the
  population set;
- online LiRA (Carlini et al. 2022) with SHADOWS shadow models per recipe, each trained by the
  recipe on a random half of the candidates (members and non-members), so every candidate is IN
  some shadows and OUT of others; global variance, as the paper advises for few shadows.

    PYTHONPATH=src python benchmarks/membership_inference.py   # benchmarks/results/membership_inference.{json,md,png}
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from machine import describe, write_results

from genforge.config import Config
from genforge.model import Transformer
from genforge.quickstart import stdlib_source_files
from genforge.safety.membership import (
    evaluate_attack,
    lira_scores,
    loss_attack_scores,
    plot_roc,
    reference_attack_scores,
    sequence_losses,
)
from genforge.safety.privacy import DPSGD, DPConfig, noise_multiplier_for_epsilon
from genforge.train import TokenDataset, TrainConfig, Trainer

SEQ_LEN = 48
MEMBERS = 128
BATCH = 16
NORMAL_STEPS = 144
DELTA = 1e-5
MODEL = dict(
    family="llama",
    vocab_size=256,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=128,
    max_position_embeddings=SEQ_LEN,
)


@dataclass
class Recipe:
    name: str
    steps: int
    lr: float
    weight_decay: float = 0.0
    epsilon: float | None = None  # DP-SGD at this ε; None: ordinary training


def byte_blocks(count: int, seed: int) -> torch.Tensor:
    """`count` distinct blocks of SEQ_LEN bytes from the stdlib's source, in a seeded random order."""
    data = b"".join(path.read_bytes() for path in stdlib_source_files(count * SEQ_LEN * 3))
    blocks = torch.tensor(list(data[: len(data) // SEQ_LEN * SEQ_LEN]), dtype=torch.long).view(-1, SEQ_LEN)
    unique = torch.unique(blocks, dim=0)  # boilerplate (licence headers) repeats: a block is in one set only
    order = torch.randperm(unique.shape[0], generator=torch.Generator().manual_seed(seed))
    if unique.shape[0] < count:
        raise SystemExit(f"only {unique.shape[0]} distinct blocks; ask for fewer")
    return unique[order[:count]]


def train(recipe: Recipe, rows: torch.Tensor, seed: int, noise: float | None) -> tuple[Transformer, dict]:
    torch.manual_seed(seed)
    model = Transformer(Config(**MODEL))
    data = TokenDataset(rows.flatten(), SEQ_LEN)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            out_dir=out,
            max_steps=recipe.steps,
            batch_size=BATCH,
            lr=recipe.lr,
            weight_decay=recipe.weight_decay,
            warmup_steps=0,
            seed=seed,
            progress=False,
            export=False,
        )
        privacy = DPSGD(DPConfig(noise, 1.0, DELTA)) if noise is not None else None
        result = Trainer(model, data, config, privacy=privacy).train()
    model.eval()
    return model, (result.privacy or {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overfit-steps", type=int, default=400, help="steps of the overfit and DP recipes")
    parser.add_argument("--epsilons", type=float, nargs="*", default=[50.0, 8.0, 1.0], help="DP-SGD targets")
    parser.add_argument("--shadows", type=int, default=4, help="LiRA shadow models per recipe (0: no LiRA)")
    parser.add_argument("--lira-for-dp", action="store_true", help="also train shadows for the DP recipes")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a model this small is per-op overhead; default 1)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    blocks = byte_blocks(4 * MEMBERS, seed=0)
    members, non_members, population = blocks[:MEMBERS], blocks[MEMBERS : 2 * MEMBERS], blocks[2 * MEMBERS :]
    candidates = torch.cat([members, non_members])
    is_member = np.r_[np.ones(MEMBERS, dtype=bool), np.zeros(MEMBERS, dtype=bool)]
    recipes = [
        Recipe("overfit", args.overfit_steps, 3e-3),
        Recipe("normal", NORMAL_STEPS, 3e-3, weight_decay=0.1),
    ] + [Recipe(f"DP-SGD eps={e:g}", args.overfit_steps, 3e-3, epsilon=e) for e in args.epsilons]
    rows, curves = [], {}
    for recipe in recipes:
        began = time.perf_counter()
        noise = None
        if recipe.epsilon is not None:
            noise = noise_multiplier_for_epsilon(recipe.epsilon, DELTA, BATCH / MEMBERS, recipe.steps)
        target, guarantee = train(recipe, members, seed=1, noise=noise)
        reference, _ = train(recipe, population, seed=2, noise=noise)
        losses = sequence_losses(target, candidates)
        held_out = sequence_losses(target, population[:MEMBERS])
        attacks = {
            "loss": evaluate_attack("loss", loss_attack_scores(losses), is_member),
            "reference": evaluate_attack(
                "reference", reference_attack_scores(losses, sequence_losses(reference, candidates)), is_member
            ),
        }
        if args.shadows and (recipe.epsilon is None or args.lira_for_dp):
            generator = np.random.default_rng(3)
            inside = np.zeros((args.shadows, 2 * MEMBERS), dtype=bool)
            for k in range(args.shadows):  # halves balanced per pair of shadows: each candidate IN and OUT
                half = generator.permutation(2 * MEMBERS)[:MEMBERS] if k % 2 == 0 else np.flatnonzero(~inside[k - 1])
                inside[k, half] = True
            shadow_losses = np.stack(
                [
                    sequence_losses(
                        train(recipe, candidates[torch.from_numpy(inside[k])], 10 + k, noise)[0], candidates
                    )
                    for k in range(args.shadows)
                ]
            )
            attacks["lira"] = evaluate_attack("lira", lira_scores(losses, shadow_losses, inside), is_member)
        row = {
            "recipe": recipe.name,
            "steps": recipe.steps,
            "epsilon": guarantee.get("epsilon"),
            "noise_multiplier": noise,
            "member_loss": float(losses[is_member].mean()),
            "non_member_loss": float(losses[~is_member].mean()),
            "held_out_loss": float(held_out.mean()),
            "attacks": {name: result.to_json() for name, result in attacks.items()},
            "seconds": time.perf_counter() - began,
        }
        rows.append(row)
        for name, result in attacks.items():
            curves[f"{recipe.name}: {name}"] = result
        summary = ", ".join(f"{n} AUC {r.auc:.3f} TPR@1% {r.tpr_at_1pct_fpr:.1%}" for n, r in attacks.items())
        print(f"{recipe.name}: {summary} ({row['seconds']:.0f} s)", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_roc(
        {k: v for k, v in curves.items() if not k.endswith("reference")},
        out / "membership_inference.png",
        title="membership inference, stdlib byte blocks",
    )
    result = {
        "machine": describe(torch=torch.__version__) | {"threads": args.threads},
        "setup": {
            "seq_len": SEQ_LEN,
            "members": MEMBERS,
            "non_members": MEMBERS,
            "batch": BATCH,
            "delta": DELTA,
            "shadows": args.shadows,
            "model": MODEL,
            "parameters": sum(p.numel() for p in Transformer(Config(**MODEL)).parameters()),
        },
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_results(out, "membership_inference", result, markdown(result))
    return 0


def _cell(attacks: dict, name: str, key: str, percent: bool = False) -> str:
    if name not in attacks:
        return "–"
    value = attacks[name][key]
    return f"{value:.1%}" if percent else f"{value:.3f}"


def markdown(result: dict) -> str:
    setup = result["setup"]
    lines = [
        "# Membership inference (genforge.safety.membership)",
        "",
        f"{setup['members']} member and {setup['non_members']} non-member blocks of {setup['seq_len']} bytes of stdlib "
        f"source; a {setup['parameters']:,}-parameter Llama-layout decoder; batch {setup['batch']}; δ = "
        f"{setup['delta']:g}; LiRA online with {setup['shadows']} shadows. Machine: {result['machine'].get('cpu', '')}; "
        f"{result['seconds']:.0f} s in all.",
        "",
        "| recipe | steps | ε (RDP) | σ | member / non-member loss | loss AUC | loss TPR@1% | reference AUC | "
        "reference TPR@1% | LiRA AUC | LiRA TPR@1% |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        attacks = row["attacks"]
        cell = functools.partial(_cell, attacks)
        epsilon = "∞" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        sigma = "–" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.2f}"
        lines.append(
            f"| {row['recipe']} | {row['steps']} | {epsilon} | {sigma} | "
            f"{row['member_loss']:.3f} / {row['non_member_loss']:.3f} | "
            f"{cell('loss', 'auc')} | {cell('loss', 'tpr_at_1pct_fpr', True)} | "
            f"{cell('reference', 'auc')} | {cell('reference', 'tpr_at_1pct_fpr', True)} | "
            f"{cell('lira', 'auc')} | {cell('lira', 'tpr_at_1pct_fpr', True)} |"
        )
    lines += ["", "Reproduce: `PYTHONPATH=src:benchmarks python benchmarks/membership_inference.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
