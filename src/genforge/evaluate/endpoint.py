"""Evaluate a model behind an OpenAI-compatible HTTP endpoint: harness tasks and LLM judges.

genforge's own server (`genforge serve`), vLLM, TGI and the OpenAI API speak the same
protocol, so one client covers them all:

- `EndpointLanguageModel` answers the harness's three request kinds the way
  lm-evaluation-harness's `local-completions` model does. Log-likelihoods come from the
  completions API with `echo=True` and `logprobs`: the prompt (context + continuation, as
  token ids from the model's own tokenizer, split like lm-eval's `_encode_pair`) is sent back
  with a log-probability for every token after the first. Generation is a plain completion
  with `stop` strings. Requests go out concurrently, so a batching server keeps busy.
- `endpoint_judge` turns a chat endpoint into a pairwise judge for `judge_all`
  (`pairwise_prompt` in, `parse_verdict` out).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..tokenizer import Tokenizer
from .base import MetricError
from .harness import DEFAULT_MAX_GEN_TOKS, encode_pair
from .judge import DEFAULT_CRITERIA, Judge, pairwise_prompt, parse_verdict


def _client(base_url: str, api_key: str | None, timeout: float):
    try:
        import openai
    except ImportError as err:  # pragma: no cover - openai is a dependency
        raise MetricError("evaluating an endpoint needs the `openai` package: pip install openai") from err
    return openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=2)


@contextlib.contextmanager
def _reaching(client) -> Iterator[None]:
    """Say in one sentence why the endpoint did not answer: an unreachable server is a
    ConnectionError, a refusal (a bad key, an unknown model) a MetricError with its message."""
    import openai

    try:
        yield
    except openai.APIConnectionError as err:
        raise ConnectionError(f"cannot reach the endpoint {client.base_url} ({err}); is the server running?") from None
    except openai.APIStatusError as err:
        raise MetricError(
            f"the endpoint {client.base_url} refused the request (HTTP {err.status_code}): {err.message}"
        ) from None


class EndpointLanguageModel:
    """The harness's `LanguageModel` over an OpenAI-compatible completions endpoint.

    `tokenizer` is the served model's tokenizer: continuations are scored token by token,
    so context and continuation must be split into the ids the server's model reads.
    `max_length` is the served context (prompts are cut from the left to fit, as for local
    models); `concurrency` is the number of requests in flight.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: Tokenizer,
        *,
        api_key: str | None = None,
        max_length: int = 2048,
        concurrency: int = 8,
        timeout: float = 600.0,
        prefix_token_id: int | None = None,
    ) -> None:
        if concurrency < 1 or max_length < 3:
            raise MetricError("concurrency must be >= 1 and max_length >= 3")
        self.client = _client(base_url, api_key, timeout)
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.concurrency = max_length, concurrency
        candidates = (prefix_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        self.prefix_token_id = next((c for c in candidates if c is not None), None)
        self.description = {"endpoint": base_url, "model": model, "context": max_length}

    def _map(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(function, items))

    def _prefix(self) -> int:
        if self.prefix_token_id is None:
            raise MetricError(
                "an empty context needs a BOS or EOS token to condition on; the tokenizer names "
                "neither, so pass prefix_token_id="
            )
        return self.prefix_token_id

    @property
    def _prompt_room(self) -> int:
        # Scoring asks for one generated token (max_tokens=0 is not accepted everywhere), so a
        # scored prompt may fill the context but for that one position.
        return self.max_length - 1

    def _echo(self, ids: list[int]) -> tuple[list[float | None], list[dict[str, float] | None], list[str]]:
        """Log-probabilities of the prompt's own tokens (the first has none)."""
        with _reaching(self.client):
            response = self.client.completions.create(
                model=self.model, prompt=ids, max_tokens=1, temperature=0.0, echo=True, logprobs=1
            )
        logprobs = response.choices[0].logprobs
        if logprobs is None or logprobs.token_logprobs is None or len(logprobs.token_logprobs) < len(ids):
            raise MetricError(
                f"the endpoint did not echo the prompt's log-probabilities (model {self.model!r}); "
                "scoring needs a server that supports `echo` with `logprobs` on /v1/completions"
            )
        return (
            list(logprobs.token_logprobs[: len(ids)]),
            list((logprobs.top_logprobs or [None] * len(ids))[: len(ids)]),
            list(logprobs.tokens[: len(ids)]),
        )

    # ------------------------------------------------------------------ request kinds
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        def score(pair: tuple[str, str]) -> tuple[float, bool]:
            context, continuation = pair
            if context:
                context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation)
            else:
                context_ids = [self._prefix()]
                continuation_ids = self.tokenizer.encode(continuation, add_special_tokens=False)
            if not continuation_ids:
                raise MetricError(f"the continuation {continuation!r} has no tokens to score")
            ids = (context_ids + continuation_ids)[-self._prompt_room :]
            logprobs, tops, tokens = self._echo(ids)
            n = len(continuation_ids)
            greedy = all(
                top is not None and max(top, key=top.get) == token for top, token in zip(tops[-n:], tokens[-n:])
            )
            return float(sum(logprobs[-n:])), greedy

        return self._map(score, list(requests))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """log p(text), every token scored after the prefix token. Texts longer than the
        context are scored in windows, each conditioned on the end of the previous one."""

        def score(text: str) -> float:
            ids = [self._prefix()] + self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) < 2:
                raise MetricError(f"text has no tokens to score: {text!r}")
            total, start = 0.0, 1  # ids[start:] are still to be scored
            while start < len(ids):
                context = max(1, start - self._prompt_room // 2) if start > 1 else 0
                window = ids[context : context + self._prompt_room]
                logprobs, _, _ = self._echo(window)
                scored_from = start - context
                total += sum(logprobs[scored_from:])
                start = context + len(window)
            return total

        return self._map(score, list(texts))

    def generate_until(
        self,
        contexts: Sequence[str],
        *,
        until: Sequence[str],
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> list[str]:
        until = [until] if isinstance(until, str) else [s for s in until if s]
        room = self.max_length - max_gen_toks
        if room < 1:
            raise MetricError(
                f"max_gen_toks {max_gen_toks} leaves no room for a prompt in a context of {self.max_length} tokens"
            )
        extra = {"top_k": top_k} if top_k else {}

        def complete(context: str) -> str:
            ids = self.tokenizer.encode(context, add_special_tokens=False) if context else [self._prefix()]
            with _reaching(self.client):
                response = self.client.completions.create(
                    model=self.model,
                    prompt=ids[-room:],
                    max_tokens=max_gen_toks,
                    temperature=temperature,
                    top_p=top_p,
                    stop=until[:4] or None,
                    seed=seed,
                    extra_body=extra or None,
                )
            text = response.choices[0].text
            for stop in until:  # the API takes at most four stop strings; cut at any of the rest
                text = text.split(stop)[0]
            return text

        return self._map(complete, list(contexts))


def endpoint_judge(
    base_url: str,
    model: str,
    *,
    api_key: str | None = None,
    criteria: str = DEFAULT_CRITERIA,
    max_tokens: int = 512,
    temperature: float = 0.0,
    timeout: float = 600.0,
) -> Judge:
    """A judge for `judge_pair` / `judge_all` backed by a chat-completions endpoint."""
    client = _client(base_url, api_key, timeout)

    def judge(question: str, answer_a: str, answer_b: str) -> str:
        prompt = pairwise_prompt(question, answer_a, answer_b, criteria=criteria)
        with _reaching(client):
            response = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=temperature,
            )
        return parse_verdict(response.choices[0].message.content or "")

    return judge
