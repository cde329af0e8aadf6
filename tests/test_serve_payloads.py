"""OpenAI payloads and request preparation, without a server or a model."""

import json

import pytest

from genforge.generate.sampling import SamplingParams
from genforge.serve.engine import RequestOutput, TokenLogprob
from genforge.serve.errors import OpenAIError
from genforge.serve.payloads import (
    CHAT,
    COMPLETION,
    Choice,
    StreamChunks,
    full_response,
    logprobs_payload,
    prompt_logprobs_payload,
    sse,
    token_text,
    usage,
)
from genforge.serve.preparation import ModelLimits, Prepared, prepare
from genforge.serve.schemas import CompletionRequest


class Letters:
    """Token i reads as the i-th letter; 5 tokens, though the model may have more rows."""

    def __len__(self):
        return 5

    def decode(self, ids):
        return "".join("abcde"[i] for i in ids)


def _prepared(n=1, prompts=((0, 1),), texts=("ab",), logprobs=None, echo=False, include_usage=False, stream=False):
    params = [SamplingParams(max_new_tokens=4) for _ in range(n * len(prompts))]
    return Prepared(
        "m",
        [list(p) for p in prompts],
        list(texts),
        params,
        n,
        logprobs,
        [[] for _ in params],
        False,
        stream,
        include_usage,
        echo=echo,
    )


def _output(tokens, text, finished=False, reason=None, logprobs=None, completion=1, cached=0, prompt_logprobs=None):
    return RequestOutput(
        "r", tokens, text, logprobs, finished, reason, 2, completion, cached, 0.0, 0.0, prompt_logprobs=prompt_logprobs
    )


def test_a_choice_gathers_outputs_and_a_scoring_run_hides_its_token():
    choice = Choice(prompt_index=0)
    choice.add(_output([3], "d", cached=1))
    choice.add(_output([4], "e", finished=True, reason="stop", completion=2))
    assert (choice.text, choice.token_ids, choice.finish_reason) == ("de", [3, 4], "stop")
    assert (choice.completion_tokens, choice.cached_tokens) == (2, 0)
    scoring = Choice(prompt_index=0)
    shown = scoring.add(_output([3], "d", finished=True, reason="stop"), score_only=True)
    assert (shown.token_ids, shown.text, shown.completion_tokens, shown.finish_reason) == ([], "", 0, "length")
    assert (scoring.text, scoring.finish_reason) == ("", "length")


def test_usage_counts_each_prompt_once_however_many_choices():
    prepared = _prepared(n=2, prompts=((0, 1), (2,)), texts=("ab", "c"))
    choices = [Choice(i // 2, completion_tokens=3, cached_tokens=c) for i, c in enumerate((1, 1, 0, 0))]
    assert usage(prepared, choices) == {
        "prompt_tokens": 3,
        "completion_tokens": 12,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 1},
    }


def test_logprobs_in_chat_and_completion_shapes():
    tokenizer = Letters()
    assert token_text(tokenizer, 7) == "<|token_id:7|>"  # a padded row past the tokenizer
    entries = [TokenLogprob(1, -0.5, [(1, -0.5), (7, float("-inf"))])]
    chat = logprobs_payload(CHAT, entries, tokenizer)
    assert chat == {
        "content": [
            {
                "token": "b",
                "logprob": -0.5,
                "bytes": [98],
                "top_logprobs": [
                    {"token": "b", "logprob": -0.5, "bytes": [98]},
                    {"token": "<|token_id:7|>", "logprob": -9999.0, "bytes": list(b"<|token_id:7|>")},
                ],
            }
        ]
    }
    entries.append(TokenLogprob(2, -1.0, [(2, -1.0), (2, -3.0)]))
    legacy = logprobs_payload(COMPLETION, entries, tokenizer, text_offset=10)
    assert legacy == {
        "tokens": ["b", "c"],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"b": -0.5, "<|token_id:7|>": -9999.0}, {"c": -1.0}],
        "text_offset": [10, 11],
    }
    prompt = prompt_logprobs_payload([0, 1], [None, TokenLogprob(1, -2.0, [(0, -0.1)])], tokenizer)
    assert prompt == {
        "tokens": ["a", "b"],
        "token_logprobs": [None, -2.0],
        "top_logprobs": [None, {"a": -0.1}],
        "text_offset": [0, 1],
    }
    assert prompt_logprobs_payload([0], None, tokenizer)["token_logprobs"] == [None]


