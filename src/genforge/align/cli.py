"""`genforge align METHOD`, registered by `genforge.cli`: one subcommand per alignment method.

Each method's module under `genforge.align` owns its command: `add_arguments(parser)` adds its
flags (the shared ones come from `align.flags`) and `run(args) -> int` calls the library and
reports; a bad value is the library's one-line error. `ALIGN_COMMANDS` lists them, so a new
method plugs in with one entry, e.g. `"grpo": AlignCommand("grpo", "GRPO: ...")` for
`genforge/align/grpo.py`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..ops.tracking import enable_tracking


@dataclass(frozen=True)
class AlignCommand:
    """One `genforge align NAME`.

    module: the module under `genforge.align` that defines `add_arguments(parser)` and
        `run(args) -> int` (imported when the parser is built).
    help: the one line `genforge align --help` shows.
    defaults: set on the subcommand's parser before `add_arguments` runs, which reads them with
        `parser.get_default`, so one module serves several names: `preference` serves the DPO
        family, each name with its `loss`. `run` finds them on `args`.
    """

    module: str
    help: str
    defaults: Mapping[str, Any] = field(default_factory=dict)


def _preference(loss: str, help: str) -> AlignCommand:
    return AlignCommand("preference", help, {"loss": loss})


# In the order `genforge align --help` lists them.
ALIGN_COMMANDS: dict[str, AlignCommand] = {
    "reward": AlignCommand("reward_train", "train a reward model on preference pairs (Bradley-Terry loss)"),
    "dpo": _preference("dpo", "direct preference optimisation on pairs (Rafailov et al. 2023)"),
    "ipo": _preference("ipo", "IPO: DPO with a squared loss to a fixed margin (Azar et al. 2023)"),
    "cdpo": _preference("cdpo", "conservative DPO: some labels assumed flipped (Mitchell 2023)"),
    "hinge": _preference("hinge", "hinge loss on the DPO margin (SLiC, Zhao et al. 2023)"),
    "robust": _preference("robust", "robust DPO under label noise (Chowdhury et al. 2024)"),
    "orpo": _preference("orpo", "ORPO: SFT plus an odds-ratio term, no reference model (Hong et al. 2024)"),
    "simpo": _preference("simpo", "SimPO: length-normalised margin, no reference model (Meng et al. 2024)"),
    "kto": AlignCommand("kto", "KTO on unpaired desirable / undesirable completions (Ethayarajh et al. 2024)"),
    "critique": AlignCommand(
        "constitutional", "constitutional AI: critique and revise answers by written principles into preference pairs"
    ),
    "ppo": AlignCommand("ppo", "PPO (RLHF): a value head, GAE and an adaptive KL penalty to the reference"),
    "grpo": AlignCommand(
        "grpo", "GRPO: group-normalised advantages from reward functions, no value model (Shao et al. 2024)"
    ),
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge align` and its method subcommands to the top-level parser."""
    parser = sub.add_parser(
        "align",
        help="align a model: reward models, DPO and its family, ORPO, SimPO, KTO, PPO, GRPO",
        description="Align a model to preferences or a reward. Each method is a subcommand with its own flags "
        "(genforge align METHOD --help); all read a Hugging Face model directory and JSONL data, write a run "
        "directory with checkpoints and metrics.jsonl, show progress and continue with --resume.",
        epilog="example: genforge align dpo --model sft-model/ --data pairs.jsonl --out runs/dpo --beta 0.1",
    )
    methods = parser.add_subparsers(dest="align_method", required=True, metavar="METHOD")
    for name, command in ALIGN_COMMANDS.items():
        module = importlib.import_module(f"{__package__}.{command.module}")
        child = methods.add_parser(name, help=command.help)
        child.set_defaults(**command.defaults)
        module.add_arguments(child)
        child.set_defaults(func=module.run)
        # critique writes a pairs file, not a run directory: tracked like an evaluation
        enable_tracking(child, run_dir_flag=None if name == "critique" else "out")


__all__ = ["ALIGN_COMMANDS", "AlignCommand", "add_commands"]
