"""The decode request: what it settles, each refusal and its type."""

import dataclasses

import pytest
import torch

from genforge.config import Config
from genforge.generate.generator import generate
from genforge.generate.processors import (
    DecodeContext,
    LogitBias,
    RepetitionPenalty,
    Temperature,
    TopK,
    VocabularyLimit,
    apply_processors,
    build_processors,
)
from genforge.generate.request import (
    ContextLengthError,
    DecodeRequest,
    DecodeRequestError,
    as_prompt_lists,
    batch_logits_processors,
    end_of_sequence_ids,
)
from genforge.generate.sampling import SamplingParams
from genforge.model import Transformer

VOCAB, CONTEXT = 64, 32


class StubTokenizer:
    """What the request reads of a tokenizer: its size and its end-of-sequence id."""

    def __init__(self, vocab_size=VOCAB, eos_token_id=None):
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id


def tiny(vocab=VOCAB, context=CONTEXT, eos=2, causal=True, seed=0):
    config = Config(
        family="llama" if causal else "bert",
        vocab_size=vocab,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=context,
        eos_token_id=eos,
        causal=causal,
    )
    torch.manual_seed(seed)
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


# ------------------------------------------------------------------------------ what it settles
def test_a_request_settles_prompts_ends_and_lengths(model):
    request = DecodeRequest.resolve(
        model,
        [[3, 4, 5], [6]],
        SamplingParams(max_new_tokens=4, stop_token_ids=[9]),
        tokenizer=StubTokenizer(eos_token_id=7),
    )
    assert request.prompts == [[3, 4, 5], [6]]
    assert request.eos_token_ids == (2, 7, 9)  # config, tokenizer, stop_token_ids
    assert (request.max_new_tokens, request.longest_prompt, request.capacity) == (4, 3, 7)
    assert request.context_length == CONTEXT and request.vocab_size == request.vocab_limit == VOCAB
    assert DecodeRequest.resolve(model, torch.tensor([3, 4]), SamplingParams()).prompts == [[3, 4]]
    assert DecodeRequest.resolve(model, [3, 4], SamplingParams()).prompts == [[3, 4]]


def test_end_of_sequence_ids_join_generation_config_or_give_way_to_the_callers(model):
    join = DecodeRequest.resolve(model, [3], SamplingParams(), generation_config={"eos_token_id": [11, 12]})
    assert join.eos_token_ids == (2, 11, 12)
    own = DecodeRequest.resolve(
        model,
        [3],
        SamplingParams(stop_token_ids=[5]),
        eos_token_ids=[8],
        tokenizer=StubTokenizer(eos_token_id=7),
        generation_config={"eos_token_id": 11},
    )
    assert own.eos_token_ids == (5, 8)  # the caller's list replaces the others; stop ids still end
    assert DecodeRequest.resolve(model, [3], SamplingParams(), eos_token_ids=[]).eos_token_ids == ()
    assert end_of_sequence_ids(model.config, StubTokenizer(eos_token_id=7), [11]) == {2, 7, 11}


def test_no_max_new_tokens_means_to_the_end_of_the_context(model):
    request = DecodeRequest.resolve(model, [[3] * 10, [4] * 4], SamplingParams())
    assert request.max_new_tokens == CONTEXT - 10 and request.capacity == CONTEXT
    assert DecodeRequest.resolve(model, [3] * 10, SamplingParams(), context_length=16).max_new_tokens == 6


def test_without_params_a_request_is_greedy_with_its_own_length_and_stops(model):
    request = DecodeRequest.resolve(model, [3], max_new_tokens=5, stop=["x"], tokenizer=StubTokenizer())
    assert request.params.greedy and request.max_new_tokens == 5 and request.params.stop == ["x"]


def test_the_vocabulary_limit_is_one_processor_applied_first(model):
    narrow = StubTokenizer(vocab_size=50)
    request = DecodeRequest.resolve(
        model, [3], SamplingParams(temperature=0.5, top_k=4, repetition_penalty=1.2), tokenizer=narrow
    )
    assert request.vocab_limit == 50
    processors = request.logits_processors([LogitBias({5: 1.0})])
    assert [type(p) for p in processors] == [VocabularyLimit, RepetitionPenalty, LogitBias, Temperature, TopK]
    assert [type(p) for p in request.logits_processors(sampling=False)] == [VocabularyLimit, RepetitionPenalty]
    # No limit where the tokenizer covers the model's vocabulary, or without a tokenizer.
    assert not any(
        isinstance(p, VocabularyLimit) for p in DecodeRequest.resolve(model, [3], SamplingParams()).logits_processors()
    )


