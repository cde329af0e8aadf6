"""A scripted `ChatModel` for the prompting tests: replies come from a list (or a function of
the conversation), so a recipe's logic (parsing, stopping, voting, search) is checked exactly."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from genforge.chat_models import Reply


class ScriptedChatModel:
    """Replies in order from `script` (texts or `Reply`s), or from `respond(messages)` when given.

    Every call is recorded in `calls` as (kind, messages, options); running out of script is an
    error naming the call, so a test that asks more than expected fails loudly.
    """

    def __init__(
        self,
        script: Sequence[str | Reply] = (),
        respond: Callable[[list[dict]], str] | None = None,
        tokens_per_reply: int = 0,
    ) -> None:
        self.script, self.respond, self.tokens_per_reply = list(script), respond, tokens_per_reply
        self.calls: list[tuple[str, list[dict], dict]] = []

    def _next(self, messages) -> Reply:
        if self.respond is not None:
            reply = self.respond([dict(m) for m in messages])
        elif not self.script:
            raise AssertionError(f"the script ran out at call {len(self.calls)}: {messages[-1]['content']!r:.200}")
        else:
            reply = self.script.pop(0)
        return reply if isinstance(reply, Reply) else Reply(content=reply, completion_tokens=self.tokens_per_reply)

    def chat(self, messages: Sequence[Mapping[str, Any]], **options) -> Reply:
        self.calls.append(("chat", [dict(m) for m in messages], options))
        return self._next(messages)

    def sample_replies(self, messages: Sequence[Mapping[str, Any]], n: int, **options) -> list[Reply]:
        self.calls.append(("sample", [dict(m) for m in messages], {"n": n, **options}))
        return [self._next(messages) for _ in range(n)]

    def complete(self, prompt: str, max_tokens: int = 256, **options) -> str:
        return self.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, **options).content
