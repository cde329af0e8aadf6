"""genforge.align.data and align.preference: preference pairs read, checked and tokenized; the
preference trainer over the fine-tuning loop: DPO starts at log 2, LoRA's reference (adapters
off) equals a frozen copy, one concatenated forward pass scores both completions as separate
passes do, resume equals an uninterrupted run, and the command writes what generate loads."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil

import pytest
import torch
from finetune_shared import randomize, tiny_chat_model_dir
from safetensors.torch import load_file

from genforge.align import dpo_loss
from genforge.align.data import (
    PreferenceDataError,
    PreferenceDataset,
    PreferenceRows,
    parse_preference_record,
    read_preference_records,
    tokenize_preference_record,
)
from genforge.align.logprobs import completion_logprobs
from genforge.align.preference import (
    PreferenceConfig,
    PreferenceError,
    PreferenceObjective,
    pair_logprobs,
    reference_logprobs,
    train_preferences,
)
from genforge.checkpoint import load_model
from genforge.cli import main
from genforge.finetune import LoraConfig, apply_lora, disabled_adapters, load_adapter
from genforge.loading import load_for_inference
from genforge.tokenizer import Tokenizer


def sum_pairs(count: int, seed: int = 0, chat: bool = True) -> list[dict]:
    """(correct sum preferred to a wrong one) pairs over one-digit operands."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        prompt = f"{a}+{b}="
        if chat:
            records.append(
                {"prompt": [{"role": "user", "content": prompt}], "chosen": str(a + b), "rejected": str(wrong)}
            )
        else:
            records.append({"prompt": prompt, "chosen": str(a + b), "rejected": str(wrong)})
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
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", sum_pairs(40))


def _config(model_dir, data, out, **overrides) -> PreferenceConfig:
    settings = dict(max_steps=4, batch_size=4, lr=1e-3, eval_fraction=0.2, progress=False, seed=0)
    return PreferenceConfig(model_dir=model_dir, data=data, out_dir=out, **(settings | overrides))


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------------------------- data
def test_chat_pairs_render_the_prompt_with_its_generation_prompt(tokenizer):
    parsed = parse_preference_record(sum_pairs(1)[0])
    pair = tokenize_preference_record(tokenizer, parsed, where="x:1")
    prompt = tokenizer.decode(pair.prompt_ids)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in prompt
    assert tokenizer.decode(pair.chosen_ids).endswith("<|im_end|>")  # the turn ends where the model stops
    assert tokenizer.decode(pair.chosen_ids)[:-10] == sum_pairs(1)[0]["chosen"]


def test_plain_pairs_end_with_eos_and_implicit_prompts_are_the_shared_turns(tokenizer):
    plain = tokenize_preference_record(tokenizer, parse_preference_record(sum_pairs(1, chat=False)[0]))
    assert plain.chosen_ids[-1] == tokenizer.eos_token_id and plain.rejected_ids[-1] == tokenizer.eos_token_id
    user = {"role": "user", "content": "2+3="}
    implicit = parse_preference_record(
        {
            "chosen": [user, {"role": "assistant", "content": "5"}],
            "rejected": [user, {"role": "assistant", "content": "6"}],
        }
    )
    assert implicit["prompt"] == [user] and implicit["chosen"]["content"] == "5"


def test_rows_lay_out_chosen_and_rejected_with_completion_masks(tokenizer):
    dataset = PreferenceDataset.from_records([("r", parse_preference_record(r)) for r in sum_pairs(3)], tokenizer)
    rows = PreferenceRows(dataset.pairs, pad_id=0)
    batch = rows.batch([2, 0])
    pair = dataset.pairs[2]
    start = len(pair.prompt_ids)
    assert batch["input_ids"].shape[:2] == (2, 2)
    assert batch["input_ids"][0, 1, : start + len(pair.rejected_ids)].tolist() == pair.prompt_ids + pair.rejected_ids
    assert batch["completion_mask"][0, 0].nonzero().flatten().tolist() == list(
        range(start, start + len(pair.chosen_ids))
    )
    assert batch["attention_mask"][0, 0].sum() == start + len(pair.chosen_ids)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "1+1=", "chosen": "2"}, "missing field"),
        ({"prompt": "1+1=", "chosen": "  ", "rejected": "3"}, "chosen completion is empty"),
        ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "same text"),
        ({"prompt": "1+1=", "chosen": 2, "rejected": "3"}, "must be a string"),
        ({"prompt": [{"role": "user", "content": "1+1="}], "chosen": [], "rejected": "3"}, "non-empty list"),
    ],
)
def test_bad_records_are_refused_naming_the_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", sum_pairs(2) + [record])
    with pytest.raises(PreferenceDataError, match=rf"bad.jsonl:3: .*{message}"):
        read_preference_records(path)


