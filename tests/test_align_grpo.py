"""The GRPO trainer: one step's loss equals TRL's GRPO loss on the same log-probabilities,
advantages and mask; advantages per group; reward-function errors; exact resume; the reward
rising on a toy task; the ready-made reward functions and the command."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from finetune_shared import randomize, tiny_chat_model_dir

from genforge.align.grpo import (
    GRPOConfig,
    GRPOError,
    GRPOTrainer,
    RewardFunctionError,
    add_arguments,
    completion_positions,
    completion_view,
    compute_rewards,
    group_advantages,
    prepare_prompts,
    run,
)
from genforge.align.logprobs import completion_logprobs
from genforge.align.rewards import (
    exact_match_reward,
    extract_answer,
    format_reward,
    reward_from_spec,
    reward_model_reward,
    split_reward_specs,
    unit_test_reward,
)
from genforge.checkpoint import load_model
from genforge.finetune.lora import disabled_adapters
from genforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What is two plus three?", "Name the colour of the sky.", "def add(a, b):", "It is five."]
LOWERCASE = set("abcdefghijklmnopqrstuvwxyz")


def lowercase_share(prompts, completions, **columns):
    """The toy reward: the share of a completion's characters that are lowercase letters."""
    return [sum(ch in LOWERCASE for ch in text) / max(1, len(text)) for text in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model_dir(tmp_path_factory.mktemp("grpo") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


def _config(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(
        out_dir=tmp_path / "run", prompts_per_step=2, samples_per_prompt=4, max_new_tokens=8, progress=False
    )
    return GRPOConfig(**(settings | overrides))


# --------------------------------------------------------------------------- the loss vs TRL
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_one_step_loss_equals_trl(loss_type, model_dir, tokenizer, tmp_path):
    """The loss the trainer minimises at its first update (micro-batches of 3 rows, gradients
    accumulated) equals TRL's `GRPOTrainer._compute_loss` on the whole batch's log-probs,
    advantages, mask and reference log-probs. Random LoRA weights make the policy differ from
    the reference (the base), so the KL term is not zero."""
    from test_align_losses import _trl_grpo

    config = _config(tmp_path, beta=0.1, loss_type=loss_type, micro_batch_size=3, epsilon_high=0.28, lr=1e-3)
    trainer = GRPOTrainer(load_model(model_dir), tokenizer, PROMPTS, lowercase_share, config)
    randomize(trainer.model.named_parameters(), seed=5)

    seed = config.seed * 1_000_003  # the first step's sampling seed
    rollout, _, rewards = trainer.sample(trainer.step_prompts(0), seed)
    advantages = group_advantages(rewards[:, 0], config.samples_per_prompt)
    starts, lengths = completion_positions(rollout)
    width = int(lengths.max())
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    with torch.no_grad():
        policy = completion_logprobs(trainer.model, rollout.sequences, rollout.attention_mask, rollout.completion_mask)
        with disabled_adapters(trainer.model):
            reference = completion_logprobs(
                trainer.model, rollout.sequences, rollout.attention_mask, rollout.completion_mask
            )
    logps = completion_view(policy.per_token, starts, width)
    reference_logps = completion_view(reference.per_token, starts, width)
    theirs = _trl_grpo(
        logps,
        logps,  # one update per rollout: the sampling policy is the current one
        reference_logps,
        advantages,
        mask,
        beta=0.1,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=config.max_new_tokens,
        delta=None,
    )
    record = trainer.train_step()
    assert record["loss"] == pytest.approx(float(theirs), abs=1e-6, rel=1e-6)
    assert record["kl"] > 0
    assert rewards.shape == (8, 1) and record["reward"] == pytest.approx(float(rewards.mean()))


def test_advantages_are_normalised_within_each_group():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 0.0])
    advantages = group_advantages(rewards, 4)
    for group in range(3):
        part = rewards[group * 4 : (group + 1) * 4]
        expected = (part - part.mean()) / (nanstd(part) + 1e-4)
        torch.testing.assert_close(advantages[group * 4 : (group + 1) * 4], expected)
    assert advantages[4:8].abs().max() == 0  # one reward throughout: no signal, no update
    assert advantages[:4].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)
    unscaled = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(unscaled[8:], torch.tensor([1.5, -0.5, 0.5, -1.5]))
    batch = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(batch, unscaled / (rewards.std() + 1e-4))
    with pytest.raises(GRPOError, match="multiple of group_size"):
        group_advantages(rewards[:5], 4)
    with pytest.raises(GRPOError, match="scale_rewards"):
        group_advantages(rewards, 4, "per_token")


