"""Tool calling in /v1/chat/completions, through the official `openai` client against a live
server on a tiny random Llama whose chat template (Hermes/Qwen style) supports tools.

The references: jsonschema for the arguments of every call, the non-streamed answer for the
streamed one (and the `openai` client's own stream helper, which joins the deltas and parses
the arguments of strict tools), and transformers' `apply_chat_template(tools=...)` for the
prompts conversations with tool calls and tool results render to.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pydantic
import pytest
from live_server import LiveServer
from tool_calling_shared import (
    ADD,
    HERMES_TEMPLATE,
    LIGHTS,
    LLAMA3_TEMPLATE,
    PLAIN_TEMPLATE,
    TOOLS,
    WEATHER,
    tool_model_dir,
    tool_tokenizer,
)
from transformers import PreTrainedTokenizerFast

from genforge.checkpoint import load_model
from genforge.serve.api import create_app
from genforge.serve.engine import AsyncEngine, Engine
from genforge.serve.preparation import chat_prompt, tool_request
from genforge.serve.schemas import ChatCompletionRequest
from genforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL, PLAIN = "tiny-tools", "tiny-plain"
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "Is it warm in Paris?"}]
# A conversation that made a call, got its result, and goes on.
CONVERSATION = [
    {"role": "system", "content": "You help with errands."},
    {"role": "user", "content": "Add 2 and 3, and check the weather in Oslo."},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temperature": -3}'},
    {"role": "assistant", "content": "2 + 3 = 5, and Oslo is at -3 °C."},
    {"role": "user", "content": "Thanks! Lights on downstairs?"},
]


def _with_mapping_arguments(messages):
    """The conversation as transformers' documentation writes it: arguments as mappings."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]
            ]
        out.append(message)
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_tools")
    return (
        tool_model_dir(root / "tools", tool_tokenizer(), context=2048),
        tool_model_dir(root / "plain", tool_tokenizer(template=PLAIN_TEMPLATE), context=256),
    )


@pytest.fixture(scope="module")
def server(model_dirs):
    engines, tokenizers = {}, {}
    for name, directory in zip((MODEL, PLAIN), model_dirs):
        tokenizer = Tokenizer.from_dir(directory)
        engines[name] = Engine(
            load_model(directory), tokenizer, block_size=16, max_num_seqs=16, max_num_batched_tokens=1024
        )
        tokenizers[name] = tokenizer
    with LiveServer(create_app(AsyncEngine(engines), tokenizers=tokenizers)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=60)


def _validate(message, names):
    assert message.content is None
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ------------------------------------------------------------------------------------ calling


def test_required_and_named_calls_are_valid_on_every_request(client):
    """50 sampled requests (temperature 1, each its own seed) over three schemas: every call parses
    and validates against its function's schema."""
    named = [{"type": "function", "function": {"name": t["function"]["name"]}} for t in TOOLS]
    choices = ["required"] * 20 + [named[i % 3] for i in range(30)]

    def ask(i):
        return client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=TOOLS,
            tool_choice=choices[i],
            parallel_tool_calls=False,
            max_tokens=96,
            temperature=1.0,
            seed=i,
        )

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(len(choices))))
    called = {}
    for choice, answer in zip(choices, answers):
        [reply] = answer.choices
        assert reply.finish_reason == "tool_calls", reply
        assert len(reply.message.tool_calls) == 1
        names = set(SCHEMAS) if choice == "required" else {choice["function"]["name"]}
        _validate(reply.message, names)
        called[reply.message.tool_calls[0].function.name] = called.get(reply.message.tool_calls[0].function.name, 0) + 1
    assert set(called) == set(SCHEMAS)  # every schema was exercised


def test_streamed_tool_call_deltas_join_to_the_non_streamed_calls(client):
    kwargs = dict(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0, seed=11
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish, content = [], []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.finish_reason:
                finish.append(choice.finish_reason)
            if choice.delta.content:
                content.append(choice.delta.content)
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # a call's first delta names it
                    assert delta.id.startswith("call_") and delta.type == "function" and delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish == [whole.finish_reason] and "".join(content) == (whole.message.content or "")
    assert sorted(calls) == list(range(len(whole.message.tool_calls)))
    joined = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    assert joined == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert sum(len(c["arguments"]) > 0 for c in calls.values()) == len(calls)


def test_the_openai_stream_helper_parses_strict_tool_arguments(client):
    class Lights(pydantic.BaseModel):
        on: bool
        room: str = pydantic.Field(max_length=6)

    tool = openai.pydantic_function_tool(Lights, name="set_room_lights")
    kwargs = dict(model=MODEL, messages=QUESTION, tools=[tool], max_tokens=60, temperature=1.0, seed=5)
    named = {"type": "function", "function": {"name": "set_room_lights"}}
    with client.chat.completions.stream(tool_choice=named, **kwargs) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_completion()
    assert {"tool_calls.function.arguments.delta", "tool_calls.function.arguments.done"} <= kinds
    [call] = final.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Lights)
    whole = client.chat.completions.create(tool_choice=named, **kwargs).choices[0].message.tool_calls[0]
    assert (whole.function.name, whole.function.arguments) == (call.function.name, call.function.arguments)


