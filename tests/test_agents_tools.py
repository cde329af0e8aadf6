"""Tools from typed Python functions: the JSON schema from the signature and docstring,
argument validation and conversion, timeouts, and definitions that are refused."""

from __future__ import annotations

import enum
import time
from typing import Annotated, Any, Literal, Optional

import jsonschema
import pytest

from genforge.agents import Tool, ToolDefinitionError, json_schema_for, parse_docstring, tool


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def weather(
    city: str,
    days: int = 3,
    unit: Unit = Unit.CELSIUS,
    detail: Literal["short", "long"] = "short",
    hours: list[int] | None = None,
    location: tuple[float, float] = (0.0, 0.0),
    extra: dict[str, bool] = {},  # noqa: B006 - a default for the schema, never mutated
    note: Annotated[str, "free text for the forecaster"] = "",
    verbose: Optional[bool] = None,  # noqa: UP045 - the typing spelling must work too
) -> dict:
    """Forecast the weather for a city.

    Uses the national weather service
    and caches answers for an hour.

    Args:
        city (str): the city's name, e.g. "Paris".
        days: how many days ahead,
            counting today.
        unit: the temperature unit.

    Returns:
        the forecast.
    """
    return {
        "city": city,
        "days": days,
        "unit": unit,
        "detail": detail,
        "hours": hours,
        "location": location,
        "extra": extra,
        "note": note,
        "verbose": verbose,
    }


def test_schema_from_signature_and_google_docstring():
    t = Tool.from_function(weather)
    assert t.name == "weather"
    assert (
        t.description
        == "Forecast the weather for a city.\n\nUses the national weather service and caches answers for an hour."
    )
    p = t.parameters
    assert p["type"] == "object" and p["required"] == ["city"] and p["additionalProperties"] is False
    props = p["properties"]
    assert props["city"] == {"type": "string", "description": 'the city\'s name, e.g. "Paris".'}
    assert props["days"] == {"type": "integer", "description": "how many days ahead, counting today.", "default": 3}
    assert props["unit"] == {
        "type": "string",
        "enum": ["celsius", "fahrenheit"],
        "description": "the temperature unit.",
        "default": "celsius",
    }
    assert props["detail"] == {"type": "string", "enum": ["short", "long"], "default": "short"}
    assert props["hours"] == {
        "anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}],
        "default": None,
    }
    assert props["location"]["prefixItems"] == [{"type": "number"}, {"type": "number"}]
    assert props["location"]["minItems"] == props["location"]["maxItems"] == 2
    assert props["extra"] == {"type": "object", "additionalProperties": {"type": "boolean"}, "default": {}}
    assert props["note"] == {"type": "string", "description": "free text for the forecaster", "default": ""}
    assert props["verbose"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
    jsonschema.Draft202012Validator.check_schema(p)
    assert t.spec() == {
        "type": "function",
        "function": {"name": "weather", "description": t.description, "parameters": p},
    }


def test_numpy_docstring():
    def area(width: float, height: float = 1.0) -> float:
        """Area of a rectangle.

        Parameters
        ----------
        width : float
            The width,
            in metres.
        height : float, optional
            The height.

        Returns
        -------
        float
        """
        return width * height

    description, arguments = parse_docstring(area.__doc__)
    assert description == "Area of a rectangle."
    assert arguments == {"width": "The width, in metres.", "height": "The height."}
    assert Tool.from_function(area).parameters["properties"]["width"]["description"] == "The width, in metres."


def test_validated_arguments_are_converted_to_what_the_function_declares():
    t = Tool.from_function(weather)
    result = t({"city": "Oslo", "days": 2.0, "unit": "fahrenheit", "location": [59.9, 10.7], "hours": [6, 18]})
    assert not result.is_error
    # The function received an int, an Enum member and a tuple; its dict result came back as JSON.
    assert '"days": 2' in result.content and '"location": [59.9, 10.7]' in result.content
    assert '"unit": "Unit.FAHRENHEIT"' in result.content


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({}, "'city' is a required property"),
        ({"city": "Oslo", "days": "two"}, "days: 'two' is not of type 'integer'"),
        ({"city": "Oslo", "unit": "kelvin"}, "unit: 'kelvin' is not one of ['celsius', 'fahrenheit']"),
        ({"city": "Oslo", "location": [1.0]}, "location: [1.0] is too short"),
        ({"city": "Oslo", "extra": {"x": 1}}, "extra/x: 1 is not of type 'boolean'"),
        ({"city": "Oslo", "mood": "sunny"}, "('mood' was unexpected)"),
        ({"city": "Oslo", "days": 1.5}, "days: 1.5 is not of type 'integer'"),
        (["Oslo"], "arguments must be a JSON object, got list"),
    ],
)
def test_bad_arguments_give_an_error_result_naming_the_problem(arguments, message):
    calls = []
    t = Tool.from_function(lambda_tool(calls))
    result = t(arguments)
    assert result.is_error and result.content.startswith("error: bad arguments for record:")
    assert message in result.content
    assert calls == []  # the function never ran


