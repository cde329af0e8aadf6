"""The one interface to a text-generating model: a genforge model in process and an
OpenAI-compatible endpoint answer the same calls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from genforge.chat_models import (
    ChatModel,
    ChatModelError,
    EndpointChatModel,
    LocalChatModel,
    Reply,
    tool_arguments,
)


def _fake_client(replies):
    calls = []

    def create(**request):
        calls.append(request)
        choices = [
            SimpleNamespace(message=SimpleNamespace(content=text, tool_calls=calls_), finish_reason=reason)
            for text, calls_, reason in replies
        ]
        return SimpleNamespace(choices=choices, usage=SimpleNamespace(completion_tokens=4))

    return SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create))), calls


def test_endpoint_model_sends_tools_and_reads_tool_calls():
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    client, calls = _fake_client([(None, [call], "tool_calls")])
    model = EndpointChatModel("m", client=client)
    assert isinstance(model, ChatModel)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    reply = model.chat([{"role": "user", "content": "1+2?"}], tools=tools, tool_choice="required", seed=5)
    assert reply == Reply("", [call], "tool_calls", 4)
    assert reply.message() == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert tool_arguments(reply.tool_calls[0]) == {"a": 1, "b": 2}
    assert calls[0]["tools"] == tools and calls[0]["tool_choice"] == "required" and calls[0]["seed"] == 5
    assert "n" not in calls[0] and "stop" not in calls[0]


def test_endpoint_model_samples_n_replies_in_one_request():
    client, calls = _fake_client([("a", None, "stop"), ("b", None, "length")])
    replies = EndpointChatModel("m", client=client).sample_replies(
        [{"role": "user", "content": "x"}], 2, temperature=0.7, stop=["\n"]
    )
    assert [r.content for r in replies] == ["a", "b"] and replies[1].finish_reason == "length"
    assert calls[0]["n"] == 2 and calls[0]["temperature"] == 0.7 and calls[0]["stop"] == ["\n"]


def test_local_model_replies_and_samples(bpe_model, bpe_tokenizer):
    model = LocalChatModel(model=bpe_model, tokenizer=bpe_tokenizer)
    greedy = model.complete("def f(x):", max_tokens=6)
    assert greedy == model.chat([{"role": "user", "content": "def f(x):"}], max_tokens=6).content
    samples = model.sample_replies([{"role": "user", "content": "import "}], 4, max_tokens=8, seed=1)
    assert len(samples) == 4 and len({s.content for s in samples}) > 1
    assert all(1 <= s.completion_tokens <= 8 for s in samples)
    # A base model without a chat template takes one user message as its raw prompt, nothing else.
    with pytest.raises(ChatModelError, match="no chat template"):
        model.chat([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatModelError, match="context"):
        model.complete("x", max_tokens=bpe_model.config.max_position_embeddings)


def test_bad_requests_are_refused_before_work(bpe_model, bpe_tokenizer):
    model = LocalChatModel(model=bpe_model, tokenizer=bpe_tokenizer)
    with pytest.raises(ChatModelError, match="at least one message"):
        model.chat([])
    with pytest.raises(ChatModelError, match="'role'"):
        model.chat([{"content": "x"}])
    with pytest.raises(ChatModelError, match="max_tokens"):
        model.chat([{"role": "user", "content": "x"}], max_tokens=0)
    with pytest.raises(ChatModelError, match="n must be"):
        model.sample_replies([{"role": "user", "content": "x"}], 0)
    with pytest.raises(ChatModelError, match="no config.json"):
        LocalChatModel("/nonexistent")
    with pytest.raises(ChatModelError, match="not JSON"):
        tool_arguments({"function": {"name": "f", "arguments": "{oops"}})
    with pytest.raises(ChatModelError, match="not a JSON object"):
        tool_arguments({"function": {"name": "f", "arguments": "[1]"}})
