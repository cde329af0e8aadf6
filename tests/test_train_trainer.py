"""genforge.train.Trainer: exact resume after SIGKILL, safe failure on bad checkpoints, HF export
parity, learning, gradient accumulation, gradient checkpointing and bad input."""

import copy
import functools
import json
import signal
import subprocess
import sys
from pathlib import Path

import factories
import pytest
import torch

from genforge.train import DataError, TokenDataset, TrainConfig, Trainer, TrainError

SEQ_LEN = 16


# The decoder of factories.py with its special tokens named.
tiny_model = functools.partial(factories.tiny_model, bos_token_id=1, eos_token_id=2)


def corpus(n_tokens=640, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (n_tokens,), generator=generator)


def make_trainer(out_dir, model=None, data=None, **overrides):
    """The run both halves of the resume test build identically (also used by the child process)."""
    settings = dict(
        out_dir=out_dir,
        max_steps=6,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        seed=3,
        progress=False,
        eval_every=2,
        eval_batches=2,
        export=False,
    )
    settings.update(overrides)
    model = model if model is not None else tiny_model(dropout=0.1)  # dropout: RNG state must resume too
    data = data if data is not None else TokenDataset(corpus(), SEQ_LEN)
    sampler = settings.pop("sampler", None)
    val_data = TokenDataset(corpus(160, seed=1), SEQ_LEN)
    return Trainer(model, data, TrainConfig(**settings), val_data=val_data, sampler=sampler)


CHILD = """
import os, signal, sys
import torch
torch.set_num_threads({threads})  # the parent's count: reductions split by thread count
sys.path.insert(0, {tests!r})
from test_train_trainer import make_trainer
N = {n}
def die(step, path):
    if step == N:
        os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a power cut: no cleanup, no flush
make_trainer({out!r}, max_steps=2 * N, save_every=N).train(on_checkpoint=die)
raise SystemExit("the child was not killed")
"""


def losses(out_dir):
    return [r["loss"] for r in map(json.loads, Path(out_dir, "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    n = 3
    straight = make_trainer(tmp_path / "straight", max_steps=2 * n, save_every=n)
    straight.train()

    killed = tmp_path / "killed"
    script = CHILD.format(tests=str(Path(__file__).parent), n=n, out=str(killed), threads=torch.get_num_threads())
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["step"] == n
    assert len(losses(killed)) == n

    resumed = make_trainer(killed, model=tiny_model(seed=99, dropout=0.1), max_steps=2 * n, save_every=n)
    result = resumed.train(resume=True)
    assert [step for step, _ in result.losses] == list(range(n + 1, 2 * n + 1))
    assert losses(killed) == losses(tmp_path / "straight")  # bit-identical floats
    straight_state, resumed_state = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(straight_state[k], resumed_state[k]) for k in straight_state)

    def val(directory):
        lines = Path(directory, "metrics.jsonl").read_text().splitlines()
        return [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r]

    assert val(killed) == val(tmp_path / "straight")


def _snapshot(directory):
    return {p: p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


def test_missing_or_corrupt_checkpoint_is_a_clear_error_and_overwrites_nothing(tmp_path):
    with pytest.raises(TrainError, match="no checkpoint"):
        make_trainer(tmp_path / "empty").train(resume=True)

    out = tmp_path / "run"
    make_trainer(out, max_steps=2, save_every=1).train()
    with pytest.raises(TrainError, match="already holds a training run"):
        make_trainer(out, max_steps=2).train()

    weights = out / "checkpoints" / "step-00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _snapshot(out)
    with pytest.raises(TrainError, match="corrupt"):
        make_trainer(out, max_steps=4).train(resume=True)
    assert _snapshot(out) == before

    state = out / "checkpoints" / "step-00000001" / "trainer_state.pt"
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "dir": "step-00000001"}))
    state.write_bytes(b"not a checkpoint")
    before = _snapshot(out)
    with pytest.raises(TrainError, match="corrupt"):
        make_trainer(out, max_steps=4).train(resume=True)
    state.unlink()
    with pytest.raises(TrainError, match="missing trainer_state.pt"):
        make_trainer(out, max_steps=4).train(resume=True)
    before.pop(state)
    assert _snapshot(out) == before

    (out / "checkpoints" / "latest.json").write_text("{")
    with pytest.raises(TrainError, match="latest.json is corrupt"):
        make_trainer(out, max_steps=4).train(resume=True)


def test_resume_refuses_a_changed_data_order(tmp_path):
    make_trainer(tmp_path, max_steps=1, warmup_steps=0).train()
    with pytest.raises(TrainError, match="batch_size: 4 -> 2"):
        make_trainer(tmp_path, max_steps=2, warmup_steps=0, batch_size=2).train(resume=True)


def test_exported_model_matches_transformers_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, model=tiny_model(), max_steps=3, export=True)
    result = trainer.train()
    reference = AutoModelForCausalLM.from_pretrained(result.export_dir).eval()
    ids = corpus(2 * SEQ_LEN, seed=5).view(2, SEQ_LEN)
    trainer.model.eval()
    with torch.no_grad():
        ours, theirs = trainer.model(ids).logits, reference(ids).logits
    assert float((ours - theirs).abs().max()) <= 1e-4


