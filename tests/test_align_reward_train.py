"""genforge.align.reward_train: a reward model trained on preference pairs with the Bradley-Terry
loss learns a preference it can see (held-out accuracy far above chance), saves a directory that
RewardModel and transformers' sequence classifier score alike, resumes exactly, and refuses bad
input before work."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import transformers
from finetune_shared import tiny_chat_model_dir
from safetensors.torch import load_file

from genforge.align.data import PreferenceDataError, PreferenceDataset
from genforge.align.losses import reward_model_loss
from genforge.align.reward import RewardModel, pairwise_accuracy, score_sequences
from genforge.align.reward_train import (
    RewardConfig,
    RewardObjective,
    RewardRows,
    RewardTrainingError,
    read_reward_records,
    train_reward_model,
)
from genforge.checkpoint import load_model
from genforge.cli import main
from genforge.tokenizer import Tokenizer

WORDS = ["sky", "two", "three", "five", "name", "colour", "add", "is", "the", "of"]


def marked_pairs(count: int, seed: int, margin: bool = False) -> list[dict]:
    """Pairs of random word strings where the chosen one holds the word "Blue" somewhere (not
    at a fixed place) and the rejected one does not: a preference the last token's state can
    learn to see, and nothing else tells the two apart."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):

        def words():
            return [rng.choice(WORDS) for _ in range(rng.randrange(3, 6))]

        chosen = words()
        chosen.insert(rng.randrange(len(chosen) + 1), "Blue")
        record = {"prompt": f"What {rng.choice(WORDS)}?", "chosen": " ".join(chosen), "rejected": " ".join(words())}
        if margin:
            record["margin"] = rng.choice([0.0, 0.5, 1.0])
        records.append(record)
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    return write_jsonl(directory / "train.jsonl", marked_pairs(64, 0)), write_jsonl(
        directory / "held.jsonl", marked_pairs(32, 1)
    )


@pytest.fixture(scope="module")
def trained(model_dir, data, tmp_path_factory):
    """`genforge align reward` (LoRA r=8 on every block linear, the head trained too), 12 steps."""
    out = tmp_path_factory.mktemp("run") / "rm"
    train, held = data
    status = main(
        ["align", "reward", "--model", str(model_dir), "--data", str(train), "--eval-data", str(held)]
        + ["--out", str(out), "--steps", "12", "--batch-size", "16", "--lr", "1e-2"]
    )
    assert status == 0
    return out


def test_held_out_accuracy_rises_far_above_chance(trained, capsys):
    """Measured: held-out pairwise accuracy 0.25 (the random head) -> 1.00 after 12 steps, mean
    margin +2.3; asserted: at least 0.9 after and a gain of at least 0.4."""
    summary = json.loads((trained / "reward.json").read_text())
    before, after = summary["before"]["val_rewards/accuracies"], summary["after"]["val_rewards/accuracies"]
    assert after >= 0.9 and after >= before + 0.4
    assert summary["after"]["val_rewards/margins"] > summary["before"]["val_rewards/margins"] + 1.0
    assert summary["held_out_pairs"] == 32 and summary["train_pairs"] == 64 and summary["steps"] == 12
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 12 and {"rewards/accuracies", "rewards/margins"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_saved_model_scores_alike_in_genforge_and_transformers(trained, model_dir, data):
    ours = RewardModel.from_pretrained(trained / "model")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(trained / "model").eval()
    tokenizer = Tokenizer.from_dir(trained / "model")
    assert ours.config.pad_token_id == tokenizer.pad_token_id == theirs.config.pad_token_id
    held = PreferenceDataset.from_jsonl(data[1], tokenizer).pairs
    sequences = [pair.prompt_ids + pair.chosen_ids for pair in held[:6]]
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)], mask[row, : len(sequence)] = torch.tensor(sequence), 1
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, mask), theirs(ids, attention_mask=mask).logits.squeeze(-1), atol=1e-5, rtol=1e-5
        )
    # The saved (merged) model ranks the held-out pairs as the run's last evaluation did.
    pairs = [(p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids) for p in held]
    after = json.loads((trained / "reward.json").read_text())["after"]
    assert pairwise_accuracy(ours, pairs).accuracy == pytest.approx(after["val_rewards/accuracies"])


def test_a_reward_model_trains_further_from_its_checkpoint(trained, data, tmp_path):
    """--model may be a reward model: its head is kept (so the start is the trained accuracy)."""
    result = train_reward_model(
        RewardConfig(trained / "model", data[0], tmp_path / "more", eval_data=data[1], max_steps=1, progress=False)
    )
    finished = json.loads((trained / "reward.json").read_text())["after"]
    assert result.before["val_rewards/accuracies"] == pytest.approx(finished["val_rewards/accuracies"])


