"""RoPE scaling against transformers: linear, static NTK-aware and dynamic NTK, past the trained
context, through the KV cache; and the context limit that dynamic scaling lifts.

transformers' dynamic RoPE keeps state: its rotary module recomputes `inv_freq` when a forward
call's longest position passes the longest it has seen, and resets when a call fits the trained
context again. Every test below builds a fresh twin, so its history is only the calls made here.
"""

import dataclasses

import pytest
import reference_models
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from genforge.cache import ContiguousKVCache
from genforge.chat_models import ChatModelError, LocalChatModel
from genforge.checkpoint import load_model, save_model
from genforge.config import ConfigError
from genforge.generate.generator import generate
from genforge.generate.request import ContextLengthError, DecodeRequest
from genforge.generate.sampling import SamplingParams
from genforge.model import Transformer, rope_frequencies
from genforge.serve.engine import Engine

TRAINED = 32  # llama-dynamic-rope's max_position_embeddings


def twins(name, tmp_path):
    hf = reference_models.build(name)
    # Random weights of std 0.02 give near-uniform attention, which hardly feels positions;
    # larger queries and keys make the rotation (and so the scaling) show in the logits.
    with torch.no_grad():
        for name_, p in hf.named_parameters():
            if name_.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    hf.save_pretrained(tmp_path / name)
    return hf, load_model(tmp_path / name)


def random_ids(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, reference_models.VOCAB, (1, length), generator=g)


def test_dynamic_logits_match_transformers_past_the_trained_context(tmp_path):
    hf, model = twins("llama-dynamic-rope", tmp_path)
    ids = random_ids(3 * TRAINED)
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids).logits
        unscaled = Transformer(dataclasses.replace(model.config, rope_scaling=None))
        unscaled.load_state_dict(model.state_dict())
        plain = unscaled(ids).logits
    assert (got - expected).abs().max() <= 1e-4
    # The scaling is in play: plain RoPE gives other logits at this length.
    assert (plain - expected).abs().max() > 1e-2


def test_dynamic_cached_steps_match_transformers_across_the_boundary(tmp_path):
    """Prefill within the trained context, then one token at a time past it: transformers
    recomputes the frequencies at every step past 32, and rotates each new key with the
    frequencies of its own step (earlier keys stay as they were cached); so does genforge."""
    hf, model = twins("llama-dynamic-rope", tmp_path)
    ids = random_ids(TRAINED + 16, seed=1)
    prefill = TRAINED - 4
    hf_cache = transformers.DynamicCache(config=hf.config)
    cache = ContiguousKVCache(model.config, 1, ids.shape[1])
    with torch.no_grad():
        hf_steps = [hf(ids[:, :prefill], past_key_values=hf_cache, use_cache=True).logits[:, -1]]
        steps = [model(ids[:, :prefill], cache=cache).logits[:, -1]]
        for t in range(prefill, ids.shape[1]):
            hf_steps.append(hf(ids[:, t : t + 1], past_key_values=hf_cache, use_cache=True).logits[:, -1])
            steps.append(model(ids[:, t : t + 1], cache=cache).logits[:, -1])
        # A cached step past the context is not the full forward: the keys differ in scaling.
        full = model(ids).logits[:, -1]
    assert (torch.cat(steps) - torch.cat(hf_steps)).abs().max() <= 1e-4
    assert (full - steps[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("prompt_length", [TRAINED - 6, TRAINED + 8])
def test_dynamic_greedy_generation_matches_transformers(prompt_length, tmp_path):
    hf, model = twins("llama-dynamic-rope", tmp_path)
    prompt = random_ids(prompt_length, seed=prompt_length)
    new = 24
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[0, prompt_length:].tolist()
    got = generate(model, prompt[0].tolist(), SamplingParams(temperature=0, max_new_tokens=new), eos_token_ids=[])
    assert got[0].token_ids == expected


def test_dynamic_rows_of_a_batch_each_scale_by_their_own_length(tmp_path):
    """transformers scales every row of a batch by the batch's longest position; genforge by
    each row's own, so a row's logits do not depend on the rows beside it."""
    _, model = twins("llama-dynamic-rope", tmp_path)
    lengths = (2 * TRAINED, TRAINED + 5, 20)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, longest - n :] = random_ids(n, seed=row)[0]
        mask[row, longest - n :] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, longest - n :]).logits[0]
            torch.testing.assert_close(batched[row, longest - n :], alone, atol=1e-5, rtol=1e-5)


