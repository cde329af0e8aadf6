"""genforge.align.arithmetic: the addition task's tokenizer, splits and answers; the exact-match
reward; the exact KL; (correct > incorrect) pairs from a model's samples; and DPO raising
held-out accuracy on a base trained here from scratch."""

from __future__ import annotations

import json

import pytest
import torch
from factories import tiny_model

from genforge.align.arithmetic import (
    AdditionProblem,
    AdditionTask,
    AdditionTaskError,
    DPOSettings,
    GRPOSettings,
    PretrainSettings,
    addition_tokenizer,
    dpo_on_addition,
    exact_match_reward,
    grpo_on_addition,
    held_out_kl,
    parse_prompt,
    preference_pairs_from_samples,
    pretrain_addition,
    read_task,
    task_answer_tokens,
)
from genforge.align.data import read_preference_records

# Tiny models: a second intra-op thread only adds synchronisation.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return addition_tokenizer()


def tiny_adder(seed: int = 0):
    """A random decoder over the task's 16-token vocabulary."""
    return tiny_model(seed, vocab_size=16, max_position_embeddings=32).eval()


def test_the_tokenizer_is_one_token_per_character(tokenizer):
    ids = tokenizer.encode("012+345=")
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 9
    assert tokenizer.decode(ids, skip_special_tokens=True) == "012+345="
    assert tokenizer.encode("0357", add_special_tokens=False) == [4, 7, 9, 11]
    assert tokenizer.vocab_size == 16
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.encode("1 x", add_special_tokens=False) == [5, 3, 3]  # <unk> for the rest


def test_problems_are_written_in_columns():
    problem = AdditionProblem(12, 345, 3)
    assert (problem.prompt, problem.answer) == ("012+345=", "0357")
    overflowing = AdditionProblem(957, 68, 3)
    assert (overflowing.answer, overflowing.overflowed_answer, overflowing.overflows) == ("1025", "0025", True)
    assert problem.overflowed_answer == problem.answer and not problem.overflows
    assert parse_prompt(" 012+345= ") == problem
    for bad in ("12+345=", "012+345", "a+b=", "012-345="):
        with pytest.raises(AdditionTaskError, match="not an addition prompt"):
            parse_prompt(bad)
    with pytest.raises(AdditionTaskError, match="do not fit in 2 digits"):
        AdditionProblem(100, 1, 2)


def test_splits_are_disjoint_and_deterministic():
    task = AdditionTask(digits=2, seed=0)
    train, dev, held = (set(task.problems(split, 400)) for split in ("train", "dev", "held_out"))
    assert not (train & held) and not (train & dev) and not (dev & held)
    assert task.problems("held_out", 50) == task.problems("held_out", 50)
    assert task.problems("held_out", 50) != task.problems("held_out", 50, stream=1)
    # Membership is a property of the problem, not of the draw.
    assert all(task.split_of(p) == "held_out" for p in task.problems("held_out", 200, stream=3))
    assert set(AdditionTask(digits=2, seed=1).problems("held_out", 200)) != held
    with pytest.raises(AdditionTaskError, match="up to half the held_out split"):
        task.problems("held_out", 10_000)
    with pytest.raises(AdditionTaskError, match="split must be one of"):
        task.problems("test", 10)
    with pytest.raises(AdditionTaskError, match="digits must be an integer"):
        AdditionTask(digits=0)


def test_exact_match_reward():
    prompts = ["012+345=", "012+345=", "99+01=", "99+01="]
    assert exact_match_reward(prompts, ["0357", " 0357\n", "100", "0100"]) == [1.0, 1.0, 1.0, 0.0]
    # TRL's conversational form, and the dataset columns it passes along.
    chat_prompt = [{"role": "user", "content": "5+4="}]
    assert exact_match_reward([chat_prompt], [[{"role": "assistant", "content": "09"}]], answer=["09"]) == [1.0]
    with pytest.raises(AdditionTaskError, match="got 2 prompts but 1 completions"):
        exact_match_reward(["1+1=", "1+2="], ["02"])
    with pytest.raises(AdditionTaskError, match="sample 1: 'hello' is not an addition prompt"):
        exact_match_reward(["1+1=", "hello"], ["02", "x"])
    with pytest.raises(AdditionTaskError, match="sample 0: a completion must be a string"):
        exact_match_reward(["1+1="], [2])


@torch.no_grad()
def test_kl_is_exact_over_the_vocabulary_on_the_policys_samples(tokenizer):
    from genforge.align.rollout import generate_rollout
    from genforge.generate.sampling import SamplingParams

    problems = AdditionTask(digits=2).problems("held_out", 3)
    policy, reference = tiny_adder(0), tiny_adder(1)
    assert held_out_kl(policy, policy, tokenizer, problems, samples=2) == pytest.approx(0.0, abs=1e-6)
    kl = held_out_kl(policy, reference, tokenizer, problems, samples=2, seed=3)
    # By hand: the same samples (same seed), one row and one position at a time.
    params = SamplingParams(temperature=1.0, max_new_tokens=task_answer_tokens(problems), seed=3)
    prompts = [tokenizer.encode(p.prompt) for p in problems]
    rollout = generate_rollout(policy, tokenizer, prompts, 2, params, eos_token_ids=[tokenizer.eos_token_id])
    total, count = 0.0, 0
    for row, completion in enumerate(rollout.completions):
        prompt = prompts[int(rollout.prompt_index[row])]
        for position in range(len(completion)):
            context = torch.tensor([prompt + completion[:position]])
            p = torch.log_softmax(policy(context).logits[0, -1], -1)
            q = torch.log_softmax(reference(context).logits[0, -1], -1)
            total += float((p.exp() * (p - q)).sum())
            count += 1
    assert kl == pytest.approx(total / count, rel=1e-4) and kl > 0