def test_a_full_response_echoes_the_prompt_before_the_completion():
    prepared = _prepared(logprobs=0, echo=True)
    choice = Choice(0, prompt_logprobs=[None, TokenLogprob(1, -2.0, [])])
    choice.add(_output([2], "c", finished=True, reason="length", logprobs=[TokenLogprob(2, -1.0, [])]))
    body = full_response(COMPLETION, "cmpl-1", prepared, [choice], Letters())
    assert body["object"] == "text_completion" and body["model"] == "m" and body["id"] == "cmpl-1"
    (only,) = body["choices"]
    assert only["text"] == "abc" and only["finish_reason"] == "length"
    assert only["logprobs"]["tokens"] == ["a", "b", "c"] and only["logprobs"]["token_logprobs"] == [None, -2.0, -1.0]
    assert only["logprobs"]["text_offset"] == [0, 1, 2]
    assert choice.text == "c"  # formatting leaves the choice as it was
    chat = full_response(CHAT, "chatcmpl-1", _prepared(), [choice], Letters())["choices"][0]
    assert chat["message"] == {"role": "assistant", "content": "c", "refusal": None} and chat["logprobs"] is None


def _events(chunks):
    return [json.loads(e.removeprefix("data: ")) for e in chunks]


def test_a_chat_stream_opens_each_choice_with_its_role_and_ends_with_usage():
    prepared = _prepared(n=2, include_usage=True, stream=True)
    choices = [Choice(0), Choice(0)]
    stream = StreamChunks(CHAT, "chatcmpl-1", prepared, choices, Letters())
    opening = _events(stream.opening())
    assert [e["choices"][0]["index"] for e in opening] == [0, 1]
    assert all(e["choices"][0]["delta"] == {"role": "assistant", "content": ""} and e["usage"] is None for e in opening)
    assert all(e["object"] == "chat.completion.chunk" for e in opening)
    choices[1].add(_output([2], "c", finished=True, reason="stop"))
    (event,) = _events(stream.output(1, _output([2], "c", finished=True, reason="stop")))
    assert event["choices"] == [{"index": 1, "finish_reason": "stop", "delta": {"content": "c"}, "logprobs": None}]
    assert list(stream.output(0, _output([], ""))) == []  # nothing new: no event
    (last,) = _events(stream.closing())
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 1
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n'


def test_a_completion_stream_echoes_first_and_refuses_an_aborted_output():
    prepared = _prepared(logprobs=0, echo=True, stream=True)
    choices = [Choice(0, prompt_logprobs=[None, TokenLogprob(1, -2.0, [])])]
    stream = StreamChunks(COMPLETION, "cmpl-1", prepared, choices, Letters())
    assert list(stream.opening()) == [] and list(stream.closing()) == []
    echo, first = _events(stream.output(0, _output([2], "c", logprobs=[TokenLogprob(2, -1.0, [])])))
    assert echo["choices"][0]["text"] == "ab" and echo["choices"][0]["logprobs"]["token_logprobs"] == [None, -2.0]
    assert "usage" not in echo
    assert first["choices"][0]["text"] == "c" and first["choices"][0]["logprobs"]["text_offset"] == [2]
    (second,) = _events(stream.output(0, _output([3], "d", logprobs=[TokenLogprob(3, -1.0, [])])))
    assert second["choices"][0]["logprobs"]["text_offset"] == [3]
    with pytest.raises(OpenAIError) as info:
        list(stream.output(0, _output([], "", finished=True, reason="abort")))
    assert info.value.status == 503


def test_preparation_gives_each_choice_its_own_seed_and_checks_the_context():
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x", "n": 3, "seed": 5, "max_tokens": 4})
    prepared = prepare("m", body, [[1, 2]], ["x"], None, None, "prompt", ModelLimits(context=16, vocabulary=10))
    assert [p.seed for p in prepared.params] == [5, 6, 7] and prepared.n == 3
    assert all(p.max_new_tokens == 4 for p in prepared.params)
    unbounded = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    limits = ModelLimits(context=16, vocabulary=10)
    assert prepare("m", unbounded, [[1, 2]], ["x"], None, None, "prompt", limits).params[0].max_new_tokens == 14
    with pytest.raises(OpenAIError) as info:
        prepare("m", body, [[1] * 14], ["x"], None, None, "prompt", limits)
    assert (info.value.param, info.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(OpenAIError) as info:
        prepare("m", body, [[12]], ["x"], None, None, "prompt", limits)
    assert info.value.param == "prompt" and "outside the vocabulary (0..9)" in info.value.message
