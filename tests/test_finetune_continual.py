"""genforge.finetune.continual: elastic weight consolidation (the penalty and its gradient
against the formula, the Fisher against a hand loop of squared gradients, saved and loaded),
replay shares, and both wired into fine-tuning runs (task A, then task B)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_model
from finetune_shared import arithmetic_records, tiny_chat_model_dir
from safetensors.torch import save_file

from genforge.checkpoint import load_model
from genforge.finetune import SFTExample, SFTRows
from genforge.finetune.continual import (
    ContinualError,
    EWCPenalty,
    diagonal_fisher,
    example_batches,
    load_ewc,
    save_ewc,
    task_loss,
    trainable_snapshot,
    with_replay,
)
from genforge.finetune.run import FinetuneConfig, finetune
from genforge.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _examples(count, offset=0, seed=0, length=8):
    """Random examples whose second half is the target; token ids from offset to offset + 31."""
    rng = random.Random(seed)
    examples = []
    for number in range(count):
        ids = [offset + rng.randrange(32) for _ in range(length)]
        examples.append(SFTExample(ids, [-100] * (length // 2) + ids[length // 2 :], source=f"{offset}:{number}"))
    return examples


class Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -0.5]]))
        self.b = torch.nn.Parameter(torch.tensor([1.5, -2.0]))


# ------------------------------------------------------------------------------------------ EWC
def test_penalty_is_the_formula_zero_at_the_anchor_and_its_gradient_is_strength_f_delta():
    model = Pair()
    generator = torch.Generator().manual_seed(0)
    fisher = {name: torch.rand(p.shape, generator=generator) for name, p in model.named_parameters()}
    anchor = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    penalty = EWCPenalty(fisher, anchor, strength=7.0)
    value = penalty(model)
    expected = 0.0  # element by element, in Python floats
    for name, parameter in model.named_parameters():
        for f, theta, star in zip(fisher[name].flatten(), parameter.flatten(), anchor[name].flatten()):
            expected += float(f) * (float(theta.detach()) - float(star)) ** 2
    assert float(value.detach()) == pytest.approx(3.5 * expected, rel=1e-6)
    value.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, 7.0 * fisher[name] * (parameter.detach() - anchor[name]))
    at_anchor = EWCPenalty(fisher, trainable_snapshot(model), strength=7.0)(model)
    assert float(at_anchor.detach()) == 0.0


def test_penalty_refuses_a_model_it_does_not_fit():
    model = Pair()
    fisher = {"a": torch.ones(2, 3), "c": torch.ones(4)}
    with pytest.raises(ContinualError, match="names 1 parameters this model does not have"):
        EWCPenalty(fisher, fisher, 1.0)(model)
    with pytest.raises(ContinualError, match=r"a is \(2, 3\) in the model but \(3, 2\) in the Fisher"):
        EWCPenalty({"a": torch.ones(3, 2)}, {"a": torch.ones(3, 2)}, 1.0)(model)
    model.a.requires_grad_(False)
    with pytest.raises(ContinualError, match="a is frozen in this model"):
        EWCPenalty({"a": torch.ones(2, 3)}, {"a": torch.ones(2, 3)}, 1.0)(model)
    with pytest.raises(ContinualError, match="strength must be >= 0"):
        EWCPenalty({"b": torch.ones(2)}, {"b": torch.ones(2)}, -1.0)
    with pytest.raises(ContinualError, match="different parameters"):
        EWCPenalty({"b": torch.ones(2)}, {"a": torch.ones(2, 3)}, 1.0)
    with pytest.raises(ContinualError, match="negative or non-finite"):
        EWCPenalty({"b": -torch.ones(2)}, {"b": torch.ones(2)}, 1.0)


def test_fisher_equals_a_hand_loop_of_squared_batch_gradients():
    model = tiny_model(0)
    model.blocks[0].requires_grad_(False)  # frozen parameters get no Fisher
    rows = SFTRows(_examples(6), seq_len=16, pad_id=0, packing=False)
    batches = [rows.batch([0, 1]), rows.batch([2, 3, 4]), rows.batch([5])]
    fisher = diagonal_fisher(model, batches)
    assert all(p.grad is None for p in model.parameters())
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert fisher.keys() == trainable.keys() and not any(name.startswith("blocks.0.") for name in fisher)
    expected = {name: torch.zeros_like(p) for name, p in trainable.items()}
    model.eval()
    for batch in batches:
        model.zero_grad()
        logits = model(batch["input_ids"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        for name, parameter in trainable.items():
            expected[name] += parameter.grad.square() / len(batches)
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], atol=1e-9, rtol=1e-5)
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    # one example per batch (the per-example Fisher) and max_batches
    per_example = diagonal_fisher(model, example_batches(_examples(6)), max_batches=2)
    first_two = diagonal_fisher(model, [rows.batch([0]), rows.batch([1])])
    for name in per_example:
        torch.testing.assert_close(per_example[name], first_two[name], atol=1e-9, rtol=1e-5)


def test_fisher_refuses_batches_with_nothing_to_score():
    model = tiny_model(0)
    empty = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.full((1, 3), -100)}
    with pytest.raises(ContinualError, match="batch 0 has no target tokens"):
        diagonal_fisher(model, [empty])
    with pytest.raises(ContinualError, match="no batches"):
        diagonal_fisher(model, [])
    with pytest.raises(ContinualError, match="no trainable parameters"):
        diagonal_fisher(model.requires_grad_(False), [empty])


def test_ewc_file_round_trip_and_refusals(tmp_path):
    model = tiny_model(0)
    fisher = diagonal_fisher(model, example_batches(_examples(3)))
    path = save_ewc(tmp_path / "ewc" / "fisher.safetensors", fisher, trainable_snapshot(model), examples=3)
    loaded_fisher, loaded_anchor = load_ewc(path)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(loaded_fisher[name], fisher[name], atol=0, rtol=0)
        torch.testing.assert_close(loaded_anchor[name], parameter.detach(), atol=0, rtol=0)
    assert float(EWCPenalty.from_file(path, 10.0)(model).detach()) == 0.0
    save_file({"x": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ContinualError, match="is not an EWC file"):
        load_ewc(tmp_path / "other.safetensors")
    with pytest.raises(ContinualError, match="does not exist"):
        load_ewc(tmp_path / "missing.safetensors")


def _train(model, examples, steps, tmp_path, regularizer=None, lr=3e-3):
    rows = SFTRows(examples, seq_len=32, pad_id=0, packing=True)
    config = TrainConfig(out_dir=tmp_path, max_steps=steps, batch_size=4, lr=lr, progress=False, export=False)
    Trainer(model, rows, config, regularizer=regularizer).train()
    return model


def test_strong_ewc_keeps_the_weights_that_task_a_relies_on(tmp_path):
    task_a, task_b = _examples(24, offset=0, seed=1), _examples(24, offset=32, seed=2)
    model_a = _train(tiny_model(0), task_a, 20, tmp_path / "a")
    fisher = diagonal_fisher(model_a, example_batches(task_a))
    anchor = trainable_snapshot(model_a)
    a_loss = task_loss(model_a, example_batches(task_a))["loss"]
    runs = {}
    for strength in (0.0, 1e4):
        model = tiny_model(0)
        model.load_state_dict(model_a.state_dict())
        penalty = EWCPenalty(fisher, anchor, strength) if strength else None
        runs[strength] = _train(model, task_b, 20, tmp_path / str(strength), regularizer=penalty)
    measure = EWCPenalty(fisher, anchor, 2.0)  # sum F (theta - theta*)^2
    drift = {s: float(measure(m).detach()) for s, m in runs.items()}
    moved = {
        s: max(float((p.detach() - anchor[n]).abs().max()) for n, p in m.named_parameters()) for s, m in runs.items()
    }
    forgot = {s: task_loss(m, example_batches(task_a))["loss"] - a_loss for s, m in runs.items()}
    assert drift[1e4] < 0.05 * drift[0.0] and moved[1e4] < moved[0.0]
    assert forgot[1e4] < 0.25 * forgot[0.0] and forgot[0.0] > 0


# --------------------------------------------------------------------------------------- replay
def test_replay_share_of_old_examples():
    new, old = _examples(90, offset=0), _examples(10, offset=32)
    mixed = with_replay(new, old, share=0.25, seed=3)
    replayed = [e for e in mixed if e.source.startswith("32:")]
    assert len(mixed) == 120 and len(replayed) == 30  # 30 / 120 = the share, every new example kept
    assert sorted(e.source for e in mixed if e not in replayed) == sorted(e.source for e in new)
    assert {e.source: replayed.count(e) for e in old} == {e.source: 3 for e in old}  # each once before twice
    assert [e.source for e in with_replay(new, old, 0.25, seed=3)] == [e.source for e in mixed]
    assert [e.source for e in with_replay(new, old, 0.25, seed=4)] != [e.source for e in mixed]
    assert with_replay(new, old, 0.0) == new
    assert len(with_replay(new, old, 0.1)) == 100
    with pytest.raises(ContinualError, match=r"share must be a number in \[0, 1\), got 1"):
        with_replay(new, old, 1)
    with pytest.raises(ContinualError, match="needs earlier examples"):
        with_replay(new, [], 0.5)


# ---------------------------------------------------------------------------- fine-tuning runs
def _reversal_records(count, seed=0):
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(3, 7)))
        records.append({"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": word[::-1]}]})
    return records


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tasks")
    for name, records in (("a", arithmetic_records(60)), ("b", _reversal_records(60))):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tiny_chat_model_dir(directory / "base"), directory / "a.jsonl", directory / "b.jsonl"


def _run(model_dir, data, out, **changes):
    settings = dict(
        model_dir=model_dir, data=data, out_dir=out, method="full", max_steps=6, batch_size=4, seq_len=48, lr=3e-3
    )
    return finetune(FinetuneConfig(**(settings | {"eval_fraction": 0.1, "progress": False} | changes)))


def test_task_a_then_b_with_ewc_from_the_saved_fisher(tasks, tmp_path):
    base, a, b = tasks
    run_a = _run(base, a, tmp_path / "a", save_fisher=True, fisher_examples=20)
    fisher, anchor = load_ewc(tmp_path / "a" / "fisher.safetensors")
    model_a = load_model(run_a.output_dir)
    assert fisher.keys() == {name for name, _ in model_a.named_parameters()}
    for name, parameter in model_a.named_parameters():
        torch.testing.assert_close(anchor[name], parameter.detach(), atol=0, rtol=0)
    drift = {}
    for label, changes in (("plain", {}), ("ewc", {"ewc_fisher": tmp_path / "a" / "fisher.safetensors"})):
        run_b = _run(run_a.output_dir, b, tmp_path / label, ewc_strength=1e5, **changes)
        drift[label] = float(EWCPenalty(fisher, anchor, 2.0)(load_model(run_b.output_dir)).detach())
    assert drift["ewc"] < 0.2 * drift["plain"]
    with pytest.raises(ContinualError, match="is frozen in this model"):  # a full-model Fisher on a LoRA run
        _run(run_a.output_dir, b, tmp_path / "lora", method="lora", ewc_fisher=tmp_path / "a" / "fisher.safetensors")


def test_replay_and_ewc_data_in_a_run(tasks, tmp_path):
    base, a, b = tasks
    run = _run(base, b, tmp_path / "r", replay_data=a, replay_share=0.25, ewc_data=a, fisher_examples=8, max_steps=2)
    assert run.train_examples == 54 + 18  # B's 54 training examples and 18 of A's (a quarter of 72)
    assert run.held_out_examples == 6  # only B's held-out split is scored


def test_continual_options_are_refused_before_work(tasks, tmp_path):
    base, a, b = tasks
    cases = [
        ({"replay_data": a, "replay_share": 0.0}, r"replay_share must be in \(0, 1\)"),
        ({"ewc_data": a, "ewc_fisher": a}, "not both"),
        ({"ewc_data": a, "ewc_strength": 0.0}, "ewc_strength must be a finite number > 0"),
        ({"replay_data": tmp_path / "none.jsonl"}, "none.jsonl does not exist"),
    ]
    for changes, message in cases:
        with pytest.raises(ContinualError, match=message):
            _run(base, b, tmp_path / "refused", **changes)
    assert not (tmp_path / "refused").exists()


def test_cli_flags(tasks, tmp_path, capsys):
    from genforge.cli import main

    base, a, b = tasks
    common = ["--method", "full", "--steps", "2", "--batch-size", "4", "--seq-len", "48", "--lr", "1e-3"]
    assert main(["finetune", "--model", str(base), "--data", str(a), "--out", str(tmp_path / "a"), *common,
                 "--save-fisher", "--fisher-examples", "4"]) == 0  # fmt: skip
    assert (tmp_path / "a" / "fisher.safetensors").is_file()
    argv = ["finetune", "--model", str(tmp_path / "a" / "model"), "--data", str(b), "--out", str(tmp_path / "b")]
    assert main(argv + common + ["--ewc-fisher", str(tmp_path / "a" / "fisher.safetensors"), "--ewc-strength",
                                 "100", "--replay-data", str(a), "--replay-share", "0.5"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train_examples"] == 2 * 57
