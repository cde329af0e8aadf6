"""Mixed precision on CPU (slow but the same code path as CUDA): bf16 autocast and fp16 with a
dynamic loss scaler follow the fp32 loss curve; the scaler skips overflowing steps, shrinks the
scale and grows it back."""

import json
from pathlib import Path

import pytest
import torch
from test_train_trainer import SEQ_LEN, make_trainer

from genforge.train import TokenDataset

# A learnable stream (a repeating 23-token phrase), so the curves fall far enough to compare.
PATTERN = TokenDataset(torch.arange(3, 26).repeat(40), SEQ_LEN)


def metrics(out_dir):
    records = map(json.loads, Path(out_dir, "metrics.jsonl").read_text().splitlines())
    return [r for r in records if "loss" in r and "eval_loss" not in r]


def curve(tmp_path, precision, steps=24):
    trainer = make_trainer(tmp_path / precision, data=PATTERN, max_steps=steps, precision=precision, eval_every=0)
    trainer.train()
    return metrics(tmp_path / precision)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_loss_curve_follows_fp32(precision, tmp_path):
    reference = [r["loss"] for r in curve(tmp_path, "fp32")]
    records = curve(tmp_path, precision)
    losses = [r["loss"] for r in records]
    assert losses[-1] < 0.75 * losses[0]  # it learns
    assert losses != reference  # the products really ran in half precision
    # bf16 keeps 8 significant bits, fp16 11: per-step losses stay within a few percent of fp32's.
    tolerance = 0.03 if precision == "bf16" else 0.01
    assert max(abs(a - b) / b for a, b in zip(losses, reference)) < tolerance
    if precision == "fp16":
        assert all(r["loss_scale"] == 2.0**16 and r["skipped"] == 0 for r in records)
    else:
        assert "loss_scale" not in records[0]


def test_fp16_scaler_skips_overflow_then_grows(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=12, precision="fp16", eval_every=0)
    # 2**24 overflows this model's fp16 gradients: each overflow halves the scale and skips the update.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=3)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    first = trainer.train_step(trainer._next_batches())
    assert first["skipped"] == 1 and first["loss_scale"] == 2.0**24
    assert all(torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    records = [first] + [trainer.train_step(trainer._next_batches()) for _ in range(11)]
    scales = [r["loss_scale"] for r in records]
    for earlier, later, record in zip(scales, scales[1:], records):
        assert later == (earlier / 2 if record["skipped"] else earlier) or later == 2 * earlier
    # Three clean steps in a row double the scale (growth_interval=3).
    assert any(later == 2 * earlier for earlier, later in zip(scales, scales[1:]))
    assert sum(r["skipped"] for r in records) < len(records)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