def test_loss_goes_down_on_a_memorisable_corpus(tmp_path):
    pattern = torch.arange(3, 3 + SEQ_LEN)
    data = TokenDataset(pattern.repeat(16), SEQ_LEN)
    trainer = Trainer(
        tiny_model(),
        data,
        TrainConfig(
            out_dir=tmp_path,
            max_steps=30,
            batch_size=4,
            lr=1e-2,
            warmup_steps=3,
            progress=True,
            eval_every=10,
            peak_flops=1e12,
        ),
        val_data=TokenDataset(pattern.repeat(2), SEQ_LEN),
    )
    result = trainer.train()
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.2 * first, (first, last)
    assert [e["step"] for e in result.evals] == [10, 20, 30]
    assert result.evals[-1]["val_ppl"] < 2.0
    records = trainer.read_metrics()
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result.export_dir / "config.json").exists()


def test_gradient_accumulation_equals_one_double_batch(tmp_path):
    base = tiny_model()
    data = TokenDataset(corpus(), SEQ_LEN)
    runs = {}
    for name, batch_size, accum in (("double", 4, 1), ("accumulated", 2, 2)):
        trainer = Trainer(
            copy.deepcopy(base),
            data,
            TrainConfig(
                out_dir=tmp_path / name,
                max_steps=1,
                lr=1e-3,
                batch_size=batch_size,
                grad_accum=accum,
                progress=False,
                export=False,
                adam_eps=1e-6,
            ),
        )
        runs[name] = (trainer.train(), trainer.model.state_dict())
    assert runs["double"][0].losses[0][1] == pytest.approx(runs["accumulated"][0].losses[0][1], abs=1e-6)
    for key, value in runs["double"][1].items():
        assert float((value - runs["accumulated"][1][key]).abs().max()) <= 1e-6, key


def test_gradient_checkpointing_gives_the_same_step_and_is_undone(tmp_path):
    base = tiny_model(dropout=0.1)
    states = []
    for checkpointing in (False, True):
        trainer = make_trainer(
            tmp_path / str(checkpointing), model=copy.deepcopy(base), max_steps=2, gradient_checkpointing=checkpointing
        )
        trainer.train()
        states.append(trainer.model.state_dict())
        assert all("forward" not in vars(block) for block in trainer.model.blocks)
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=1e-6)


def test_mixture_of_experts_trains_with_the_balancing_term(tmp_path):
    def run(aux_loss_coef, out_dir):
        model = tiny_model(family="mixtral", num_experts=4, num_experts_per_token=2)
        return make_trainer(out_dir, model=model, max_steps=2, aux_loss_coef=aux_loss_coef).train()

    result = run(0.1, tmp_path / "balanced")
    assert len(result.losses) == 2 and all(loss > 0 for _, loss in result.losses)
    # The same first step without the term has the same weights, batch and cross-entropy, so the
    # difference is 0.1 x the balancing loss: about top_k (2) under a fresh router's near-uniform routing.
    plain = run(0.0, tmp_path / "plain")
    assert result.losses[0][1] - plain.losses[0][1] == pytest.approx(0.1 * 2, rel=0.1)


def test_bad_input_is_rejected_before_work(tmp_path):
    with pytest.raises(DataError, match="empty"):
        TokenDataset([], SEQ_LEN)
    with pytest.raises(DataError, match="fewer than one sequence"):
        TokenDataset(list(range(10)), SEQ_LEN)
    with pytest.raises(DataError, match="seq_len"):
        TokenDataset(list(range(10)), 1)
    with pytest.raises(TrainError, match="vocab_size"):
        make_trainer(tmp_path, data=TokenDataset(torch.full((64,), 64), SEQ_LEN))
    with pytest.raises(TrainError, match="precision 'fp8' is not supported"):
        make_trainer(tmp_path, precision="fp8")
    with pytest.raises(TrainError, match="max_steps"):
        make_trainer(tmp_path, max_steps=0)
    assert not Path(tmp_path, "checkpoints").exists()


def test_pretrain_command_reads_prepared_shards(text_model_dir, tmp_path, capsys):
    """`genforge pretrain --data DIR` trains on `genforge data prepare` output (memory-mapped
    shards through load_prepared) and exports the model with its tokenizer."""
    import importlib
    import pydoc

    from genforge.cli import main
    from genforge.train.prepare import prepare

    sources = tmp_path / "docs"
    sources.mkdir()
    for name in ("json", "csv", "textwrap", "heapq"):  # real prose: the stdlib's own documentation
        text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        for start in range(0, len(text), 3000):
            (sources / f"{name}-{start}.txt").write_text(text[start : start + 3000])
    prepare([sources], text_model_dir, tmp_path / "prepared", seq_len=SEQ_LEN, val_fraction=0.3)
    run = tmp_path / "run"
    flags = [
        "--model",
        str(text_model_dir),
        "--out",
        str(run),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--warmup",
        "0",
        "--eval-every",
        "0",
        "--save-every",
        "0",
    ]
    assert main(["pretrain", "--data", str(tmp_path / "prepared"), *flags]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and any("val_loss" in r for r in records)
    assert (run / "model" / "tokenizer.json").exists()
    assert "trained to step 2" in capsys.readouterr().err
    # Both sources, or neither, is a clear error before any work.
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(tmp_path / "prepared"),
                "--text",
                "x.txt",
                *flags[:2],
                "--out",
                str(tmp_path / "other"),
            ]
        )
        == 2
    )
    assert "exactly one of --text" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
