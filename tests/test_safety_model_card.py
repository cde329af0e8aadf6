"""genforge model-card: Hub metadata that huggingface_hub parses, facts from the run's files."""

from __future__ import annotations

import argparse
import json

import pytest
from factories import tiny_model
from huggingface_hub import ModelCard

from genforge.checkpoint import save_model
from genforge.safety import card_cli
from genforge.safety.model_card import ModelCardError, build_model_card


def test_model_card_from_run_records(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "run" / "model")
    run = tmp_path / "run"
    lines = [
        {"step": 1, "loss": 4.0, "tokens": 100},
        {"step": 2, "loss": 3.5, "tokens": 100},
        {"step": 2, "val_loss": 3.25, "val_ppl": 25.79},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "results.json").write_text(json.dumps({"hellaswag": {"task": "hellaswag", "metrics": {"acc": 0.25}}}))
    bias = {"kind": "seat", "tests": {"weat1": {"name": "WEAT 1", "effect_size": 1.32, "p_value": 1e-5}}}
    (run / "bias.json").write_text(json.dumps(bias))
    (run / "privacy.json").write_text(json.dumps({"epsilon": 3.0, "delta": 1e-5, "mia": {"auc": 0.52}}))

    parser = argparse.ArgumentParser()
    card_cli.add_commands(parser.add_subparsers())
    args = parser.parse_args(["model-card", "--model", str(run / "model"), "--license", "apache-2.0"])
    assert args.func(args) == 0
    text = (run / "model" / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.license == "apache-2.0" and card.data.library_name == "genforge"
    assert card.data.eval_results[0].metric_type == "acc" and card.data.eval_results[0].metric_value == 0.25
    params = sum(
        p.numel() for p in model.parameters() if p is not model.lm_head.weight or not model.config.tie_word_embeddings
    )
    assert f"| parameters | {params:,} |" in text
    assert "steps: 2; tokens seen: 200" in text and "final validation loss: 3.2500 (perplexity 25.79)" in text
    assert "| WEAT 1 | 1.32 | 1.0e-05 |" in text and "- mia.auc: 0.52" in text
    assert "| hellaswag | acc | 0.2500 |" in text


def test_model_card_without_records_and_bad_dir(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    text = build_model_card(tmp_path / "m")
    assert ModelCard(text).data.eval_results is None
    assert "No training records" in text and "No evaluation results" in text
    with pytest.raises(ModelCardError, match="no config.json"):
        build_model_card(tmp_path)