def test_objective_equals_the_loss_on_independently_scored_pairs(model_dir, tmp_path):
    """Margins and centring: the step objective's loss equals reward_model_loss on rewards
    scored one sequence at a time."""
    path = write_jsonl(tmp_path / "m.jsonl", marked_pairs(6, 3, margin=True))
    tokenizer = Tokenizer.from_dir(model_dir)
    records = read_reward_records(path)
    pairs = PreferenceDataset.from_records(records, tokenizer).pairs
    margins = [parsed["margin"] for _, parsed in records]
    rows = RewardRows(pairs, tokenizer.pad_token_id, margins)
    torch.manual_seed(0)
    model = RewardModel(load_model(model_dir))
    model.config.pad_token_id = tokenizer.pad_token_id
    batch = rows.batch(range(6))
    loss, metrics = RewardObjective(center_rewards_coefficient=0.01).micro_loss(model, model, batch, total_weight=8)
    chosen = score_sequences(model, [p.prompt_ids + p.chosen_ids for p in pairs])
    rejected = score_sequences(model, [p.prompt_ids + p.rejected_ids for p in pairs])
    expected = reward_model_loss(chosen, rejected, torch.tensor(margins), 0.01)
    torch.testing.assert_close(loss, expected.losses.sum() / 8, atol=1e-6, rtol=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx(float((chosen > rejected).sum()) / 8)
    without = reward_model_loss(chosen, rejected).losses.sum() / 8
    assert float(loss.detach()) != pytest.approx(float(without))  # the margins and centring did count


def test_resumed_run_equals_an_uninterrupted_one(model_dir, data, tmp_path):
    """Full fine-tuning, checkpoints every 2 of 4 steps: resuming from step 2 ends with the same
    weights and held-out scores. The resumed half runs with gradient checkpointing, which
    recomputes the same activations."""

    def config(out, **overrides):
        settings = dict(method="full", eval_data=data[1], max_steps=4, save_every=2, batch_size=8, lr=3e-3)
        return RewardConfig(model_dir, data[0], out, progress=False, **(settings | overrides))

    whole = train_reward_model(config(tmp_path / "whole"))
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-00000004")
    (tmp_path / "split" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    resumed = train_reward_model(config(tmp_path / "split", gradient_checkpointing=True), resume=True)
    assert resumed.before == whole.before
    assert resumed.after["val_loss"] == pytest.approx(whole.after["val_loss"], abs=1e-5)
    ours = load_file(resumed.output_dir / "model.safetensors")
    for name, tensor in load_file(whole.output_dir / "model.safetensors").items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=0, msg=name)
    assert "score.weight" in ours


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a", "chosen": "x", "rejected": "x"}, "same text"),
        ({"prompt": "a", "chosen": " ", "rejected": "x"}, "completion is empty"),
        ({"prompt": "a", "chosen": "x", "rejected": "y", "margin": "big"}, "'margin' must be a finite number"),
        ({"prompt": "a", "chosen": "x", "rejected": "y", "margin": True}, "'margin' must be a finite number"),
    ],
)
def test_bad_pairs_are_refused_naming_the_line(record, message, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(PreferenceDataError, match=f"bad.jsonl:2: .*{message}"):
        read_reward_records(path)


def test_bad_runs_are_refused_before_work(model_dir, data, tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1}] * 2)
    mixed.write_text(mixed.read_text() + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(PreferenceDataError, match="mixed.jsonl:3: has no 'margin'"):
        train_reward_model(RewardConfig(model_dir, mixed, tmp_path / "a", progress=False))
    with pytest.raises(RewardTrainingError, match="qlora"):
        train_reward_model(RewardConfig(model_dir, data[0], tmp_path / "b", method="qlora"))
    with pytest.raises(RewardTrainingError, match="center_rewards_coefficient"):
        train_reward_model(RewardConfig(model_dir, data[0], tmp_path / "c", center_rewards_coefficient=-1))
    with pytest.raises(RewardTrainingError, match="does not exist"):
        train_reward_model(RewardConfig(model_dir, tmp_path / "none.jsonl", tmp_path / "d"))
    assert not any((tmp_path / name).exists() for name in "abcd")
    assert main(["align", "reward", "--model", str(model_dir), "--data", str(mixed), "--out", str(tmp_path / "e")]) == 2