def test_the_limit_equals_the_old_ban_by_logit_bias(model):
    """The vocabulary limit replaces the old ban (a -inf logit_bias on the padded ids):
    the processed logits are the same to the bit."""
    narrow = StubTokenizer(vocab_size=50)
    params = SamplingParams(temperature=0.7, top_p=0.9, logit_bias={3: 2.0}, repetition_penalty=1.3)
    logits = torch.randn(2, VOCAB)
    ctx = DecodeContext(torch.tensor([[3, 4, 5], [6, 7, 8]]), prompt_length=2)
    banned = dataclasses.replace(params, logit_bias=dict.fromkeys(range(50, VOCAB), float("-inf")) | params.logit_bias)
    old = apply_processors(logits, ctx, build_processors(banned, [2], vocab_size=VOCAB))
    request = DecodeRequest.resolve(model, [3], params, tokenizer=narrow, eos_token_ids=[2])
    new = apply_processors(logits, ctx, request.logits_processors())
    torch.testing.assert_close(new, old, rtol=0, atol=0)
    assert (new[:, 50:] == float("-inf")).all()


def test_a_batch_of_requests_is_processed_as_each_alone(model):
    """The serving engine's batch: one list, each row with its own params, end ids and stop ids."""
    narrow = StubTokenizer(vocab_size=50, eos_token_id=7)
    rows = [
        DecodeRequest.resolve(
            model, [3, 4, 5], SamplingParams(temperature=0.7, top_k=5, min_new_tokens=3), tokenizer=narrow
        ),
        DecodeRequest.resolve(
            model,
            [6, 7, 8],
            SamplingParams(temperature=0, repetition_penalty=1.4, min_new_tokens=2, stop_token_ids=[11]),
            tokenizer=narrow,
            eos_token_ids=[],
        ),
        DecodeRequest.resolve(model, [9, 9, 9], SamplingParams(top_p=0.8, logit_bias={4: -2.0}), tokenizer=narrow),
    ]
    logits = torch.randn(3, VOCAB)
    ctx = DecodeContext(torch.tensor([[3, 4, 5, 12], [6, 7, 8, 13], [9, 9, 9, 14]]), prompt_length=3)
    batched = apply_processors(logits, ctx, batch_logits_processors(rows))
    for i, request in enumerate(rows):
        alone = apply_processors(
            logits[i : i + 1], DecodeContext(ctx.input_ids[i : i + 1], 3), request.logits_processors()
        )
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=0)
    assert batched[1, 11] == float("-inf") and batched[1, 7] > float("-inf")  # row 1 ends on 11 only
    with pytest.raises(DecodeRequestError, match="resolved for one model and tokenizer"):
        batch_logits_processors([rows[0], DecodeRequest.resolve(model, [3], SamplingParams())])


def test_generate_takes_a_resolved_request(model):
    params = SamplingParams(temperature=0, max_new_tokens=6)
    request = DecodeRequest.resolve(model, [[3, 4], [5]], params, eos_token_ids=[])
    assert [c.token_ids for c in generate(model, request)] == [
        c.token_ids for c in generate(model, [[3, 4], [5]], params, eos_token_ids=[])
    ]
    with pytest.raises(DecodeRequestError, match="params given with a resolved DecodeRequest"):
        generate(model, request, params)