def lambda_tool(calls):
    def record(
        city: str,
        days: int = 1,
        unit: Unit = Unit.CELSIUS,
        location: tuple[float, float] = (0.0, 0.0),
        extra: dict[str, bool] = {},  # noqa: B006
    ) -> str:
        """Record a call."""
        calls.append(city)
        return "ok"

    return record


def test_timeouts_exceptions_and_long_results():
    @tool(timeout_s=0.1)
    def nap(seconds: float) -> str:
        """Sleep a while."""
        time.sleep(seconds)
        return "rested"

    started = time.monotonic()
    result = nap({"seconds": 3})
    assert result.is_error and "did not finish within its 0.1 s timeout" in result.content
    assert time.monotonic() - started < 1.5
    assert nap({"seconds": 0}).content == "rested"

    @tool(max_result_chars=100)
    def shout(times: int) -> str:
        """Say A many times, then B."""
        if times < 0:
            raise ValueError("times must be >= 0")
        return "A" * times + "B"

    long = shout({"times": 10_000})
    assert len(long.content) < 200 and long.content.endswith("AB") and "characters cut" in long.content
    failed = shout({"times": -1})
    assert failed.is_error and failed.content == "error: shout raised ValueError: times must be >= 0"


def test_definitions_that_cannot_be_offered_are_refused():
    def untyped(x):
        """Doc."""

    def variadic(*items: int):
        """Doc."""

    def undocumented(x: int):
        pass

    def odd(x: bytes):
        """Doc."""

    def int_keys(x: dict[int, str]):
        """Doc."""

    def positional(x: int, /):
        """Doc."""

    def bad_default(x: str = b"raw"):
        """Doc."""

    for function, message in [
        (untyped, "argument 'x' of untyped has no type hint"),
        (variadic, "*items"),
        (undocumented, "has no docstring"),
        (odd, "which has no JSON form"),
        (int_keys, "JSON objects have string keys"),
        (positional, "positional-only"),
        (bad_default, "the default of 'x'"),
    ]:
        with pytest.raises(ToolDefinitionError, match=message.replace("*", r"\*").replace("(", r"\(")):
            Tool.from_function(function)
    with pytest.raises(ToolDefinitionError, match="letters, digits"):
        Tool.from_function(weather, name="get weather!")
    with pytest.raises(ToolDefinitionError, match="not a valid JSON schema"):
        Tool("t", "d", {"type": "object", "properties": {"x": {"type": "integr"}}}, print)


def test_undocumented_functions_take_a_description_and_any_means_no_constraint():
    def echo(value: Any) -> Any:
        return value

    t = Tool.from_function(echo, description="Echo a value back.")
    assert t.parameters["properties"]["value"] == {}
    assert t({"value": [1, {"a": None}]}).content == '[1, {"a": null}]'
    assert json_schema_for(set[str]) == {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    assert json_schema_for(Literal[1, "a"]) == {"enum": [1, "a"]}