def test_prompts_are_cut_from_the_left_and_counted_never_the_answers(tokenizer):
    long_prompt = {"prompt": "What is two plus three? " * 4, "chosen": "It is five.", "rejected": "Blue."}
    parsed = [
        ("f:1", parse_preference_record(long_prompt)),
        ("f:2", parse_preference_record(sum_pairs(1, chat=False)[0])),
    ]
    whole = tokenize_preference_record(tokenizer, parsed[0][1])
    dataset = PreferenceDataset.from_records(parsed, tokenizer, max_length=whole.length - 5)
    cut = dataset.pairs[0]
    assert (dataset.truncated_pairs, dataset.truncated_tokens) == (1, 5) and cut.truncated_prompt_tokens == 5
    assert cut.prompt_ids == whole.prompt_ids[5:] and cut.chosen_ids == whole.chosen_ids
    with pytest.raises(PreferenceDataError, match="f:1: .*overflow='truncate'"):
        PreferenceDataset.from_records(parsed, tokenizer, max_length=whole.length - 5, overflow="error")
    with pytest.raises(PreferenceDataError, match="f:1: a completion of .* never cut"):
        PreferenceDataset.from_records(parsed, tokenizer, max_length=len(whole.chosen_ids))


# ----------------------------------------------------------------------------- log-probabilities
def test_one_concatenated_pass_scores_as_separate_passes(model_dir, tokenizer):
    """Chosen and rejected stacked in one padded batch give each completion's log-probability of
    its own unpadded forward pass."""
    model = load_model(model_dir).eval()
    dataset = PreferenceDataset.from_records([("r", parse_preference_record(r)) for r in sum_pairs(3)], tokenizer)
    batch = PreferenceRows(dataset.pairs, pad_id=0).batch(range(3))
    chosen, rejected = pair_logprobs(model, batch)
    for number, pair in enumerate(dataset.pairs):
        for answer, scored in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
            ids = torch.tensor([pair.prompt_ids + answer])
            mask = torch.zeros_like(ids)
            mask[0, len(pair.prompt_ids) :] = 1
            alone = completion_logprobs(model, ids, torch.ones_like(ids), mask)
            torch.testing.assert_close(scored.sum[number], alone.sum[0], atol=1e-5, rtol=0)


def test_lora_reference_is_the_base_with_adapters_off(model_dir, tokenizer):
    """With trained (non-zero) adapters, the LoRA model's reference scores equal a frozen copy
    of the base's, and the adapters are on again afterwards."""
    dataset = PreferenceDataset.from_records([("r", parse_preference_record(r)) for r in sum_pairs(5)], tokenizer)
    rows = PreferenceRows(dataset.pairs, pad_id=0)
    base = load_model(model_dir)
    frozen_copy = copy.deepcopy(base).requires_grad_(False)
    adapted = apply_lora(base, LoraConfig(target_modules=["qkv", "o", "gate_up", "down"], r=4))
    randomize(adapted.named_parameters())
    torch.testing.assert_close(reference_logprobs(adapted, rows, 2), reference_logprobs(frozen_copy, rows, 3))
    adapted_scores = pair_logprobs(adapted.eval(), rows.batch(range(5)))[0].sum
    assert not torch.allclose(adapted_scores, reference_logprobs(frozen_copy, rows)[:, 0], atol=1e-3)
    with disabled_adapters(adapted):
        torch.testing.assert_close(
            pair_logprobs(adapted, rows.batch(range(5)))[0].sum, reference_logprobs(frozen_copy, rows)[:, 0]
        )