def test_pairs_from_samples_prefer_the_sum(tmp_path, tokenizer):
    problems = AdditionTask(digits=2).problems("train", 12)
    sampled = preference_pairs_from_samples(
        tiny_adder(), tokenizer, problems, tmp_path / "pairs.jsonl", samples_per_prompt=4, max_pairs_per_prompt=2
    )
    records = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    answers = {p.prompt: p.answer for p in problems}
    assert sampled.pairs == len(records) > 0
    for record in records:
        assert record["chosen"] == answers[record["prompt"]] != record["rejected"] and record["rejected"]
    assert len(read_preference_records(tmp_path / "pairs.jsonl")) == len(records)
    assert all(record["chosen_sampled"] is False for record in records)  # a random model never adds
    with pytest.raises(AdditionTaskError, match="chosen must be one of"):
        preference_pairs_from_samples(tiny_adder(), tokenizer, problems, tmp_path / "x.jsonl", chosen="gold")


# DPO's gain in held-out greedy accuracy (300 problems) with the default 2-digit settings,
# measured with pretraining and DPO seeds 0, 1, 2, 3: 47.0% -> 66.3%, 40.7% -> 65.7%,
# 40.0% -> 71.0%, 56.0% -> 87.7% (+19.3, +25.0, +31.0, +31.7 points). The bar sits below the worst.
DPO_MIN_GAIN = 0.12

# GRPO's gain in held-out greedy accuracy (300 problems) with GRPO_TEST_STEPS steps (lr 1e-3, 16
# prompts x 8 samples a step, beta 0.04), measured with task and pretraining seeds 0 and 2:
# 47.0% -> 60.0% and 52.0% -> 77.7% (+13.0, +25.7 points; 100 steps at lr 3e-4, the benchmark's
# default, took seed 0 to 77.3%). The bar sits below the worst.
GRPO_TEST_STEPS = 40
GRPO_MIN_GAIN = 0.08


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The 2-digit base (learnt addition, then the buggy adder's habit), shared by DPO and GRPO."""
    directory = tmp_path_factory.mktemp("addition") / "base"
    return directory, pretrain_addition(directory, AdditionTask(digits=2), PretrainSettings())


@pytest.mark.slow
def test_dpo_raises_held_out_accuracy(base, tmp_path):
    base_dir, record = base
    assert read_task(base_dir) == AdditionTask(digits=2)
    # The buggy adder's habit took accuracy down from learnt addition to about the share of
    # sums that do not overflow: room for alignment.
    assert record["dev_accuracy_pretrained"] > 0.65 and 0.3 < record["dev_accuracy"] < 0.65
    report = dpo_on_addition(base_dir, tmp_path / "dpo", DPOSettings(), held_out=300)
    assert 0.3 < report.accuracy_before < 0.65
    assert report.accuracy_after - report.accuracy_before >= DPO_MIN_GAIN
    assert 0 < report.kl_to_reference < 1.0
    by_sum = report.details["accuracy_after_by_sum"], report.details["accuracy_before_by_sum"]
    assert by_sum[0]["overflowing"] > by_sum[1]["overflowing"]  # what DPO fixed
    assert json.loads((tmp_path / "dpo" / "report.json").read_text())["accuracy_after"] == report.accuracy_after


@pytest.mark.slow
def test_grpo_with_the_exact_match_reward_raises_held_out_accuracy(base, tmp_path):
    base_dir, _ = base
    report = grpo_on_addition(base_dir, tmp_path / "grpo", GRPOSettings(steps=GRPO_TEST_STEPS, lr=1e-3), held_out=300)
    assert 0.3 < report.accuracy_before < 0.65
    assert report.accuracy_after - report.accuracy_before >= GRPO_MIN_GAIN
    assert 0 < report.kl_to_reference < 1.0
    # The reward the policy sampled rose over the run, and the held-out gain is on the overflowing sums.
    assert report.details["last_step_reward"] > report.details["first_step_reward"]
    by_sum = report.details["accuracy_after_by_sum"], report.details["accuracy_before_by_sum"]
    assert by_sum[0]["overflowing"] > by_sum[1]["overflowing"]


def test_bad_pretraining_settings_are_refused_before_training(tmp_path):
    task = AdditionTask(digits=3)
    for settings, message in [
        (PretrainSettings(steps=0), "steps must be a positive integer"),
        (PretrainSettings(imitation_steps=-1), "imitation_steps must be an integer >= 0"),
        (PretrainSettings(seq_len=12), "seq_len 12 is shorter than one 3-digit example"),
        (PretrainSettings(overflow_rate=1.5), "overflow_rate must be in"),
    ]:
        with pytest.raises(AdditionTaskError, match=message):
            pretrain_addition(tmp_path / "base", task, settings)
    assert not (tmp_path / "base").exists()
    with pytest.raises(AdditionTaskError, match="has no addition_task.json"):
        read_task(tmp_path)