def test_tool_choice_none_and_auto(client):
    text = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=12, temperature=1.0, seed=2
    ).choices[0]
    assert text.message.tool_calls is None and isinstance(text.message.content, str) and text.message.content
    assert text.finish_reason in ("stop", "length")
    for seed in range(3):
        auto = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=TOOLS, max_tokens=40, temperature=1.0, seed=seed
        ).choices[0]
        if auto.message.tool_calls and auto.finish_reason == "tool_calls":
            for call in auto.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        else:
            assert auto.message.tool_calls is None or auto.finish_reason == "length"


def test_n_choices_each_make_their_own_calls(client):
    done = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[ADD, WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        n=3,
        max_tokens=80,
        temperature=1.0,
        seed=21,
    )
    assert len(done.choices) == 3
    for reply in done.choices:
        assert reply.finish_reason == "tool_calls"
        _validate(reply.message, {"add", "get_weather"})


# ------------------------------------------------------------------------- conversations back


@pytest.mark.parametrize("template", [HERMES_TEMPLATE, LLAMA3_TEMPLATE])
def test_tool_conversations_render_as_transformers_renders_them(template):
    ours = tool_tokenizer(template=template)
    reference = PreTrainedTokenizerFast(tokenizer_object=ours.backend, eos_token="<|im_end|>")
    reference.chat_template = template
    for messages in (CONVERSATION, CONVERSATION[1:4], QUESTION):
        mapped = _with_mapping_arguments(messages)
        for tools in (TOOLS, [LIGHTS]):
            expected = reference.apply_chat_template(mapped, tools=tools, add_generation_prompt=True, tokenize=False)
            assert ours.apply_chat_template(mapped, tools=tools, add_generation_prompt=True) == expected
            # The server takes OpenAI's form (arguments as JSON text) and renders the same prompt.
            body = ChatCompletionRequest.model_validate({"model": MODEL, "messages": messages, "tools": tools})
            ids, text = chat_prompt(body, ours, MODEL, tool_request(body, ours))
            assert text == expected
            assert ids == reference.apply_chat_template(mapped, tools=tools, add_generation_prompt=True)["input_ids"]


def test_a_conversation_with_tool_results_is_served(client, model_dirs):
    reference = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_dir(model_dirs[0]).backend)
    reference.chat_template = HERMES_TEMPLATE
    done = client.chat.completions.create(
        model=MODEL, messages=CONVERSATION, tools=TOOLS, tool_choice="required", max_tokens=80, seed=3
    )
    mapped = _with_mapping_arguments(CONVERSATION)
    expected = reference.apply_chat_template(mapped, tools=TOOLS, add_generation_prompt=True)["input_ids"]
    assert done.usage.prompt_tokens == len(expected)
    assert done.choices[0].message.tool_calls


# ---------------------------------------------------------------------------------------- errors


def _bad_request(client, param, match, **kwargs):
    kwargs = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    error = info.value.body
    assert error["param"] == param, error
    assert match in error["message"], error["message"]
    return error["message"]


def test_tool_errors_are_400_saying_what_to_fix(client):
    _bad_request(
        client,
        "tool_choice",
        "names the function 'mul', which is not among the tools (get_weather, add, set_lights)",
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "mul"}},
    )
    broken = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}},
    }
    message = _bad_request(
        client,
        "tools[1].function.parameters",
        "schema of 'f' cannot be used for constrained decoding",
        tools=[ADD, broken],
    )
    assert "Invalid type: strin" in message
    _bad_request(
        client,
        "tools",
        "does not render tools, so the model never sees them; serve a model whose chat template supports tools",
        model=PLAIN,
        tools=[ADD],
    )
    _bad_request(client, "tool_choice", "only allowed when tools are given", tool_choice="required")
    _bad_request(client, "parallel_tool_calls", "only allowed when tools are given", parallel_tool_calls=False)
    _bad_request(
        client,
        "response_format",
        "cannot be combined with tools",
        tools=[ADD],
        response_format={"type": "json_object"},
    )
    _bad_request(
        client, "tools[0].function.name", "letters, digits", tools=[{"type": "function", "function": {"name": "a b"}}]
    )
    _bad_request(client, "tools[0].type", "", tools=[{"type": "retrieval"}])
    # Text on a model without tool support still works.
    done = client.chat.completions.create(model=PLAIN, messages=QUESTION, max_tokens=3)
    assert done.choices[0].message.tool_calls is None