# ----------------------------------------------------------------------- reward-function errors
def test_reward_function_errors_name_the_function_and_the_sample():
    from genforge.align.grpo import as_reward_functions

    prompts, completions, where = ["p", "q"], ["a", "b"], ["data.jsonl:1", "data.jsonl:2"]

    def returns_none_second(prompts, completions, **columns):
        return [1.0, None]

    def returns_text(prompts, completions, **columns):
        return ["1", "0"]

    def too_few(prompts, completions, **columns):
        return [1.0]

    def nan(prompts, completions, **columns):
        return [float("nan"), 0.0]

    def raises(prompts, completions, **columns):
        raise RuntimeError("grader offline")

    cases = [
        (returns_none_second, r"'returns_none_second' returned None for completion 1 \(data.jsonl:2"),
        (returns_text, r"'returns_text' returned '1' for completion 0 \(data.jsonl:1"),
        (too_few, r"'too_few' returned 1 values for 2 completions"),
        (nan, r"'nan' returned nan for completion 0"),
        (raises, r"'raises' raised RuntimeError: grader offline"),
    ]
    for function, message in cases:
        with pytest.raises(RewardFunctionError, match=message):
            compute_rewards(as_reward_functions([function]), prompts, completions, {}, where)
    table = compute_rewards(
        as_reward_functions([lambda prompts, completions: [True, 0], lowercase_share], [2.0, 1.0]),
        prompts,
        completions,
        {},
    )
    assert table.tolist() == [[1.0, 1.0], [0.0, 1.0]]
    with pytest.raises(GRPOError, match="2 reward weights for 1 reward functions"):
        as_reward_functions([lowercase_share], [1.0, 2.0])
    names = [r.name for r in as_reward_functions([lowercase_share, lowercase_share])]
    assert names == ["lowercase_share", "lowercase_share_2"]


def test_bad_settings_and_prompts_are_refused_before_work(model_dir, tokenizer, tmp_path):
    model = load_model(model_dir)
    for overrides, message in [
        (dict(samples_per_prompt=1), "samples_per_prompt must be >= 2"),
        (dict(minibatches=3), "minibatches=3 must divide the 8 completions"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(loss_type="ppo"), "unknown loss_type"),
        (dict(method="ia3"), "unknown method"),
        (dict(max_new_tokens=200), "exceeds the model's context of 128"),
        (dict(prompts_per_step=5), "more than the 4 prompts"),
    ]:
        with pytest.raises(GRPOError, match=message):
            GRPOTrainer(model, tokenizer, PROMPTS, lowercase_share, _config(tmp_path, **overrides))
    with pytest.raises(GRPOError, match="prompt 1: has fields"):
        prepare_prompts([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], tokenizer)
    with pytest.raises(GRPOError, match="needs a 'prompt' field"):
        prepare_prompts([{"question": "a"}], tokenizer)
    chat = prepare_prompts([{"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"}], tokenizer)
    assert chat[0].chat and tokenizer.decode(list(chat[0].prompt_ids)).endswith("<|im_start|>assistant\n")
    assert len(prepare_prompts(["x " * 50], tokenizer, max_prompt_length=7)[0].prompt_ids) == 7


