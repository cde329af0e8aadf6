"""The request schemas of the OpenAI-compatible API (pydantic models) and its OpenAPI document.

Each route's body is one of these models: FastAPI validates it, and a request that does not
fit gets a 400 naming the field (`errors.validation_to_openai`). Limits follow OpenAI's where
it has them (``n``, ``top_logprobs``, stop strings, embedding inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "CompletionRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "ContentPart",
    "FunctionDefinition",
    "MessageToolCall",
    "NamedToolChoice",
    "ToolDefinition",
    "EmbeddingRequest",
    "JsonSchemaFormat",
    "LoadLoraAdapterRequest",
    "ResponseFormat",
    "StreamOptions",
    "UnloadLoraAdapterRequest",
    "openapi_with_openai_errors",
    "CONTENT_MISSING",
    "MAX_N",
    "MAX_LOGPROBS",
    "MAX_STOP",
]

MAX_N = 16  # choices per prompt; each is a sequence in the engine
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_STOP = 4  # OpenAI's limit on stop strings
_INT64 = 2**63 - 1
# The validation error of a message without the content its role needs.
CONTENT_MISSING = "message_content_missing"


class _Schema(BaseModel):
    # Unknown fields are refused (400 naming them) rather than silently ignored: a misspelt
    # `max_token` would otherwise generate to the end of the context.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Schema):
    include_usage: StrictBool = False


NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[StrictInt, Field(ge=-_INT64 - 1, le=_INT64)]
TokenId = Annotated[StrictInt, Field(ge=0)]


class _SamplingFields(_Schema):
    model: NonEmptyStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    seed: Seed | None = None
    user: StrictStr | None = None
    # vLLM's extensions
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # -1 or 0: off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[TokenId] | None = None
    # The LoRA adapter to run with, as `model: "base:adapter"` names it too.
    lora: NonEmptyStr | None = None


class CompletionRequest(_SamplingFields):
    prompt: (
        NonEmptyStr
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[NonEmptyStr], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    # 0 is allowed with echo: the prompt is scored, nothing is generated (how lm-evaluation-harness
    # asks for a continuation's log-likelihood).
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None


class ContentPart(BaseModel):
    # Any part parses, so that an image or audio part gets a clear "not supported" rather than
    # a schema mismatch; only text parts are served.
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class CalledFunction(_Schema):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it back


class MessageToolCall(_Schema):
    """A call an earlier assistant turn made, sent back in the conversation."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Only an assistant turn may come without content (OpenAI's rule; there it carries tool calls).
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn's calls
    tool_call_id: StrictStr | None = None  # a tool turn: the call it answers

    # The same rule in the published schema, for clients and fuzzers that read it.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                {"properties": {"role": {"const": "assistant"}}},
            ]
        },
    )

    @model_validator(mode="after")
    def _content_where_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise PydanticCustomError(CONTENT_MISSING, "a '{role}' message needs 'content'", {"role": self.role})
        return self


class JsonSchemaFormat(_Schema):
    name: StrictStr = "response"
    description: StrictStr | None = None
    # `schema` clashes with a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | StrictBool = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Schema):
    name: NonEmptyStr
    description: StrictStr | None = None
    # A JSON schema of the arguments object; checked (and compiled) by generate.tool_calls.
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None  # accepted: arguments always follow the schema here


class ToolDefinition(_Schema):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Schema):
    name: NonEmptyStr


class NamedToolChoice(_Schema):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    # OpenAI's limit: 128 tools.
    tools: Annotated[list[ToolDefinition], Field(min_length=1, max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None


class EmbeddingRequest(_Schema):
    model: NonEmptyStr
    # OpenAI's limit: 2048 inputs per request.
    input: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1, max_length=2048)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=2048)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None


class LoadLoraAdapterRequest(_Schema):
    """vLLM's `/v1/load_lora_adapter` body; `model` names the base when several are served
    (or give `lora_name` as `base:name`)."""

    lora_name: NonEmptyStr
    lora_path: NonEmptyStr
    model: NonEmptyStr | None = None
    load_inplace: StrictBool = False  # replace an adapter already loaded under the name


class UnloadLoraAdapterRequest(_Schema):
    lora_name: NonEmptyStr
    model: NonEmptyStr | None = None
    lora_int_id: StrictInt | None = None  # vLLM's; accepted and unused: adapters go by name


def openapi_with_openai_errors(app: FastAPI, served: Mapping[str, Sequence[str]]) -> Callable[[], dict]:
    """The generated OpenAPI schema, with FastAPI's 422 replaced by the 400 this server answers,
    the error responses documented in OpenAI's shape, and the ``model`` field of each request
    listing the models this server serves (``served``: request schema name -> model names)."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        error = {
            "description": "error",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["error"],
                        "properties": {
                            "error": {
                                "type": "object",
                                "required": ["message", "type", "param", "code"],
                                "properties": {
                                    "message": {"type": "string"},
                                    "type": {"type": "string"},
                                    "param": {"type": ["string", "null"]},
                                    "code": {"type": ["string", "null"]},
                                },
                            }
                        },
                    }
                }
            },
        }
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status in (
                    ("400", "401", "404", "429")
                    if operation.get("requestBody") or operation.get("parameters")
                    else ("401", "429")
                ):
                    responses[status] = error
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        for name, models in served.items():
            if models and name in components:
                components[name]["properties"]["model"]["enum"] = list(models)
        app.openapi_schema = schema
        return schema

    return openapi
