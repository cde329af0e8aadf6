"""Errors in OpenAI's shape, and the mapping of everything that can go wrong onto them.

Every error the server answers is an :class:`OpenAIError`: ``{"error": {"message", "type",
"param", "code"}}`` with its HTTP status. This module turns the other kinds into it: FastAPI's
validation errors (its 422 becomes a 400 naming the field, or saying what is wrong with the
body as a whole), Starlette's routing errors (404, 405), and what the engine raises while a
request runs (told apart by type: `EngineShutdown`, `UnknownAdapterError`, `ContextLengthError`,
`DecodeRequestError`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..finetune.multi_lora import UnknownAdapterError
from ..generate.request import ContextLengthError, DecodeRequestError
from .engine import EngineShutdown
from .schemas import CONTENT_MISSING

__all__ = ["OpenAIError", "bad", "validation_to_openai", "http_error_to_openai", "engine_error", "internal_error"]


class OpenAIError(Exception):
    """An error answered in OpenAI's shape; ``status`` is the HTTP status code."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """A 400: the request's own fault, ``param`` naming the argument at fault."""
    return OpenAIError(400, message, "invalid_request_error", param, code)


def internal_error(err: BaseException) -> OpenAIError:
    """A 500 for a fault of the server itself; the details go to the log, not the client."""
    return OpenAIError(500, f"internal server error ({type(err).__name__})", "server_error")


# Type tags pydantic adds to the location of an error inside a union ("prompt.constrained-str").
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def param_path(loc: Sequence[Any]) -> tuple[str | None, bool]:
    """An error location as OpenAI names params (``messages[0].role``), and whether it went
    through a union member."""
    path, tagged = "", False
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.isidentifier() or part in _TYPE_TAGS:
            tagged = True
        else:
            path += ("." if path else "") + part
    return path or None, tagged


def _body_error(error: Mapping[str, Any]) -> OpenAIError | None:
    """The body as a whole is wrong (not JSON, empty): FastAPI reports these at ``("body", ...)``."""
    loc, kind = tuple(error.get("loc", ())), error.get("type")
    if kind == "json_invalid" and loc[:1] == ("body",):
        reason = (error.get("ctx") or {}).get("error") or error.get("msg", "invalid JSON")
        where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return bad(f"the request body is not valid JSON: {reason}{where}")
    if kind == "missing" and loc == ("body",):
        return bad("the request body is empty; send a JSON object with the request's arguments")
    return None


def validation_to_openai(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    """FastAPI's validation errors (its 422) as one OpenAI 400 that names the first bad param."""
    if not errors:
        return bad("invalid request")
    first = errors[0]
    whole = _body_error(first)
    if whole is not None:
        return whole
    param, tagged = param_path(first.get("loc", ()))
    kind = first.get("type")
    if kind == "extra_forbidden":
        return bad(f"unrecognized request argument {param!r}", param)
    if kind == "missing":
        return bad(f"missing required argument {param!r}", param)
    if kind == CONTENT_MISSING:
        return bad(f"{param}: {first.get('msg')}", f"{param}.content")
    if param is None:
        return bad("the request body must be a JSON object with the request's arguments")
    if tagged:  # a union: none of its forms matched; say what each wanted
        top = param.split(".")[0].split("[")[0]
        reasons = list(
            dict.fromkeys(
                e.get("msg", "")
                for e in errors
                if param_path(e.get("loc", ()))[0] and param_path(e.get("loc", ()))[0].startswith(top)
            )
        )
        return bad(f"invalid value for {top!r}: no accepted form matched ({'; '.join(reasons[:4])})", top)
    return bad(f"invalid value for {param!r}: {first.get('msg', 'invalid')}", param)


def http_error_to_openai(method: str, path: str, err: StarletteHTTPException) -> OpenAIError:
    """A routing error (unknown path, wrong method) in OpenAI's shape, saying what to use."""
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    if err.status_code == 404:
        message = f"{method} {path} is not a route of this server"
    elif err.status_code == 405:
        headers = {k.lower(): v for k, v in (getattr(err, "headers", None) or {}).items()}
        allowed = headers.get("allow", "another method")
        message = f"{method} is not allowed on {path}; use {allowed}"
    else:
        message = str(err.detail)
    return OpenAIError(
        err.status_code,
        message,
        kinds.get(err.status_code, "invalid_request_error"),
        headers=getattr(err, "headers", None),
    )


def engine_error(err: BaseException, timeout: float | None) -> BaseException:
    """Map what the engine (or waiting on it) raised to the error the client sees. Anything
    else (a client gone, a cancellation, a real fault) is returned as it is."""
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, TimeoutError):
        return OpenAIError(
            408, f"the request took longer than the server's timeout of {timeout:g} s", "timeout_error", code="timeout"
        )
    if isinstance(err, EngineShutdown):
        return OpenAIError(503, "the server is shutting down; retry on another replica", "server_error")
    if isinstance(err, UnknownAdapterError):  # unloaded between the route's check and the engine's
        return OpenAIError(404, str(err), "not_found_error", "model", "model_not_found")
    if isinstance(err, ContextLengthError):
        return bad(str(err), code="context_length_exceeded")
    if isinstance(err, DecodeRequestError):  # the engine's checks of the request: meant for the user
        return bad(str(err))
    return err