# ------------------------------------------------------------------------------------ resume
def test_resume_equals_an_uninterrupted_run(model_dir, tokenizer, tmp_path):
    """Killed after its step-2 checkpoint and resumed, a LoRA run with a KL term, two passes
    per rollout and two updates per pass ends with the same adapter, optimizer moments and
    logged rewards, bit for bit, as the run that was never stopped."""
    settings = dict(beta=0.05, num_iterations=2, minibatches=2, lr=1e-2, max_steps=4, save_every=2)
    whole = GRPOTrainer(load_model(model_dir), tokenizer, PROMPTS, lowercase_share, _config(tmp_path / "a", **settings))
    whole.train()

    first = GRPOTrainer(load_model(model_dir), tokenizer, PROMPTS, lowercase_share, _config(tmp_path / "b", **settings))
    real_step = first.train_step

    def killed_after_two():
        if first.step == 2:
            raise KeyboardInterrupt
        return real_step()

    first.train_step = killed_after_two
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = GRPOTrainer(
        load_model(model_dir), tokenizer, PROMPTS, lowercase_share, _config(tmp_path / "b", **settings)
    )
    with pytest.raises(GRPOError, match="already holds a GRPO run"):
        resumed.train()
    resumed.train(resume=True)

    for name, tensor in whole._trainable_tensors().items():
        assert torch.equal(tensor, resumed._trainable_tensors()[name]), name
    for mine, theirs in zip(
        whole.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values()
    ):
        assert torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"])
    rewards = [(r["step"], r["reward"], r["kl"]) for r in whole.read_metrics()]
    assert rewards == [(r["step"], r["reward"], r["kl"]) for r in resumed.read_metrics()]
    assert [r[0] for r in rewards] == [1, 2, 3, 4]

    changed = GRPOTrainer(
        load_model(model_dir),
        tokenizer,
        PROMPTS,
        lowercase_share,
        _config(tmp_path / "b", **(settings | {"samples_per_prompt": 2})),
    )
    with pytest.raises(GRPOError, match="samples_per_prompt: 4 -> 2"):
        changed.load_checkpoint()


# ------------------------------------------------------------------------------- it learns
def test_mean_reward_rises_on_a_toy_reward(model_dir, tokenizer, tmp_path):
    """Reward: the share of lowercase letters in the completion (about 0.3 for the random
    model). Full fine-tuning at lr 3e-2, 4 prompts x 8 samples of 12 tokens per step: over 14
    steps the mean of the last three steps' rewards was 0.63 against 0.32 for the first three
    (measured); the test asks for a rise of 0.15."""
    config = _config(tmp_path, method="full", prompts_per_step=4, samples_per_prompt=8, max_new_tokens=12, lr=3e-2)
    config.max_steps = 14
    trainer = GRPOTrainer(load_model(model_dir), tokenizer, PROMPTS, lowercase_share, config)
    rewards = [record["reward"] for record in trainer.train()]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last - first > 0.15, rewards
    record = trainer.read_metrics()[-1]
    for key in ("rewards/lowercase_share/mean", "clip_ratio", "completions/mean_length", "generation_s", "update_s"):
        assert key in record


