"""genforge tune: Optuna over short runs, pruning, a resumable study and the written results."""

import json

import factories
import pytest
import torch
from test_train_trainer import SEQ_LEN

from genforge.train import TokenDataset, TrainConfig
from genforge.train.tune import TuneError, parse_space, tune

PATTERN = torch.arange(3, 26).repeat(30)


def test_space_parsing_and_errors():
    dims = parse_space(["lr=log:1e-4:1e-2", "warmup_steps=int:0:4", "batch_size=choice:4,8"])
    assert [(d.name, d.kind) for d in dims] == [("lr", "log"), ("warmup_steps", "int"), ("batch_size", "choice")]
    assert dims[2].choices == (4, 8)
    for bad, message in [
        ("lr=log:0:1", "LOW > 0"),
        ("lr=normal:1:2", "NAME=KIND"),
        ("depth=int:1:4", "cannot be searched"),
        ("lr=float:3", "LOW:HIGH"),
        ("batch_size=choice:4", "two choices"),
    ]:
        with pytest.raises(TuneError, match=message):
            parse_space([bad])


def test_search_finds_the_better_learning_rate_prunes_and_resumes(tmp_path):
    import optuna

    data = TokenDataset(PATTERN[:600], SEQ_LEN), TokenDataset(PATTERN[600:], SEQ_LEN)
    base = TrainConfig(out_dir=tmp_path, max_steps=8, batch_size=4, eval_batches=2, progress=False, export=False)
    space = parse_space(["lr=log:1e-6:3e-2"])
    # Two sensible trials first, then a hopeless one that the median rule stops at its first report.
    study = optuna.create_study(study_name="genforge-tune", storage=f"sqlite:///{tmp_path / 'study.db'}")
    for lr in (1e-2, 3e-2, 1e-6):
        study.enqueue_trial({"lr": lr})
    result = tune(factories.tiny_model, *data, base, space, trials=3, out_dir=tmp_path, eval_every=2)
    states = {t["lr"]: (t["state"], t["steps"]) for t in result.trials}
    assert states[1e-6] == ("pruned", 2)
    assert result.best_params["lr"] in (1e-2, 3e-2)
    best = json.loads((tmp_path / "best_config.json").read_text())
    assert best["train_config"]["lr"] == result.best_params["lr"] and best["val_loss"] == result.best_value
    assert "| pruned |" in (tmp_path / "trials.md").read_text()
    # Asking for 4 trials continues the stored study with one more.
    again = tune(factories.tiny_model, *data, base, space, trials=4, out_dir=tmp_path, eval_every=2)
    assert len(again.trials) == 4


def test_tune_command(text_model_dir, tmp_path, capsys):
    from genforge.cli import main

    (tmp_path / "corpus.txt").write_text("the key value cache keeps past keys and values so decoding is fast. " * 30)
    args = ["tune", "--model", str(text_model_dir), "--text", str(tmp_path / "corpus.txt"), "--seq-len", "16"]
    args += ["--steps", "2", "--eval-every", "1", "--trials", "2", "--batch-size", "2", "--eval-batches", "1"]
    assert main([*args, "--space", "lr=log:1e-4:1e-2", "--out", str(tmp_path / "study")]) == 0
    assert "best_params" in json.loads(capsys.readouterr().out)
    assert (tmp_path / "study" / "trials.csv").read_text().count("\n") == 3
    assert main([*args, "--space", "depth=int:1:2", "--out", str(tmp_path / "bad")]) == 2
    assert "cannot be searched" in capsys.readouterr().err
