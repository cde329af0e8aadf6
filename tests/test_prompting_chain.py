"""Output parsers and prompt chains: typed values passed on by name, errors that name the step."""

from __future__ import annotations

import pytest
from prompting_fakes import ScriptedChatModel

from genforge.chat_models import LocalChatModel
from genforge.prompting import (
    Chain,
    ChainError,
    ChoiceParser,
    JSONParser,
    NumberParser,
    ParseError,
    RegexParser,
    Step,
    StepError,
    TextParser,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds overhead


def test_json_parser_finds_the_object_in_prose_or_a_fence_and_checks_the_schema():
    parser = JSONParser(schema={"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]})
    assert parser.parse('Sure! ```json\n{"age": 3}\n``` done') == {"age": 3}
    assert parser.parse('The record is {"age": 41, "x": [1]} as asked.') == {"age": 41, "x": [1]}
    with pytest.raises(ParseError, match="at age: 'three' is not of type 'integer'") as caught:
        parser.parse('{"age": "three"}')
    assert caught.value.raw == '{"age": "three"}'
    with pytest.raises(ParseError, match="found none"):
        JSONParser().parse("[1, 2] only a list")
    assert JSONParser(allow_array=True).parse("[1, 2]") == [1, 2]
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        JSONParser(schema={"type": 5})


def test_regex_choice_and_number_parsers():
    assert RegexParser(r"Name: (\w+)").parse("Name: Ada\n") == "Ada"
    assert RegexParser(r"(?P<a>\d+)-(?P<b>\d+)").parse("range 3-9") == {"a": "3", "b": "9"}
    choice = ChoiceParser(["positive", "negative", "very positive"])
    assert choice.parse("Negative.") == "negative"
    assert choice.parse("I'd say very positive overall") == "very positive"
    with pytest.raises(ParseError, match="names several"):
        choice.parse("positive or negative")
    with pytest.raises(ParseError, match="found none"):
        choice.parse("neutral")
    assert NumberParser(int).parse("first 3 then 1,204 apples") == 1204
    assert NumberParser(float, which="first").parse("-2.5e1 and 7") == -25.0
    with pytest.raises(ParseError, match="expected an integer, got 2.5"):
        NumberParser(int).parse("about 2.5")
    with pytest.raises(ParseError, match="empty reply"):
        TextParser().parse("  \n")


def _two_step_chain(model):
    return Chain(
        [
            Step("extract", "Extract name and age as JSON from: {{ bio }}", parser=JSONParser(), output="person"),
            Step(
                "classify",
                "Is {{ person.name }} (age {{ person.age }}) a child or an adult?",
                parser=ChoiceParser(["child", "adult"]),
            ),
            Step("years", "Years until {{ person.name }}, a {{ classify }}, turns 100?", parser="int"),
        ],
        model=model,
    )


def test_a_chain_passes_typed_outputs_on_by_name():
    model = ScriptedChatModel(['{"name": "Ada", "age": 36}', "An adult.", "In 64 years."])
    chain = _two_step_chain(model)
    assert chain.inputs == ["bio"]
    assert chain.output_types() == {"person": dict, "classify": str, "years": int}
    result = chain.run(bio="Ada is 36.")
    assert result["person"] == {"name": "Ada", "age": 36}
    assert result["classify"] == "adult" and result.final == 64 and isinstance(result.final, int)
    assert model.calls[1][1][-1]["content"] == "Is Ada (age 36) a child or an adult?"
    assert model.calls[2][1][-1]["content"] == "Years until Ada, a adult, turns 100?"
    assert [s.replies for s in result.steps] == [['{"name": "Ada", "age": 36}'], ["An adult."], ["In 64 years."]]


def test_a_step_reading_a_value_nobody_gives_is_refused_before_any_call():
    model = ScriptedChatModel()
    with pytest.raises(ChainError, match=r"step 'b' reads 'summary', which is neither a chain input"):
        Chain([Step("a", "{{ text }}"), Step("b", "{{ summary }}")], model=model, inputs=["text"])
    with pytest.raises(ChainError, match="writes output 'x', which an earlier step writes"):
        Chain([Step("a", "{{ t }}", output="x"), Step("b", "{{ x }}", output="x")], model=model)
    with pytest.raises(ChainError, match="has no model"):
        Chain([Step("a", "{{ t }}")])
    chain = Chain([Step("a", "{{ t }}")], model=model)
    with pytest.raises(ChainError, match="missing 't'; unknown 'u'"):
        chain.run(u=1)
    assert model.calls == []


def test_a_parse_failure_names_the_step_and_the_raw_reply():
    model = ScriptedChatModel(['{"name": "Ada", "age": 36}', "maybe a teenager?"])
    with pytest.raises(StepError, match=r"step 'classify'.*raw reply: 'maybe a teenager\?'") as caught:
        _two_step_chain(model).run(bio="Ada")
    assert caught.value.step == "classify" and caught.value.raw == "maybe a teenager?"


def test_retries_show_the_model_its_reply_and_the_error():
    model = ScriptedChatModel(["no number here", "42"])
    chain = Chain([Step("n", "How many? {{ q }}", parser="int", retries=1)], model=model)
    assert chain.run(q="x").final == 42
    retry = model.calls[1][1]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == "no number here" and "expected a number (int)" in retry[2]["content"]


def test_a_chain_runs_through_a_local_model(text_model_dir):
    """End to end through LocalChatModel on a tiny random model: the rendered prompt reaches the
    chat template, and greedy decoding makes the chain reproducible."""
    model = LocalChatModel(text_model_dir)
    chain = Chain(
        [
            Step("draft", "Write about {{ topic }}.", parser=TextParser(allow_empty=True), max_tokens=6),
            Step("again", "Shorten: {{ draft }}", parser=TextParser(allow_empty=True), max_tokens=4),
        ],
        model=model,
    )
    first, second = chain.run(topic="tea"), chain.run(topic="tea")
    assert first.outputs == second.outputs
    assert first.steps[0].messages == [{"role": "user", "content": "Write about tea."}]
    assert first.steps[1].messages[0]["content"] == f"Shorten: {first['draft']}"
    assert isinstance(first.final, str)
