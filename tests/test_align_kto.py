"""genforge.align.kto: unpaired examples read and checked, each paired with a mismatched
completion for the KL reference point; the first step's loss equals kto_loss on log-probabilities
computed independently; training widens the desirable / undesirable reward margin; resume is
exact; the command runs and bad input is refused before work."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from finetune_shared import tiny_chat_model_dir
from safetensors.torch import load_file

from genforge.align.data import PreferenceDataError
from genforge.align.kto import (
    KTOConfig,
    KTOError,
    KTORows,
    build_kto_examples,
    mismatched_partners,
    parse_kto_record,
    read_kto_records,
    train_kto,
)
from genforge.align.losses import kto_loss
from genforge.checkpoint import load_model
from genforge.cli import main
from genforge.tokenizer import Tokenizer


def sum_examples(count: int, seed: int = 0) -> list[dict]:
    """Unpaired rated answers to one-digit sums: the right sum desirable, a wrong one not."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        a, b = rng.randrange(10), rng.randrange(10)
        right = index % 2 == 0
        answer = a + b if right else a + b + rng.choice([-2, -1, 1, 2])
        records.append({"prompt": f"{a}+{b}=", "completion": str(answer), "label": right})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "kto.jsonl", sum_examples(40))


def _config(model_dir, data, out, **overrides) -> KTOConfig:
    settings = dict(max_steps=4, batch_size=8, lr=1e-3, eval_fraction=0.2, progress=False, seed=0)
    return KTOConfig(model_dir=model_dir, data=data, out_dir=out, **(settings | overrides))


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------------------------- data
def test_records_of_every_shape_become_labelled_examples():
    plain = parse_kto_record({"prompt": "2+3=", "completion": "5", "label": True})
    assert plain == [{"chat": False, "prompt": "2+3=", "completion": "5", "desirable": True}]
    chat = parse_kto_record(
        {
            "prompt": [{"role": "user", "content": "2+3="}],
            "completion": [{"role": "assistant", "content": "6"}],
            "label": False,
        }
    )
    assert (
        chat[0]["chat"] and chat[0]["completion"] == {"role": "assistant", "content": "6"} and not chat[0]["desirable"]
    )
    pair = parse_kto_record({"prompt": "2+3=", "chosen": "5", "rejected": "6"})
    assert [(e["completion"], e["desirable"]) for e in pair] == [("5", True), ("6", False)]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a", "completion": "b", "label": 1}, "'label' must be true or false .* got 1 \\(int\\)"),
        ({"prompt": "a", "completion": "b", "label": "true"}, "'label' must be true or false"),
        ({"prompt": "a", "completion": "b"}, "missing field\\(s\\) \\['label'\\]"),
        ({"prompt": "a", "completion": "  ", "label": True}, "the completion is empty"),
        ({"prompt": "a", "completion": [{"role": "user", "content": "b"}], "label": True}, ".*role 'assistant'"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, ".*same text"),
    ],
)
def test_bad_records_are_refused_naming_the_line(record, message, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a", "label": True}, record])
    with pytest.raises(PreferenceDataError, match=f"bad.jsonl:2: {message}"):
        read_kto_records(path)


def test_each_example_is_paired_with_a_completion_of_another_prompt(tokenizer, tmp_path):
    records = read_kto_records(
        write_jsonl(tmp_path / "d.jsonl", sum_examples(12) + [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    )
    examples = build_kto_examples(records, tokenizer, max_length=64, seed=3)
    prompts = [e.prompt_ids for e in examples]
    partners = mismatched_partners(prompts, seed=3)
    assert all(partner != index for index, partner in enumerate(partners))
    for index, example in enumerate(examples):
        assert prompts[partners[index]] != example.prompt_ids  # also for the pair's two halves
        assert example.kl_completion_ids == examples[partners[index]].completion_ids
        assert example.kl_prompt_ids == example.prompt_ids
    assert mismatched_partners(prompts, seed=3) == partners  # seeded
    rows = KTORows(examples, tokenizer.pad_token_id)
    batch = rows.batch([0, 1])
    for row, example in enumerate(examples[:2]):
        for side, (prompt, answer) in enumerate(
            ((example.prompt_ids, example.completion_ids), (example.kl_prompt_ids, example.kl_completion_ids))
        ):
            mask = batch["completion_mask"][row, side].bool()
            assert batch["input_ids"][row, side][mask].tolist() == answer
            assert batch["input_ids"][row, side, : len(prompt)].tolist() == prompt
    assert batch["desirable"].tolist() == [examples[0].desirable, examples[1].desirable]


def test_long_prompts_are_cut_from_the_left_never_the_completions(tokenizer, tmp_path):
    records = read_kto_records(
        write_jsonl(
            tmp_path / "l.jsonl",
            [
                {"prompt": "one two three four five six seven eight nine", "completion": "short", "label": True},
                {"prompt": "a", "completion": "It is five. Blue sky", "label": False},
            ],
        )
    )
    examples = build_kto_examples(records, tokenizer, max_length=20)
    assert examples[0].truncated_prompt_tokens > 0 and examples[0].length <= 20
    assert examples[0].prompt_ids == tokenizer.encode(records[0][1]["prompt"])[-len(examples[0].prompt_ids) :]
    assert len(examples[0].kl_prompt_ids) < len(examples[0].prompt_ids)  # its pair's long completion needs more room
    with pytest.raises(PreferenceDataError, match="l.jsonl:1: .*exceed the limits"):
        build_kto_examples(records, tokenizer, max_length=20, overflow="error")
    with pytest.raises(PreferenceDataError, match="l.jsonl:2: a completion of .* tokens leaves no room"):
        build_kto_examples(records, tokenizer, max_length=8)


# ------------------------------------------------------------------------------------- the run
def _sequence_logprob(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion | prompt) from the full logits, one sequence at a time."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(len(targets)), targets][len(prompt) - 1 :].sum()


def test_first_step_loss_equals_kto_loss_on_independent_log_probs(model_dir, tokenizer, tmp_path):
    """A full run whose reference is another model (so the log-ratios are not 0): one step over
    every example; its logged loss and KL equal kto_loss and the reference point computed from
    full-logit log-probabilities, with unequal weights."""
    reference_dir = tiny_chat_model_dir(tmp_path / "reference", seed=7)
    data = write_jsonl(
        tmp_path / "d.jsonl", sum_examples(10, seed=2) + [{"prompt": "4+4=", "chosen": "8", "rejected": "9"}]
    )
    weights = dict(desirable_weight=1.3, undesirable_weight=0.7, beta=0.5)
    run = dict(method="full", reference_model=reference_dir, eval_fraction=0.0, max_steps=1, batch_size=12)
    with pytest.warns(UserWarning, match="weigh 1.86 to 1 .* advises 1 to 4/3"):
        train_kto(_config(model_dir, data, tmp_path / "run", **run, **weights))
    examples = build_kto_examples(read_kto_records(data), tokenizer, max_length=128, seed=0)
    policy, reference = load_model(model_dir), load_model(reference_dir)

    def scores(model, kl: bool):
        return torch.stack(
            [
                _sequence_logprob(
                    model, e.kl_prompt_ids if kl else e.prompt_ids, e.kl_completion_ids if kl else e.completion_ids
                )
                for e in examples
            ]
        )

    expected = kto_loss(
        scores(policy, False),
        scores(reference, False),
        torch.tensor([e.desirable for e in examples]),
        scores(policy, True),
        scores(reference, True),
        **weights,
    )
    first = _metrics(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(float(expected.losses.mean()), abs=1e-5)
    z0 = float((scores(policy, True) - scores(reference, True)).mean().clamp(min=0))
    assert first["kl"] == pytest.approx(z0, abs=1e-5)
    assert first["count/chosen"] == 6 and first["count/rejected"] == 6
    assert first["rewards/chosen_sum"] == pytest.approx(float(expected.chosen_rewards.sum()), abs=1e-4)


def test_training_widens_the_margin_between_desirable_and_undesirable(model_dir, data_file, tmp_path):
    """LoRA, 6 steps (beta 0.5, lr 3e-3) on the sums, scored on the same examples: at the start
    the policy is the reference (every reward 0, the loss 1/2); after, the desirable answers'
    mean reward is above the undesirable ones'. Measured: margin 0 -> +0.056 (0.11 nats of
    log-ratio), loss 0.5 -> 0.493; asserted: a margin above 0.02."""
    config = _config(model_dir, data_file, tmp_path / "kto", eval_data=data_file, max_steps=6, beta=0.5, lr=3e-3)
    result = train_kto(config)
    assert result.before["val_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert result.before["val_loss"] == pytest.approx(0.5, abs=1e-6)
    assert result.after["val_rewards/margins"] > 0.02
    assert result.after["val_loss"] < result.before["val_loss"]
    assert result.desirable_examples == result.undesirable_examples == 20
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in _metrics(tmp_path / "kto") if "loss" in r)


def test_resumed_run_equals_an_uninterrupted_one(model_dir, data_file, tmp_path):
    whole = train_kto(_config(model_dir, data_file, tmp_path / "whole", save_every=2))
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-00000004")
    (tmp_path / "split" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    resumed = train_kto(_config(model_dir, data_file, tmp_path / "split", save_every=2), resume=True)
    assert resumed.reference_seconds == 0.0  # read from the run's cache
    assert resumed.before == whole.before
    assert resumed.after["val_loss"] == pytest.approx(whole.after["val_loss"], abs=1e-6)
    ours = load_file(resumed.output_dir / "adapter_model.safetensors")
    for name, tensor in load_file(whole.output_dir / "adapter_model.safetensors").items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0)
    with pytest.raises(KTOError, match="reference log-probabilities of other examples"):
        other = write_jsonl(tmp_path / "other.jsonl", sum_examples(40, seed=5))
        train_kto(_config(model_dir, other, tmp_path / "split", save_every=2, max_steps=6), resume=True)


def test_refusals_before_work(model_dir, data_file, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(model_dir, foreign)
    vocabulary = json.loads((foreign / "tokenizer.json").read_text())
    first, second = list(vocabulary["model"]["vocab"])[40:42]
    vocab = vocabulary["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (foreign / "tokenizer.json").write_text(json.dumps(vocabulary))
    with pytest.raises(KTOError, match="another tokenizer"):
        train_kto(_config(model_dir, data_file, tmp_path / "a", reference_model=foreign))
    for field, value in (("beta", 0), ("desirable_weight", -1.0), ("undesirable_weight", float("nan"))):
        with pytest.raises(KTOError, match=f"{field} must be a finite number > 0"):
            train_kto(_config(model_dir, data_file, tmp_path / "b", **{field: value}))
    with pytest.raises(KTOError, match="unknown method"):
        train_kto(_config(model_dir, data_file, tmp_path / "c", method="ia3"))
    assert not any((tmp_path / name).exists() for name in "abc")


def test_the_command_trains_and_reports(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "cli"
    status = main(
        ["align", "kto", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), "--steps", "2"]
        + ["--batch-size", "4", "--lr", "1e-3", "--beta", "0.2", "--desirable-weight", "1.2", "--eval-fraction", "0.2"]
    )
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        summary["steps"] == 2 and summary["settings"]["beta"] == 0.2 and summary["settings"]["desirable_weight"] == 1.2
    )
    assert summary["held_out_examples"] == 8 and (out / "adapter" / "adapter_config.json").is_file()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b", "label": "yes"}])
    assert main(["align", "kto", "--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl:1: 'label' must be true or false" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_kto_equals_one_process(model_dir, data_file, tmp_path):
    """`torchrun ... genforge align kto`: two gloo processes, each scoring its half of every
    batch, end with the adapter one process trains on the whole batch. The reference is another
    model, so each half's KL estimate differs from the other's: the reference point must be the
    whole batch's on both ranks for the runs to agree (with each rank's own, they do not)."""
    import os
    import socket
    import subprocess
    import sys

    reference_dir = tiny_chat_model_dir(tmp_path / "reference", seed=7)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ["--data", str(data_file), "--steps", "3", "--batch-size", "4", "--lr", "3e-3", "--beta", "0.5"]
    settings += ["--reference-model", str(reference_dir), "--eval-fraction", "0.2"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    command = launch + ["-m", "genforge.cli", "align", "kto", "--model", str(model_dir), "--out", str(tmp_path / "ddp")]
    done = subprocess.run(
        command + settings, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one = dict(max_steps=3, batch_size=4, lr=3e-3, beta=0.5, reference_model=reference_dir)
    single = train_kto(_config(model_dir, data_file, tmp_path / "one", **one))
    ours = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    for name, tensor in load_file(single.output_dir / "adapter_model.safetensors").items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    steps = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ours_kl = [r["kl"] for r in steps if "loss" in r]
    assert ours_kl == pytest.approx([r["kl"] for r in _metrics(tmp_path / "one") if "loss" in r], abs=1e-5)
