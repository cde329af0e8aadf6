"""The server's errors, without a server: validation, routing and engine errors in OpenAI's shape."""

import asyncio

import pytest
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from genforge.generate.request import ContextLengthError, DecodeRequestError
from genforge.serve.engine import EngineShutdown
from genforge.serve.errors import (
    OpenAIError,
    bad,
    engine_error,
    http_error_to_openai,
    internal_error,
    param_path,
    validation_to_openai,
)
from genforge.serve.schemas import ChatCompletionRequest, CompletionRequest


def _errors(schema, body: dict) -> list[dict]:
    """Pydantic's errors for a body, located as FastAPI locates them (under "body")."""
    with pytest.raises(ValidationError) as info:
        schema.model_validate(body)
    return [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]


def test_an_openai_error_has_openai_shape_status_and_headers():
    err = OpenAIError(429, "slow down", "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "2"})
    assert err.body() == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    }
    response = err.response()
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    assert bad("no", "n").body()["error"] == {
        "message": "no",
        "type": "invalid_request_error",
        "param": "n",
        "code": None,
    }
    fault = internal_error(KeyError("secret detail"))
    assert fault.status == 500 and fault.message == "internal server error (KeyError)"


def test_param_paths_are_named_as_openai_names_them():
    assert param_path(("body", "messages", 0, "role")) == ("messages[0].role", False)
    assert param_path(("body",)) == (None, False)
    assert param_path(("body", "prompt", "list[int]", 0)) == ("prompt[0]", True)
    assert param_path(("body", "stop", "constrained-str")) == ("stop", True)


def test_a_body_that_is_not_json_empty_or_not_an_object_is_named_as_such():
    not_json = validation_to_openai(
        [
            {
                "type": "json_invalid",
                "loc": ("body", 7),
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": "Expecting ',' delimiter"},
            }
        ]
    )
    assert not_json.status == 400 and not_json.param is None
    assert not_json.message == "the request body is not valid JSON: Expecting ',' delimiter at character 7"
    empty = validation_to_openai([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    assert empty.message == "the request body is empty; send a JSON object with the request's arguments"
    listed = validation_to_openai(
        [{"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be a valid dictionary", "input": [1]}]
    )
    assert listed.message == "the request body must be a JSON object with the request's arguments"


def test_field_errors_name_the_first_bad_param():
    unknown = validation_to_openai(_errors(CompletionRequest, {"model": "m", "prompt": "x", "max_token": 3}))
    assert (unknown.message, unknown.param) == ("unrecognized request argument 'max_token'", "max_token")
    missing = validation_to_openai(_errors(CompletionRequest, {"model": "m"}))
    assert (missing.message, missing.param) == ("missing required argument 'prompt'", "prompt")
    hot = validation_to_openai(_errors(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 5}))
    assert hot.param == "temperature" and hot.message.startswith("invalid value for 'temperature': ")
    union = validation_to_openai(_errors(CompletionRequest, {"model": "m", "prompt": 3}))
    assert union.param == "prompt" and "no accepted form matched" in union.message
    assert validation_to_openai([]).message == "invalid request"


def test_a_message_without_the_content_its_role_needs_is_named():
    for role in ("system", "developer", "user", "tool"):
        messages = [{"role": "user", "content": "hi"}, {"role": role}]
        err = validation_to_openai(_errors(ChatCompletionRequest, {"model": "m", "messages": messages}))
        assert (err.message, err.param) == (f"messages[1]: a '{role}' message needs 'content'", "messages[1].content")
    # An assistant turn may leave it out.
    ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    )


def test_routing_errors_say_what_to_use():
    missing = http_error_to_openai("GET", "/v1/nothing", HTTPException(404))
    assert (missing.status, missing.type) == (404, "not_found_error")
    assert missing.message == "GET /v1/nothing is not a route of this server"
    wrong = http_error_to_openai("GET", "/v1/completions", HTTPException(405, headers={"Allow": "POST"}))
    assert wrong.message == "GET is not allowed on /v1/completions; use POST" and wrong.headers == {"Allow": "POST"}
    other = http_error_to_openai("POST", "/x", HTTPException(413, detail="too large"))
    assert (other.status, other.message) == (413, "too large")


def test_engine_errors_are_told_apart_by_type_not_by_their_text():
    too_long = engine_error(
        ContextLengthError(
            "this model's maximum context length is 8 tokens", prompt_tokens=6, max_new_tokens=4, context_length=8
        ),
        60.0,
    )
    assert (too_long.status, too_long.code) == (400, "context_length_exceeded")
    # A plain refusal whose text happens to mention the context is not a context-length error.
    refused = engine_error(DecodeRequestError("the context of this request is odd"), 60.0)
    assert (refused.status, refused.code, refused.message) == (400, None, "the context of this request is odd")
    # A ValueError from anywhere else is a fault, not the user's mistake.
    fault = ValueError("shape mismatch")
    assert engine_error(fault, 60.0) is fault
    # Nor is a shutdown recognised by its class name alone.
    impostor = type("EngineShutdown", (RuntimeError,), {})("bye")
    assert engine_error(impostor, 60.0) is impostor
    shutdown = engine_error(EngineShutdown("the server is shutting down"), 60.0)
    assert (shutdown.status, shutdown.type) == (503, "server_error")
    late = engine_error(TimeoutError(), 2.5)
    assert (late.status, late.code) == (408, "timeout") and "2.5 s" in late.message
    given = bad("already shaped")
    assert engine_error(given, None) is given
    for passthrough in (asyncio.CancelledError(), RuntimeError("a real fault")):
        assert engine_error(passthrough, 1.0) is passthrough
