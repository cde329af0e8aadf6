"""genforge.align.cli: `genforge align METHOD`, one subcommand per registry entry, each with its
own flags; a new method plugs in with one entry."""

from __future__ import annotations

from inspect import unwrap

import pytest

from genforge.align import kto, preference, reward_train
from genforge.align.cli import ALIGN_COMMANDS, AlignCommand
from genforge.align.preference import PREFERENCE_LOSSES
from genforge.cli import build_parser, main


def test_the_registry_serves_the_dpo_family_reward_and_kto():
    family = {name for name, command in ALIGN_COMMANDS.items() if command.module == "preference"}
    assert family == set(PREFERENCE_LOSSES)
    assert all(ALIGN_COMMANDS[name].defaults == {"loss": name} for name in family)
    assert ALIGN_COMMANDS["reward"].module == "reward_train" and ALIGN_COMMANDS["kto"].module == "kto"


def test_each_method_parses_to_its_module_with_its_own_knobs():
    parser = build_parser()
    common = ["--model", "m", "--data", "d.jsonl", "--out", "o"]
    args = parser.parse_args(["align", "simpo", *common, "--gamma", "0.8", "--beta", "2.5"])
    assert (unwrap(args.func), args.loss, args.gamma, args.beta) == (preference.run, "simpo", 0.8, 2.5)
    args = parser.parse_args(["align", "cdpo", *common, "--label-smoothing", "0.2", "--reference-model", "r"])
    assert (args.loss, args.label_smoothing, args.reference_model) == ("cdpo", 0.2, "r")
    args = parser.parse_args(["align", "reward", *common, "--center-rewards-coefficient", "0.01", "--method", "full"])
    assert (unwrap(args.func), args.center_rewards_coefficient, args.method) == (reward_train.run, 0.01, "full")
    args = parser.parse_args(["align", "kto", *common, "--desirable-weight", "1.5", "--resume", "--steps", "7"])
    assert (unwrap(args.func), args.desirable_weight, args.undesirable_weight, args.resume, args.steps) == (
        kto.run,
        1.5,
        1.0,
        True,
        7,
    )
    with pytest.raises(SystemExit):  # SimPO's target margin is no DPO knob
        parser.parse_args(["align", "dpo", *common, "--gamma", "1"])
    with pytest.raises(SystemExit):
        parser.parse_args(["align", "reward", *common, "--method", "qlora"])


def test_help_of_each_method_names_its_knobs(capsys):
    parser = build_parser()
    knobs = {
        "reward": "--center-rewards-coefficient",
        "simpo": "--gamma",
        "cdpo": "--label-smoothing",
        "kto": "--undesirable-weight",
        "ppo": "--kl-coef",
        "grpo": "--num-generations",
        "critique": "--principles",
    }
    for name in ALIGN_COMMANDS:
        with pytest.raises(SystemExit):
            parser.parse_args(["align", name, "--help"])
        text = capsys.readouterr().out
        assert f"usage: genforge align {name}" in text
        # Every training run continues with --resume; critique writes pairs, it trains nothing.
        assert ("--resume" in text) == (name != "critique")
        if name in knobs:
            assert knobs[name] in text
    with pytest.raises(SystemExit):
        parser.parse_args(["align", "dpo", "--help"])
    assert "--label-smoothing" not in capsys.readouterr().out  # dpo takes none: the flag is hidden


def test_a_flag_the_loss_does_not_take_gets_the_library_refusal(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text("")
    status = main(
        [
            "align",
            "dpo",
            "--model",
            str(tmp_path / "m"),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ]
        + ["--label-smoothing", "0.1"]
    )
    assert status == 2 and "for conservative DPO use cdpo" in capsys.readouterr().err


def test_one_registry_entry_adds_a_command(monkeypatch):
    """The hook other methods use: an entry naming a module with add_arguments and run."""
    monkeypatch.setitem(ALIGN_COMMANDS, "sigmoid", AlignCommand("preference", "DPO by another name", {"loss": "dpo"}))
    args = build_parser().parse_args(["align", "sigmoid", "--model", "m", "--data", "d", "--out", "o"])
    assert unwrap(args.func) is preference.run and args.loss == "dpo"
