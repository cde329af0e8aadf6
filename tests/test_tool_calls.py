"""genforge.generate.tool_calls: checking tools and tool_choice, recognising a template's call
format, the call grammar (walked at random through llguidance: every finished call must parse
and validate against its schema with jsonschema), the streaming parser (any split of the text
gives the same reply), and tool replies of an in-process model."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from tool_calling_shared import (
    ADD,
    LIGHTS,
    LLAMA3_TEMPLATE,
    PLAIN_TEMPLATE,
    TOOLS,
    WEATHER,
    tool_model_dir,
    tool_tokenizer,
)

from genforge.chat_models import LocalChatModel, Reply
from genforge.generate.sampling import SamplingParams
from genforge.generate.tool_calls import (
    HERMES,
    LLAMA3_JSON,
    ArgumentsDelta,
    ContentDelta,
    ToolCallError,
    ToolCallParser,
    ToolCallStart,
    ToolChoice,
    check_tool_choice,
    check_tools,
    local_tool_reply,
    messages_for_template,
    parse_tool_calls,
    tool_call_constraint,
    tool_call_format,
)
from genforge.generate.tool_calls import collect_events as join_events

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def hermes_tokens():
    return tool_tokenizer(tag_tokens=True)


@pytest.fixture(scope="module")
def hermes_text():
    return tool_tokenizer(tag_tokens=False)


@pytest.fixture(scope="module")
def llama3():
    return tool_tokenizer(tag_tokens=False, template=LLAMA3_TEMPLATE)


# ------------------------------------------------------------------------------------ checking


def test_tools_are_checked_with_errors_naming_the_argument():
    tools = check_tools(TOOLS)
    assert [t.name for t in tools] == ["get_weather", "add", "set_lights"]
    assert tools[0].as_openai() == WEATHER
    bare = check_tools([{"type": "function", "function": {"name": "now"}}])[0]
    assert bare.parameters == {"type": "object", "properties": {}} and bare.description is None

    def refused(tools, match, param):
        with pytest.raises(ToolCallError, match=match) as info:
            check_tools(tools)
        assert info.value.param == param

    refused([], "non-empty list", "tools")
    refused("get_weather", "non-empty list", "tools")
    refused([{"type": "code_interpreter"}], "only function tools", "tools[0]")
    refused([WEATHER, {"type": "function", "function": {"name": "a b"}}], "letters, digits", "tools[1].function.name")
    refused([WEATHER, WEATHER], "two tools are named 'get_weather'", "tools[1]")
    refused(
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
        "must describe a JSON object .* got type 'string'",
        "tools[0].function.parameters",
    )
    refused(
        [{"type": "function", "function": {"name": "f", "parameters": []}}],
        "must be a JSON schema object",
        "tools[0].function.parameters",
    )
    # A schema the compiler rejects: the message says why, by the tool's name.
    broken = {"type": "object", "properties": {"a": {"type": "strin"}}}
    refused(
        [{"type": "function", "function": {"name": "f", "parameters": broken}}],
        "schema of 'f' cannot be used for constrained decoding: .*Invalid type: strin",
        "tools[0].function.parameters",
    )


def test_an_unsatisfiable_schema_is_refused_by_the_tool_name():
    empty = {
        "type": "object",
        "properties": {"a": {"type": "string", "minLength": 5, "maxLength": 2}},
        "required": ["a"],
    }
    with pytest.raises(ToolCallError, match="schema of 'never' cannot be used .*Unsatisfiable schema") as info:
        check_tools([WEATHER, {"type": "function", "function": {"name": "never", "parameters": empty}}])
    assert info.value.param == "tools[1].function.parameters"


def test_tool_choice_forms_and_errors():
    tools = check_tools(TOOLS)
    assert check_tool_choice(None, tools) == ToolChoice("auto")
    for mode in ("none", "auto", "required"):
        assert check_tool_choice(mode, tools) == ToolChoice(mode)
    named = {"type": "function", "function": {"name": "add"}}
    assert check_tool_choice(named, tools) == ToolChoice("function", "add")
    with pytest.raises(
        ToolCallError, match=r"names the function 'mul', which is not among the tools \(get_weather, add"
    ):
        check_tool_choice({"type": "function", "function": {"name": "mul"}}, tools)
    for bad in ("any", {"type": "function"}, {"function": {"name": "add"}}, 3):
        with pytest.raises(ToolCallError) as info:
            check_tool_choice(bad, tools)
        assert info.value.param == "tool_choice"


def test_call_format_is_recognised_from_the_template(hermes_tokens, llama3):
    assert tool_call_format(hermes_tokens) is HERMES
    assert tool_call_format(llama3) is LLAMA3_JSON
    with pytest.raises(ToolCallError, match="does not render tools.*serve a model whose chat template supports tools"):
        tool_call_format(tool_tokenizer(template=PLAIN_TEMPLATE))
    no_template = tool_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ToolCallError, match="no chat template"):
        tool_call_format(no_template)


# ------------------------------------------------------------------------------------- grammar


def _walk(constraint, tokenizer, rng, prefix: str = "", steps: int = 160) -> tuple[str, bool]:
    """Sample uniformly among the tokens the grammar allows (a model that knows nothing):
    the text, and whether it ended on EOS."""
    matcher = constraint._initial.deep_copy()
    ids = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    assert matcher.consume_tokens(ids), matcher.get_error()
    eos = tokenizer.eos_token_id
    for _ in range(steps):
        allowed = constraint._allowed(matcher).nonzero().flatten().tolist()
        if matcher.is_accepting():
            allowed.append(eos)
        token = rng.choice(allowed)
        if token == eos:
            return tokenizer.decode(ids, skip_special_tokens=True), True
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    return tokenizer.decode(ids, skip_special_tokens=True), False


def _validate(calls, allowed_names):
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) == 29
        assert call["function"]["name"] in allowed_names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


@pytest.mark.parametrize("which", ["hermes_tokens", "hermes_text", "llama3"])
@pytest.mark.parametrize("parallel", [False, True])
def test_required_and_named_calls_always_validate(which, parallel, request):
    tokenizer = request.getfixturevalue(which)
    fmt = tool_call_format(tokenizer)
    tools = check_tools(TOOLS)
    rng = random.Random(7)
    for choice in (ToolChoice("required"), ToolChoice("function", "set_lights"), ToolChoice("function", "add")):
        [constraint] = tool_call_constraint(tokenizer, tools, choice, fmt, parallel=parallel)
        names = {choice.name} if choice.name else set(SCHEMAS)
        counts = set()
        for _ in range(12):
            text, ended = _walk(constraint, tokenizer, rng)
            if not ended:  # a parallel run may still be writing calls: only finished ones count
                assert parallel
                continue
            parsed = parse_tool_calls(text, fmt)
            assert parsed.tool_calls and parsed.content is None, text
            _validate(parsed.tool_calls, names)
            counts.add(len(parsed.tool_calls))
        assert counts == {1} if not parallel or choice.name else counts, counts


def test_auto_allows_text_and_constrains_a_started_call(hermes_text, hermes_tokens, llama3):
    tools = check_tools(TOOLS)
    rng = random.Random(3)
    for tokenizer, opening in (
        (hermes_text, "Let me check. <tool_call>\n"),
        (hermes_tokens, "ok <tool_call>"),
        (llama3, ""),
    ):
        fmt = tool_call_format(tokenizer)
        [constraint] = tool_call_constraint(tokenizer, tools, ToolChoice("auto"), fmt, parallel=False)
        # Free text is allowed, may end there, and stays text.
        matcher = constraint._initial.deep_copy()
        assert matcher.consume_tokens(tokenizer.encode("Sure, it is 3 {here}.", add_special_tokens=False))
        assert matcher.is_accepting()
        assert parse_tool_calls("Sure, it is 3 {here}.", fmt).tool_calls == []
        for _ in range(6):
            text, ended = _walk(constraint, tokenizer, rng, prefix=opening + ('{"name": "' if not opening else ""))
            assert ended
            parsed = parse_tool_calls(text, fmt)
            assert len(parsed.tool_calls) == 1, text
            _validate(parsed.tool_calls, set(SCHEMAS))
        # Once a call is open, only JSON of a known function may follow.
        matcher = constraint._initial.deep_copy()
        bad = (opening or "") + ('{"name": "rm_rf"' if fmt is LLAMA3_JSON else '\n{"name": "rm_rf"')
        assert not matcher.consume_tokens(tokenizer.encode(bad.replace("\n\n", "\n"), add_special_tokens=False))


# -------------------------------------------------------------------------------------- parsing


def _stream(text: str, fmt, cuts: list[int]):
    parser = ToolCallParser(fmt, lambda: "call_x")
    events, start = [], 0
    for cut in [*cuts, len(text)]:
        events += parser.feed(text[start:cut])
        start = cut
    return events + parser.finish()


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a}b\\"c]", "unit": "celsius"}}\n</tool_call>'
LLAMA_CALL = '{"name": "add", "parameters": {"a": 1, "b": -2}}'


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        (HERMES, "just text ", "just text ", []),
        (HERMES, "Checking. " + HERMES_CALL, "Checking.", [("get_weather", '{"city": "a}b\\"c]", "unit": "celsius"}')]),
        (
            HERMES,
            HERMES_CALL + "\n" + HERMES_CALL.replace("get_weather", "w2"),
            None,
            [("get_weather", None), ("w2", None)],
        ),
        (HERMES, HERMES_CALL[:62], None, [("get_weather", '{"city": "a}b')]),  # cut by max_tokens
        (HERMES, HERMES_CALL[:20], HERMES_CALL[:20], []),  # cut before the name: text
        (HERMES, "<tool_call>\nnot json", "<tool_call>\nnot json", []),
        (HERMES, 'x <tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>', "x", [("f", '{"a": 1}')]),
        (HERMES, "see <tool_", "see <tool_", []),
        (LLAMA3_JSON, LLAMA_CALL, None, [("add", '{"a": 1, "b": -2}')]),
        (LLAMA3_JSON, LLAMA_CALL + "; " + LLAMA_CALL.replace("; ", ""), None, [("add", None), ("add", None)]),
        (LLAMA3_JSON, '{"name": "f", "parameters": {"q": "a; b"}}', None, [("f", '{"q": "a; b"}')]),
        (LLAMA3_JSON, "<|python_tag|>" + LLAMA_CALL, None, [("add", None)]),
        (LLAMA3_JSON, "The sum is {3}.", "The sum is {3}.", []),
    ],
)
def test_parser_gives_the_same_reply_however_the_text_is_split(fmt, text, content, calls):
    whole = parse_tool_calls(text, fmt)
    assert whole.content == content
    assert [c["function"]["name"] for c in whole.tool_calls] == [name for name, _ in calls]
    for call, (_, arguments) in zip(whole.tool_calls, calls):
        if arguments is not None:
            assert call["function"]["arguments"] == arguments
    assert len({c["id"] for c in whole.tool_calls}) == len(calls)  # fresh ids
    rng = random.Random(len(text))
    for split in range(25):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, split % 9))) if len(text) > 1 else []
        if split == 0:
            cuts = list(range(1, len(text)))  # one character at a time
        streamed = join_events(_stream(text, fmt, cuts))
        assert streamed.content == whole.content
        assert [c["function"] for c in streamed.tool_calls] == [c["function"] for c in whole.tool_calls]


def test_parser_events_open_each_call_before_its_arguments():
    events = _stream("Hi. " + HERMES_CALL + "\n" + HERMES_CALL, HERMES, list(range(5, 200, 7)))
    assert events[0] == ContentDelta("Hi.")
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "get_weather")]
    for start in starts:
        first_arguments = next(
            i for i, e in enumerate(events) if isinstance(e, ArgumentsDelta) and e.index == start.index
        )
        assert events.index(start) < first_arguments
    assert sum(isinstance(e, ArgumentsDelta) for e in events) > 2  # arguments arrive in pieces


def test_messages_for_template_give_arguments_as_mappings():
    messages = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": "3"},
    ]
    converted = messages_for_template(messages)
    assert converted[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the caller's list is untouched
    assert converted[1] == messages[1]


# ---------------------------------------------------------------------------- in-process replies


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    tokenizer = tool_tokenizer()
    return LocalChatModel(tool_model_dir(tmp_path_factory.mktemp("tools") / "model", tokenizer))


def test_local_chat_model_replies_with_valid_calls(local_model):
    question = [{"role": "user", "content": "Lights on in the hall, please."}]
    ids = local_model.prompt_ids(question, TOOLS)
    for seed in range(4):
        params = SamplingParams(temperature=1.0, max_new_tokens=80, seed=seed)
        reply = local_tool_reply(local_model, ids, TOOLS, "required", params, parallel_tool_calls=False)
        assert reply.finish_reason == "tool_calls" and len(reply.tool_calls) == 1, reply
        _validate(reply.tool_calls, set(SCHEMAS))
    named = {"type": "function", "function": {"name": "add"}}
    reply = local_model.chat(question, max_tokens=80, temperature=1.0, seed=9, tools=[ADD, LIGHTS], tool_choice=named)
    assert isinstance(reply, Reply) and reply.finish_reason == "tool_calls"
    assert [c["function"]["name"] for c in reply.tool_calls] == ["add"]
    _validate(reply.tool_calls, {"add"})
    # The reply goes back into the conversation, with a tool result, and renders.
    follow = [*question, reply.message(), {"role": "tool", "tool_call_id": reply.tool_calls[0]["id"], "content": "7"}]
    rendered = local_model.tokenizer.decode(local_model.prompt_ids(follow, TOOLS))
    arguments = json.loads(reply.tool_calls[0]["function"]["arguments"])
    assert json.dumps({"name": "add", "arguments": arguments}) in rendered  # a mapping, not a quoted string
    assert "<tool_response>\n7\n</tool_response>" in rendered
    text = local_model.chat(question, max_tokens=8, temperature=1.0, seed=1, tools=TOOLS, tool_choice="none")
    assert text.tool_calls == [] and text.finish_reason in ("stop", "length")
    with pytest.raises(ToolCallError, match="not among the tools"):
        local_model.chat(
            question, max_tokens=8, tools=[ADD], tool_choice={"type": "function", "function": {"name": "x"}}
        )


def test_local_chat_model_refuses_tools_its_template_cannot_render(tmp_path):
    tokenizer = tool_tokenizer(template=PLAIN_TEMPLATE)
    model = LocalChatModel(tool_model_dir(tmp_path / "plain", tokenizer, context=128))
    with pytest.raises(ToolCallError, match="does not render tools"):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=4, tools=[ADD], tool_choice="required")


def test_constraints_of_one_request_and_the_next_share_the_compiled_grammar_not_their_state(hermes_tokens):
    tools = check_tools(TOOLS)
    first, second = tool_call_constraint(hermes_tokens, tools, ToolChoice("required"), HERMES, count=2)
    [later] = tool_call_constraint(hermes_tokens, tools, ToolChoice("required"), HERMES)
    assert len({id(c._initial) for c in (first, second, later)}) == 3
    assert first._initial.consume_tokens(hermes_tokens.encode("<tool_call>\n{", add_special_tokens=False))
    for untouched in (second, later):  # each starts from the beginning: "{" is not allowed first
        assert not untouched._initial.deep_copy().consume_tokens(hermes_tokens.encode("{", add_special_tokens=False))