# -------------------------------------------------------------------------- reward functions
def test_exact_match_extracts_the_answer():
    assert extract_answer("so \\boxed{\\frac{1}{2}} it is") == "\\frac{1}{2}"
    assert extract_answer("work...\n#### 1,234") == "1,234"
    assert extract_answer("The answer is 42.") == "42"
    assert extract_answer("3 apples and 5 pears") == "5"
    assert extract_answer("no digits here", "last_number") is None
    reward = exact_match_reward("answer")
    completions = ["7", "It is 7.", "#### 7.0", "8", [{"role": "assistant", "content": "\\boxed{7}"}], " 1,000 "]
    answers = ["7", "7", "7", "7", "7", "1000"]
    assert reward([""] * 6, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    with pytest.raises(KeyError, match="column 'solution'"):
        exact_match_reward("solution")(["p"], ["7"], answer=["7"])
    with pytest.raises(ValueError, match="unknown answer extraction"):
        exact_match_reward(extract="first")


def test_format_rewards(tmp_path):
    regex = format_reward(r"<think>.*</think>\s*\d+")
    assert regex([""] * 3, ["<think>a\nb</think> 12", "12", " <think></think>3\n"]) == [1.0, 0.0, 1.0]
    assert format_reward(json_object=True)([""] * 2, ['{"a": 1}', "{a: 1}"]) == [1.0, 0.0]
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    checked = reward_from_spec(f"format:schema:{path}")
    assert checked([""] * 3, ['{"age": 3}', '{"age": "3"}', "[]"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="exactly one of"):
        format_reward("x", json_object=True)
    with pytest.raises(ValueError, match="not a regular expression"):
        format_reward("(")
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        format_reward(schema={"type": 5})


def test_reward_specs_split_only_before_a_reward_name():
    assert split_reward_specs(r"exact_match:answer,format:\d{1,3},x,unit_tests") == [
        "exact_match:answer",
        r"format:\d{1,3},x",
        "unit_tests",
    ]
    assert reward_from_spec("exact_match").__name__ == "exact_match"
    assert reward_from_spec("format:json").__name__ == "format_json"
    with pytest.raises(ValueError, match="unknown reward 'length'"):
        reward_from_spec("length")


def test_unit_test_reward_runs_the_sandbox():
    reward = unit_test_reward("tests", timeout_s=10)
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "def add(a, b):\n    return a - b",
        "def add(a, b):\n    while True: pass",
    ]
    tests = ["assert add(2, 3) == 5"] * 3
    reward_short = unit_test_reward("tests", timeout_s=1)
    assert reward([""] * 2, completions[:2], tests=tests[:2]) == [1.0, 0.0]
    assert reward_short([""], completions[2:], tests=tests[2:]) == [0.0]


def test_reward_model_reward_scores_prompt_and_completion(tokenizer):
    from factories import tiny_model

    from genforge.align.reward import RewardModel, score_sequences

    model = RewardModel(tiny_model(seed=3, vocab_size=tokenizer.vocab_size)).eval()
    reward = reward_model_reward(model, tokenizer)
    scores = reward(["What is two plus three?", "Name the colour"], [" It is five.", " Blue."])
    expected = score_sequences(
        model, [tokenizer.encode("What is two plus three? It is five."), tokenizer.encode("Name the colour Blue.")]
    )
    assert scores == pytest.approx(expected.tolist(), abs=1e-6)
    chat = reward([[{"role": "user", "content": "hi"}]], [[{"role": "assistant", "content": "Blue."}]])
    assert len(chat) == 1 and math.isfinite(chat[0])


# ------------------------------------------------------------------------------------ command
def test_command_trains_and_writes_the_adapter(model_dir, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in [(1, 2), (3, 4), (2, 2)])
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--reward",
            r"exact_match:answer,format:\d+",
            "--reward-weights",
            "1,0.5",
            "--eval-data",
            str(data),
            "--prompts-per-step",
            "2",
            "--num-generations",
            "3",
            "--max-new-tokens",
            "4",
            "--steps",
            "2",
            "--beta",
            "0.04",
        ]
    )
    assert run(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["settings"]["rewards"] == {"exact_match": 1.0, "format_regex": 0.5}
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert set(result["reward_before"]) == {"reward", "rewards/exact_match/mean", "rewards/format_regex/mean"}
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all("kl" in m for m in metrics)


def test_sampling_with_merged_adapters_restores_the_weights(model_dir):
    from genforge.align.grpo import merged_for_sampling
    from genforge.finetune.lora import LoraConfig, LoraLinear, apply_lora

    model = apply_lora(load_model(model_dir), LoraConfig(target_modules=["qkv", "o", "gate_up", "down"])).eval()
    randomize(model.named_parameters(), seed=2)
    weights = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        adapted = model(ids).logits
        with merged_for_sampling(model):
            assert all(layer.merged for layer in model.modules() if isinstance(layer, LoraLinear))
            merged = model(ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    for name, parameter in model.named_parameters():
        original, values = weights[name]
        assert parameter is original and torch.equal(parameter, values), name
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, LoraLinear))