def test_a_second_model_must_hold_the_request(model):
    request = DecodeRequest.resolve(model, [3] * 10, SamplingParams(max_new_tokens=10))
    request.check_model(tiny(context=20), "draft model")
    with pytest.raises(ContextLengthError, match="= 20 exceeds the draft model's context of 16 tokens"):
        request.check_model(tiny(context=16), "draft model")
    with pytest.raises(DecodeRequestError, match=r"the amateur \(bert\) is an encoder"):
        request.check_model(tiny(causal=False), "amateur")


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "prompts, params, how, error, message",
    [
        ([], SamplingParams(), {}, DecodeRequestError, "no prompts given"),
        ([[3], []], SamplingParams(), {}, DecodeRequestError, "prompt 1 is empty"),
        ("hello", SamplingParams(), {}, DecodeRequestError, "prompts must be token-id lists, got str"),
        (
            [[3, 64]],
            SamplingParams(),
            {},
            DecodeRequestError,
            r"prompt 0 has token ids outside the vocabulary \[0, 64\): \[64\]",
        ),
        ([[3, -1]], SamplingParams(), {}, DecodeRequestError, "outside the vocabulary"),
        ([[3, 2.5]], SamplingParams(), {}, DecodeRequestError, "outside the vocabulary"),
        ([3], {"temperature": 0}, {}, DecodeRequestError, "params must be a SamplingParams, got dict"),
        ([3], SamplingParams(stop=["x"]), {}, DecodeRequestError, "stop strings need a tokenizer"),
        (
            [3],
            SamplingParams(),
            {"eos_token_ids": [70]},
            DecodeRequestError,
            r"eos/stop token ids \[70\] are outside the vocabulary \[0, 64\)",
        ),
        ([3], SamplingParams(stop_token_ids=[64]), {}, DecodeRequestError, r"eos/stop token ids \[64\]"),
        (
            [3],
            None,
            {"eos_token_ids": [70], "max_new_tokens": 2},
            DecodeRequestError,
            r"eos_token_ids \[70\] are outside",
        ),
        ([3], SamplingParams(), {"eos_token_ids": ["x"]}, DecodeRequestError, "must be integer token ids"),
        (
            [3],
            SamplingParams(logit_bias={80: 1.0}),
            {},
            DecodeRequestError,
            r"logit_bias has token ids outside the vocabulary \[0, 64\): \[80\]",
        ),
        ([3], SamplingParams(), {"logprobs": 21}, DecodeRequestError, "logprobs must be between 0 and 20, got 21"),
        (
            [3],
            SamplingParams(),
            {"prompt_logprobs": -1},
            DecodeRequestError,
            "prompt_logprobs must be between 0 and 20",
        ),
        ([3], None, {"max_new_tokens": 0}, DecodeRequestError, "max_new_tokens must be an integer >= 1"),
        (
            [3],
            SamplingParams(),
            {"max_new_tokens": 4},
            DecodeRequestError,
            "give max_new_tokens and stop strings in params",
        ),
        (
            [[3] * 30],
            SamplingParams(max_new_tokens=3),
            {},
            ContextLengthError,
            "prompt of 30 tokens \\+ max_new_tokens 3 = 33 exceeds the model's context of 32 tokens",
        ),
        ([[3] * 32], SamplingParams(), {}, ContextLengthError, "the prompt of 32 tokens fills the model's context"),
        (
            [[3] * 10],
            SamplingParams(max_new_tokens=8),
            {"context_length": 16, "role": "target model"},
            ContextLengthError,
            "exceeds the target model's context of 16",
        ),
    ],
)
def test_each_refusal_has_its_type_and_says_what_is_wrong(model, prompts, params, how, error, message):
    with pytest.raises(error, match=message) as caught:
        DecodeRequest.resolve(model, prompts, params, **how)
    assert isinstance(caught.value, ValueError)  # callers that catch ValueError keep working


def test_a_context_error_carries_its_numbers(model):
    with pytest.raises(ContextLengthError) as caught:
        DecodeRequest.resolve(model, [[3] * 30], SamplingParams(max_new_tokens=5))
    assert (caught.value.prompt_tokens, caught.value.max_new_tokens, caught.value.context_length) == (30, 5, 32)


def test_models_that_cannot_decode_are_refused():
    with pytest.raises(DecodeRequestError, match=r"the model \(bert\) is an encoder; decoding needs a causal"):
        DecodeRequest.resolve(tiny(causal=False), [3], SamplingParams())
    with pytest.raises(DecodeRequestError, match="the expert must be a genforge Transformer, got str"):
        DecodeRequest.resolve("gpt2", [3], SamplingParams(), role="expert")


def test_prompt_lists_accept_tensors_and_one_list():
    assert as_prompt_lists(torch.tensor([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
    assert as_prompt_lists([torch.tensor([1, 2]), [3]]) == [[1, 2], [3]]
    assert as_prompt_lists((5, 6)) == [[5, 6]]