def test_dynamic_frequencies_equal_transformers_at_every_length(tmp_path):
    hf_config = transformers.LlamaConfig(**reference_models.FAMILIES["llama-dynamic-rope"][1])
    _, model = twins("llama-dynamic-rope", tmp_path)
    lengths = torch.tensor([1, TRAINED, TRAINED + 1, 50, 200])
    ours = rope_frequencies(model.config, lengths)[0]
    for row, length in enumerate(lengths):
        theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, None, seq_len=torch.tensor(int(length)))
        torch.testing.assert_close(ours[row], theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(rope_frequencies(model.config)[0], ours[0])  # fits: the original frequencies


def test_static_ntk_is_dynamic_ntk_frozen_at_one_length(tmp_path):
    """Static NTK-aware scaling with alpha is transformers' dynamic scaling (factor f, trained
    context C) at the length where f * L / C - (f - 1) = alpha: for f = alpha = 2, L = 1.5 C."""
    hf_config = transformers.LlamaConfig(**reference_models.FAMILIES["llama-dynamic-rope"][1])
    _, model = twins("llama-dynamic-rope", tmp_path)
    static = dataclasses.replace(model.config, rope_scaling={"rope_type": "ntk", "factor": 2.0})
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, None, seq_len=torch.tensor(3 * TRAINED // 2))
    torch.testing.assert_close(rope_frequencies(static)[0], theirs, rtol=1e-6, atol=0)


def test_static_ntk_exports_as_the_base_transformers_runs(tmp_path):
    _, base = twins("llama", tmp_path)
    config = dataclasses.replace(base.config, rope_scaling={"rope_type": "ntk", "factor": 4.0})
    model = Transformer(config)
    model.load_state_dict(base.state_dict())
    out = save_model(model, tmp_path / "ntk")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(100, seed=3)
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max() <= 1e-4
        assert not torch.allclose(base(ids).logits, model(ids).logits, atol=1e-3)
    assert reloaded.config.rope_parameters["rope_type"] == "default"


def test_linear_scaling_matches_transformers_far_into_the_positions(tmp_path):
    hf, model = twins("llama-linear-rope", tmp_path)
    ids = random_ids(200, seed=4)
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "dynamic"}, "needs a numeric factor >= 1"),
        ({"rope_type": "linear", "factor": 0.5}, "needs a numeric factor >= 1"),
        ({"rope_type": "ntk", "factor": "2"}, "needs a numeric factor >= 1"),
    ],
)
def test_scaling_without_a_usable_factor_is_refused(scaling, message, tmp_path):
    _, model = twins("llama", tmp_path)
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(model.config, rope_scaling=scaling)


# -------------------------------------------------------------------- the context limit
def test_dynamic_scaling_runs_past_the_trained_context_up_to_the_limit(tmp_path):
    _, model = twins("llama-dynamic-rope", tmp_path)
    assert model.config.max_context == 2 * TRAINED  # factor x the trained context by default
    params = SamplingParams(temperature=0, max_new_tokens=20)
    request = DecodeRequest.resolve(model, [list(range(3, 3 + 40))], params)
    assert request.context_length == 2 * TRAINED
    with pytest.raises(ContextLengthError, match="exceeds the model's context of 64 tokens") as err:
        DecodeRequest.resolve(model, [list(range(3, 3 + 50))], params)
    assert err.value.context_length == 64
    model.config = model.config.with_context_limit(200)
    assert DecodeRequest.resolve(model, [list(range(3, 3 + 50))], params).context_length == 200
    # Lower than the trained context is a limit too.
    model.config = model.config.with_context_limit(16)
    with pytest.raises(ContextLengthError):
        DecodeRequest.resolve(model, [list(range(3, 13))], params)


def test_other_scalings_stop_at_the_trained_context(tmp_path):
    _, model = twins("llama-linear-rope", tmp_path)
    assert model.config.max_context == model.config.max_position_embeddings
    with pytest.raises(ConfigError, match="only a model with dynamic RoPE scaling"):
        model.config.with_context_limit(model.config.max_position_embeddings + 1)
    with pytest.raises(ConfigError, match="positive number of tokens"):
        model.config.with_context_limit(0)


def test_chat_model_and_engine_take_the_limit(tmp_path):
    hf, model = twins("llama-dynamic-rope", tmp_path)

    engine = Engine(model, max_model_len=150, num_blocks=16)
    assert engine.max_model_len == 150  # dynamic: as far as the server is told
    assert Engine(model, num_blocks=16).max_model_len == 2 * TRAINED
    _, linear = twins("llama-linear-rope", tmp_path)
    assert Engine(linear, max_model_len=10_000, num_blocks=32).max_model_len == 256
    with pytest.raises(ConfigError, match="only a model with dynamic RoPE scaling"):
        LocalChatModel(model=linear, tokenizer=object(), context_limit=300)
    chat = LocalChatModel(model=model, tokenizer=object(), context_limit=100)
    chat._params(list(range(80)), 20, 0.0, (), None)  # 100 tokens: fits
    with pytest.raises(ChatModelError, match="100-token context"):
        chat._params(list(range(81)), 20, 0.0, (), None)