def test_objective_matches_dpo_loss_on_the_pairs_log_probs(model_dir, tokenizer):
    dataset = PreferenceDataset.from_records([("r", parse_preference_record(r)) for r in sum_pairs(4)], tokenizer)
    rows = PreferenceRows(dataset.pairs, pad_id=0)
    model = load_model(model_dir).eval()
    rows.set_reference(reference_logprobs(load_model(model_dir, dtype=torch.float32), rows) - 0.3)
    batch = rows.batch(range(4))
    loss, metrics = PreferenceObjective("dpo", beta=0.5).micro_loss(model, model, batch, total_weight=8)
    chosen, rejected = pair_logprobs(model, batch)
    expected = dpo_loss(chosen.sum, rejected.sum, batch["reference_logps"][:, 0], batch["reference_logps"][:, 1], 0.5)
    torch.testing.assert_close(loss, expected.losses.sum() / 8)
    assert metrics["rewards/margins"] == pytest.approx(
        float((expected.chosen_rewards - expected.rejected_rewards).sum()) / 8
    )


# ------------------------------------------------------------------------------------- the run
def test_dpo_starts_at_log_2_and_lora_equals_full_with_a_frozen_copy(model_dir, pairs_file, tmp_path):
    """At the first step the policy is the reference, so every pair's DPO loss is log 2; the
    LoRA run (reference: adapters off) and the full run with a frozen copy loaded as the
    reference give the same first loss."""
    lora = train_preferences(_config(model_dir, pairs_file, tmp_path / "lora", max_steps=1))
    full = train_preferences(
        _config(model_dir, pairs_file, tmp_path / "full", max_steps=1, method="full", reference_model=model_dir)
    )
    first_lora, first_full = _metrics(tmp_path / "lora")[0], _metrics(tmp_path / "full")[0]
    assert first_lora["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first_full["loss"] == pytest.approx(first_lora["loss"], abs=1e-6)
    assert first_lora["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert lora.before["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert lora.output_dir.name == "adapter" and full.output_dir.name == "model"
    saved = load_file(tmp_path / "lora" / "checkpoints" / "step-00000001" / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # trainable-only checkpoints
    assert (tmp_path / "lora" / "reference_logps.safetensors").is_file()


def test_resumed_run_equals_an_uninterrupted_one(model_dir, pairs_file, tmp_path):
    whole = train_preferences(_config(model_dir, pairs_file, tmp_path / "whole", save_every=2))
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-00000004")
    (tmp_path / "split" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    resumed = train_preferences(_config(model_dir, pairs_file, tmp_path / "split", save_every=2), resume=True)
    assert resumed.reference_seconds == 0.0  # read from the run's cache, not recomputed
    assert resumed.before == whole.before
    assert resumed.after["val_loss"] == pytest.approx(whole.after["val_loss"], abs=1e-6)
    ours = load_file(resumed.output_dir / "adapter_model.safetensors")
    for name, tensor in load_file(whole.output_dir / "adapter_model.safetensors").items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss", ["ipo", "cdpo", "hinge", "robust", "orpo", "simpo"])
def test_every_loss_trains_towards_the_chosen_answers(loss, model_dir, pairs_file, tmp_path):
    """A few steps on the pairs widen their mean reward margin (scored on the same pairs)."""
    config = _config(model_dir, pairs_file, tmp_path / loss, loss=loss, eval_data=pairs_file, max_steps=4)
    result = train_preferences(config)
    records = _metrics(tmp_path / loss)
    assert len([r for r in records if "loss" in r]) == 4 and all(math.isfinite(r.get("loss", 0)) for r in records)
    assert result.after["val_rewards/margins"] > result.before["val_rewards/margins"]
    assert result.after["val_loss"] < result.before["val_loss"]
    assert result.settings["beta"] == (2.0 if loss == "simpo" else 0.1)


def test_refusals_before_work(model_dir, pairs_file, tmp_path):
    with pytest.raises(PreferenceError, match="unknown preference loss"):
        train_preferences(_config(model_dir, pairs_file, tmp_path / "a", loss="kto2"))
    with pytest.raises(PreferenceError, match="label_smoothing applies to cdpo"):
        train_preferences(_config(model_dir, pairs_file, tmp_path / "b", label_smoothing=0.1))
    with pytest.raises(PreferenceError, match="uses no reference model"):
        train_preferences(_config(model_dir, pairs_file, tmp_path / "c", loss="orpo", reference_model=model_dir))
    assert not (tmp_path / "a").exists()


def test_the_command_writes_an_adapter_that_generate_loads(model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "cli"
    status = main(
        ["align", "dpo", "--model", str(model_dir), "--data", str(pairs_file), "--out", str(out), "--steps", "2"]
        + ["--batch-size", "4", "--lr", "1e-3", "--beta", "0.2", "--rank", "4", "--eval-fraction", "0.2"]
    )
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["settings"]["beta"] == 0.2 and summary["held_out_pairs"] == 8
    trained = load_adapter(load_model(model_dir), out / "adapter")
    loaded = load_for_inference(model_dir, adapter=out / "adapter", pack=False)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, trained.eval()(ids).logits, atol=1e-5, rtol=0)
    assert (
        main(
            ["align", "orpo", "--model", str(model_dir), "--data", str(pairs_file), "--out", str(out / "x")]
            + ["--reference-model", str(model_dir)]
        )
        == 2
    )


# ------------------------------------------------------------------------ the embedded task
def _noisy_sums_model(directory, seed: int):
    """A tiny model trained on the spot on every one-digit sum "a+b=", half of its answers
    correct and half one too high: it answers right about three times in four. Returns
    (model directory, tokenizer)."""
    base = tiny_chat_model_dir(directory / "init", seed=seed, hidden_size=64, intermediate_size=128)
    tokenizer = Tokenizer.from_dir(base)
    eos = tokenizer.eos_token_id
    sequences = [
        tokenizer.encode(f"{a}+{b}=", add_special_tokens=False) + tokenizer.encode(str(a + b + d), False) + [eos]
        for a in range(10)
        for b in range(10)
        for d in (0, 1)
    ]
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), eos)
    scored = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        scored[row, 4 : len(sequence)] = True  # the answer and its eos
    model = load_model(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits[scored[:, 1:]], ids[:, 1:][scored[:, 1:]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    from genforge.checkpoint import save_model

    return save_model(model, directory / "sft", tokenizer), tokenizer


@torch.no_grad()
def _exact_match(model, tokenizer, facts) -> float:
    model.eval()
    hits = 0
    for a, b in facts:
        ids = tokenizer.encode(f"{a}+{b}=", add_special_tokens=False)
        for _ in range(3):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
        hits += tokenizer.decode(ids[4:]) == str(a + b)
    return hits / len(facts)


@torch.no_grad()
def _likelihood_preference(model, rows) -> float:
    """The share of pairs whose chosen answer the model itself finds likelier."""
    chosen, rejected = pair_logprobs(model.eval(), rows.batch(range(len(rows))))
    return float((chosen.sum > rejected.sum).float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_on_correct_over_wrong_sums_raises_held_out_accuracy(seed, tmp_path):
    """DPO on (correct > one too high, correct > one too low) pairs of 70 sums; the other 30 sums
    are held out. Measured (LoRA, 40 steps): exact match 0.77 -> 1.0 (seed 0), 0.73 -> 1.0
    (seed 1); asserted: a gain of at least 0.15 and at least 0.9 after."""
    model_dir, tokenizer = _noisy_sums_model(tmp_path, seed)
    facts = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(facts)
    train_facts, held_facts = facts[:70], facts[70:]

    def pairs(chosen_facts):
        return [
            {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + d)}
            for a, b in chosen_facts
            for d in (1, -1)
            if a + b + d >= 0
        ]

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(train_facts))
    held = write_jsonl(tmp_path / "held.jsonl", pairs(held_facts))
    held_rows = PreferenceRows(PreferenceDataset.from_jsonl(held, tokenizer).pairs, tokenizer.eos_token_id)
    before_model = load_model(model_dir)
    exact_before = _exact_match(before_model, tokenizer, held_facts)
    preference_before = _likelihood_preference(before_model, held_rows)
    result = train_preferences(
        PreferenceConfig(
            model_dir, data, tmp_path / "dpo", eval_data=held, lr=1e-3, max_steps=40, batch_size=14, progress=False
        )
    )
    tuned = load_adapter(load_model(model_dir), result.output_dir)
    exact_after = _exact_match(tuned, tokenizer, held_facts)
    assert exact_after >= exact_before + 0.15 and exact_after >= 0.9
    assert _likelihood_preference(tuned, held_rows) > preference_before
    assert result.before["val_rewards/accuracies"] == 0.0  # policy == reference: every margin is 0
    assert result.after["val_rewards/accuracies"] >= 0.5 and result.after["val_rewards/margins"] > 0
