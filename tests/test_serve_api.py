"""The OpenAI-compatible server, checked through the official `openai` client against a live
uvicorn server on localhost, serving a tiny random Llama through the real engine.

The references: the `openai` client parses every response into its own types (so the
shapes are OpenAI's), genforge's simple generator gives the tokens a request must return,
and the model's own forward pass gives the logprobs.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx2
import jsonschema
import openai
import pytest
import torch
from live_server import LiveServer
from prometheus_client.parser import text_string_to_metric_families

from genforge.checkpoint import load_model, save_model
from genforge.config import Config
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams
from genforge.model import Transformer
from genforge.serve.api import create_app
from genforge.serve.engine import AsyncEngine, Engine
from genforge.serve.engine import Request as EngineRequest
from genforge.serve.limits import RateLimit
from genforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny"
CONTEXT = 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _corpus() -> str:
    import json as json_module

    text = open(json_module.__file__, encoding="utf-8").read()[:5000]
    return text + ' {"ok": true, "color": "red"} 0123456789 [] {} "" : , true false null '


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama over a byte-level BPE tokenizer (so JSON-schema constraints work),
    with a chat template; the embedding table is padded past the tokenizer's vocabulary."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # No full byte alphabet: every token is then printable ASCII from the corpus, so even a random
    # model writes readable text (stop strings can be picked from it).
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<bos>"], show_progress=False)
    backend.train_from_iterator([_corpus()], trainer)
    tokenizer = Tokenizer(backend, {"eos_token": "<eos>", "bos_token": "<bos>", "chat_template": CHAT_TEMPLATE})
    config = Config(
        family="llama",
        vocab_size=448,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return save_model(Transformer(config), tmp_path_factory.mktemp("serve") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir), Tokenizer.from_dir(model_dir)


def _engine(loaded, **kwargs) -> AsyncEngine:
    model, tokenizer = loaded
    kwargs.setdefault("max_num_seqs", 64)
    kwargs.setdefault("max_num_batched_tokens", 256)
    return AsyncEngine({MODEL: Engine(model, tokenizer, block_size=8, **kwargs)})


@pytest.fixture(scope="module")
def server(loaded):
    tokenizer = loaded[1]
    engine = _engine(loaded)
    with LiveServer(create_app(engine, tokenizers={MODEL: tokenizer})) as live:
        live.engine = engine
        yield live


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _wait_idle(engine, model=MODEL, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats(model)
        if stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0:
            return stats
        time.sleep(0.02)
    return engine.stats(model)


def _reference(loaded, prompt_ids, max_new_tokens, **params):
    model, tokenizer = loaded
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, **params)
    return generate(model, [prompt_ids], sampling, tokenizer=tokenizer)[0]


# -------------------------------------------------------------------------------- completions


def test_greedy_completion_matches_the_simple_generator_and_counts_usage(client, loaded):
    tokenizer = loaded[1]
    prompt = "The json module"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ids = tokenizer.encode(prompt)
    expected = _reference(loaded, ids, 12)
    choice = done.choices[0]
    assert choice.text == expected.text
    assert done.usage.prompt_tokens == len(ids)
    assert done.usage.completion_tokens == len(expected.token_ids)
    assert done.usage.total_tokens == len(ids) + len(expected.token_ids)
    assert choice.finish_reason == expected.finish_reason
    assert done.object == "text_completion" and done.model == MODEL


def test_streamed_deltas_join_to_the_non_streamed_text(client):
    kwargs = dict(model=MODEL, prompt="Encoding basic Python", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1
    assert "".join(texts) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    # include_usage: every chunk has usage null except the last, which has no choices.
    assert all(c.usage is None for c in chunks[:-1])
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.model_dump()["completion_tokens"] == whole.usage.completion_tokens
    )
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_ends_with_done_marker(server):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": True}
    with httpx2.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert sum(1 for e in events[:-1] if json.loads(e[6:])["choices"][0]["finish_reason"]) == 1


def test_finish_reason_length_then_stop_at_a_stop_string(client, loaded):
    prompt = "Decoding JSON"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    text = free.choices[0].text
    assert free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 24
    # A stop string taken from the middle of the free-running text cuts it right there.
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.usage.completion_tokens < 24


def test_completion_logprobs_match_the_model(client, loaded):
    model, tokenizer = loaded
    prompt = "import json"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    ids = tokenizer.encode(prompt)
    generated = _reference(loaded, ids, 5).token_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids + generated])).logits[0].float()
    expected = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)
    for step, token in enumerate(generated):
        assert lp.token_logprobs[step] == pytest.approx(expected[step, token].item(), abs=1e-4)
        assert lp.tokens[step] == tokenizer.decode([token])
        assert len(lp.top_logprobs[step]) <= 3
        best = max(lp.top_logprobs[step].values())
        assert best == pytest.approx(expected[step].max().item(), abs=1e-4)  # greedy: the chosen one is the top
    assert lp.text_offset[0] == len(prompt)


def test_n_choices_are_distinct_and_seeded_requests_repeat(client, loaded):
    kwargs = dict(model=MODEL, prompt="def dumps", max_tokens=8, temperature=1.0, n=3, seed=11, logprobs=0)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    # Usage adds up every choice's tokens (one logprob entry per token) and counts the prompt once.
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in first.choices)
    assert first.usage.prompt_tokens == len(loaded[1].encode("def dumps"))
    other = client.completions.create(**{**kwargs, "seed": 12})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]


def test_several_prompts_and_token_id_prompts(client, loaded):
    tokenizer = loaded[1]
    texts = ["alpha", "the beta"]
    done = client.completions.create(model=MODEL, prompt=texts, max_tokens=4, temperature=0, n=2)
    assert len(done.choices) == 4
    assert done.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    assert done.choices[0].text == done.choices[1].text  # greedy: both choices of a prompt agree
    ids = tokenizer.encode("the beta")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == done.choices[2].text


def test_concurrent_greedy_requests_each_match_the_request_alone(server, loaded):
    """32 requests of mixed lengths at once through the server: batching changes nothing."""
    tokenizer = loaded[1]
    words = _corpus().split()
    prompts = [" ".join(words[i * 5 : i * 5 + 2 + (i * 7) % 23]) for i in range(32)]
    limits = [3 + (i * 5) % 17 for i in range(32)]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        async with client:
            return await asyncio.gather(
                *(
                    client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
                    for p, n in zip(prompts, limits)
                )
            )

    for prompt, limit, done in zip(prompts, limits, asyncio.run(main())):
        expected = _reference(loaded, tokenizer.encode(prompt), limit)
        assert done.choices[0].text == expected.text
        assert done.usage.completion_tokens == len(expected.token_ids)


def test_a_shared_prefix_is_reported_as_cached_tokens(server, loaded):
    tokenizer = loaded[1]

    def hits():
        text = httpx2.get(server.url + "/metrics", timeout=10).text
        family = {f.name: f for f in text_string_to_metric_families(text)}["genforge_prefix_cache_hits"]
        return next(s.value for s in family.samples if s.name.endswith("_total"))

    prefix = " ".join(_corpus().split()[:12])  # several 8-token blocks
    first = server.client().completions.create(model=MODEL, prompt=prefix + " first", max_tokens=4, temperature=0)
    before = hits()
    second = server.client().completions.create(model=MODEL, prompt=prefix + " second", max_tokens=4, temperature=0)
    assert hits() > before  # the prefix-cache hit counter /metrics exports rose
    shared = len(tokenizer.encode(prefix))
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 8 <= cached <= shared and cached % 8 == 0  # whole blocks of the common prefix
    alone = _reference(loaded, tokenizer.encode(prefix + " second"), 4)
    assert second.choices[0].text == alone.text
    assert first.usage.prompt_tokens_details.cached_tokens < cached


# ------------------------------------------------------------------------------------- chat


def test_chat_uses_the_template_and_streams_the_same_text(client, loaded):
    tokenizer = loaded[1]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say json"}]
    done = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = _reference(loaded, prompt, 10)
    assert done.choices[0].message.content == expected.text
    assert done.choices[0].message.role == "assistant"
    assert done.usage.prompt_tokens == len(prompt)
    assert done.usage.completion_tokens == len(expected.token_ids)
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_chat_streams_n_choices_each_opened_by_its_role(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=1.0,
            seed=5,
            n=2,
            stream=True,
        )
    )
    roles = {c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"}
    assert roles == {0, 1}
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=1.0, seed=5, n=2
    )
    for k in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == k)
        assert text == whole.choices[k].message.content


def test_chat_logprobs_shape(client):
    done = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        # Greedy picks the likeliest text token; logprobs are of the raw distribution, whose padded
        # rows (no text, never sampled) may rank above it.
        for alternative in entry.top_logprobs:
            if not alternative.token.startswith("<|token_id:"):
                assert alternative.logprob <= entry.logprob + 1e-6
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_response_format_json_schema_is_valid_json(client):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
        "required": ["ok", "color"],
        "additionalProperties": False,
    }
    done = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "answer"}],
        max_tokens=48,
        temperature=1.0,
        seed=1,
        n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    for choice in done.choices:  # each sequence has its own grammar state
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    loose = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "answer"}],
        max_tokens=48,
        temperature=1.0,
        seed=3,
        response_format={"type": "json_object"},
    )
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(loose.choices[0].message.content), dict)


# ------------------------------------------------------------------------------------- errors


def _error(exc_info, status):
    err = exc_info.value
    assert err.status_code == status
    body = err.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the client unwraps {"error": ...}
    assert body["message"]
    return body


def test_invalid_parameters_are_400_with_openai_shape(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=5)
    assert _error(info, 400)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"max_token": 3})
    body = _error(info, 400)
    assert "max_token" in body["message"] and body["param"] == "max_token"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert _error(info, 400)["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert _error(info, 400)["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logit_bias={"99999": 5})
    assert "vocabulary" in _error(info, 400)["message"]


def test_prompt_over_the_context_is_400_naming_both_numbers(client, loaded):
    tokenizer = loaded[1]
    long_prompt = " ".join(["json"] * 200)
    n = len(tokenizer.encode(long_prompt))
    assert n > CONTEXT
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    body = _error(info, 400)
    assert str(n) in body["message"] and str(CONTEXT) in body["message"]
    assert body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="short", max_tokens=CONTEXT)
    assert str(CONTEXT) in _error(info, 400)["message"]


def test_unknown_model_is_404_and_bad_json_is_400(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert _error(info, 404)["code"] == "model_not_found"
    response = httpx2.post(
        server.url + "/v1/completions", content=b"{not json", timeout=10, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = httpx2.get(server.url + "/v1/nothing-here", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    response = httpx2.get(server.url + "/v1/completions", timeout=10)
    assert response.status_code == 405 and "POST" in response.json()["error"]["message"]
    image = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": image}], max_tokens=2)
    assert _error(info, 400)["param"] == "messages[0].content[0]"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])
def test_a_body_that_is_not_json_or_is_empty_is_400_saying_so(server, route):
    def post(content, content_type="application/json"):
        headers = {"content-type": content_type} if content_type else {}
        response = httpx2.post(server.url + route, content=content, timeout=10, headers=headers)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    error = post(b"{not json")
    assert error["message"].startswith("the request body is not valid JSON: ") and "character 1" in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert post(b"\xff\xfe")["message"].startswith("the request body is not valid JSON")
    for content_type in ("application/json", None):
        error = post(b"", content_type)
        assert error["message"] == "the request body is empty; send a JSON object with the request's arguments"
    for body in (b"[1, 2]", b"null", b'"text"'):
        assert post(body)["message"] == "the request body must be a JSON object with the request's arguments"


def test_a_chat_message_without_the_content_its_role_needs_is_400_naming_it(client, server):
    for messages, where in (
        ([{"role": "user"}], 0),
        ([{"role": "system", "content": "be brief"}, {"role": "user"}], 1),
        ([{"role": "user", "content": "hi"}, {"role": "tool", "content": None}], 1),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        error = _error(info, 400)
        role = messages[where]["role"]
        assert error["message"] == f"messages[{where}]: a '{role}' message needs 'content'"
        assert error["param"] == f"messages[{where}].content"
    # An assistant turn may come without content (OpenAI's assistant turns with tool calls do).
    done = client.chat.completions.create(
        model=MODEL,
        max_tokens=2,
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "again"}],
    )
    assert done.choices[0].finish_reason in ("stop", "length")


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx2.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3)
    text = httpx2.get(server.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "genforge_requests_running",
        "genforge_requests_waiting",
        "genforge_kv_cache_usage_ratio",
        "genforge_prefix_cache_hit_rate",
        "genforge_time_to_first_token_seconds",
        "genforge_time_per_output_token_seconds",
        "genforge_e2e_request_latency_seconds",
        "genforge_generation_tokens",
        "genforge_prompt_tokens",
    ):
        assert name in families, name
    count = [s.value for s in families["genforge_e2e_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert count and count[0] >= 1
    generated = [s.value for s in families["genforge_generation_tokens"].samples if s.name.endswith("_total")]
    assert generated[0] >= 3
    answered = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["genforge_http_requests"].samples
        if s.name.endswith("_total")
    }
    assert answered[("/v1/completions", "200")] >= 1
    assert all(route.startswith("/v1/") or route in ("unmatched", "/health", "/metrics") for route, _ in answered)


# ------------------------------------------------------------------------ keys, limits, queue


class _FailingEngine:
    """An AsyncEngine whose streams break after their first output: a fault of the server."""

    def __init__(self, engine):
        self.inner = engine

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, model, request):
        stream = self.inner.generate(model, request)
        try:
            yield await stream.__anext__()
            raise RuntimeError("the device fell over")
        finally:
            await stream.aclose()


def test_a_server_fault_is_500_in_openai_shape(loaded):
    engine = _engine(loaded)
    with LiveServer(create_app(_FailingEngine(engine), tokenizers={MODEL: loaded[1]})) as live:
        with pytest.raises(openai.InternalServerError) as info:
            live.client().completions.create(model=MODEL, prompt="x", max_tokens=20, extra_body={"ignore_eos": True})
        assert _error(info, 500)["type"] == "server_error"
        body = {"model": MODEL, "prompt": "x", "max_tokens": 20, "ignore_eos": True, "stream": True}
        with httpx2.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200  # the first token went out before the fault
        assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        assert _wait_idle(engine).kv_blocks_used == 0


def test_api_keys_and_rate_limit(loaded):
    clock = [0.0]
    app = create_app(
        _engine(loaded),
        tokenizers={MODEL: loaded[1]},
        api_keys=["k1", "k2"],
        rate_limit=RateLimit(2, per_seconds=60),
        clock=lambda: clock[0],
    )
    with LiveServer(app) as live:
        with pytest.raises(openai.AuthenticationError) as info:
            live.client("wrong").models.list()
        assert _error(info, 401)["type"] == "authentication_error"
        good = live.client("k1")
        good.models.list()
        good.models.list()
        with pytest.raises(openai.RateLimitError) as info:
            good.models.list()
        _error(info, 429)
        assert int(info.value.response.headers["retry-after"]) == 30  # one request per 30 s refills
        live.client("k2").models.list()  # buckets are per key
        clock[0] += 30.0
        good.models.list()


def test_limits_building_blocks():
    from genforge.serve.limits import AdmissionQueue, KeyChecker, TokenBucketLimiter, parse_rate_limit

    assert parse_rate_limit("60/min").rate == pytest.approx(1.0)
    assert parse_rate_limit("5/s", burst=2).capacity == 2
    assert parse_rate_limit("120").per_seconds == 60.0  # a bare number is per minute
    for bad in ("fast", "10/fortnight", "0/s", "-3/min"):
        with pytest.raises(ValueError, match="rate limit"):
            parse_rate_limit(bad)
    clock = [0.0]
    bucket = TokenBucketLimiter(parse_rate_limit("2/s", burst=3), clock=lambda: clock[0])
    assert [bucket.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.acquire("a") == pytest.approx(0.5)  # empty: the next token comes in half a second
    clock[0] = 0.5
    assert bucket.acquire("a") == 0.0 and bucket.acquire("b") == 0.0
    keys = KeyChecker(["alpha", "beta"])
    assert keys.check("Bearer beta") == "beta" and keys.check("bearer  alpha ") == "alpha"
    assert keys.check("Bearer gamma") is None and keys.check("Basic alpha") is None and keys.check(None) is None
    queue = AdmissionQueue(3)
    assert queue.try_enter(2) and not queue.try_enter(2) and queue.try_enter(1)
    queue.leave(3)
    assert queue.in_flight == 0
    with pytest.raises(ValueError):
        AdmissionQueue(0)


def test_full_queue_is_429(loaded):
    app = create_app(_engine(loaded), tokenizers={MODEL: loaded[1]}, max_queue=2)
    with LiveServer(app) as live:
        client = live.client()
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=3)
        assert _error(info, 429)["code"] == "queue_full"
        stream = client.completions.create(
            model=MODEL, prompt="x", max_tokens=100, n=2, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        stream.close()
        deadline = time.monotonic() + 10
        while app.state.queue.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_timeout_is_408_and_frees_the_blocks(loaded):
    engine = _engine(loaded)
    app = create_app(engine, tokenizers={MODEL: loaded[1]}, request_timeout=0.05)
    with LiveServer(app) as live:
        with pytest.raises(openai.APIStatusError) as info:
            live.client().completions.create(model=MODEL, prompt="x", max_tokens=120, extra_body={"ignore_eos": True})
        assert _error(info, 408)["type"] == "timeout_error"
        assert _wait_idle(engine).kv_blocks_used == 0
        # Streamed: a 408 if the first token is late, else an error event in the stream, then [DONE].
        body = {"model": MODEL, "prompt": "x", "max_tokens": 120, "ignore_eos": True, "stream": True}
        with httpx2.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        if response.status_code == 200:
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "timeout_error"
        else:
            assert response.status_code == 408
        assert _wait_idle(engine).kv_blocks_used == 0


def test_client_disconnect_cancels_the_request(server):
    body = {"model": MODEL, "prompt": "cancel me", "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx2.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    stats = _wait_idle(server.engine)
    assert stats.kv_blocks_used == 0 and stats.running == 0
    # And the engine did not generate the remaining ~120 tokens for nobody.
    assert server.engine.stats(MODEL).generation_tokens_total < 10_000


def test_client_disconnect_cancels_a_non_streamed_request(loaded):
    engine = _engine(loaded)
    with LiveServer(create_app(engine, tokenizers={MODEL: loaded[1]})) as live:
        body = {"model": MODEL, "prompt": "wait for me", "max_tokens": 120, "ignore_eos": True}
        with pytest.raises(httpx2.TimeoutException):  # the client gives up and closes the connection
            httpx2.post(live.url + "/v1/completions", json=body, timeout=httpx2.Timeout(10, read=0.05))
        stats = _wait_idle(engine)
        assert stats.kv_blocks_used == 0 and stats.running == 0
        # A step takes milliseconds, so an abort that works stops well short of the 120 tokens asked for.
        assert stats.generation_tokens_total < 120


def test_graceful_shutdown_finishes_in_flight_requests(loaded):
    engine = _engine(loaded)
    live = LiveServer(create_app(engine, tokenizers={MODEL: loaded[1]})).__enter__()
    result = {}

    def call():
        stream = live.client().completions.create(
            model=MODEL, prompt="drain", max_tokens=60, stream=True, extra_body={"ignore_eos": True}
        )
        result["chunks"] = [c.choices[0] for c in stream if c.choices]

    caller = threading.Thread(target=call)
    caller.start()
    while engine.stats(MODEL).running == 0 and caller.is_alive():
        time.sleep(0.005)
    live.stop()  # SIGTERM-equivalent: uvicorn drains, then the lifespan shuts the engine down
    caller.join(timeout=30)
    assert result["chunks"][-1].finish_reason == "length"
    assert "".join(c.text for c in result["chunks"])
    assert engine.in_flight == 0
    # The lifespan shut the engine down: it takes no new requests.
    request = EngineRequest("late", loaded[1].encode("late"), SamplingParams(max_new_tokens=2))

    async def late():
        async for _ in engine.generate(MODEL, request):
            pass

    with pytest.raises(RuntimeError, match="shutting down"):
        asyncio.run(late())


# ------------------------------------------------------------------------------- embeddings


def test_embeddings_match_the_sentence_encoder(loaded):
    from genforge.encoder import SentenceEncoder
    from genforge.rag.index import EncoderEmbedder

    encoder = SentenceEncoder()
    rag_embedder = EncoderEmbedder(max_tokens=16)  # the RAG index's embedder, with a shorter window
    app = create_app(
        _engine(loaded), tokenizers={MODEL: loaded[1]}, embedding_models={"minilm": encoder, "rag": rag_embedder}
    )
    with LiveServer(app) as live:
        client = live.client()
        texts = ["a cat sat on the mat", "retrieval needs embeddings"]
        done = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
        expected = encoder.encode(texts)
        got = torch.tensor([d.embedding for d in done.data])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert done.usage.prompt_tokens == sum(len(ids) for ids in encoder.tokenizer.encode_batch(texts))
        floats = client.embeddings.create(model="minilm", input="one", encoding_format="float")
        assert len(floats.data[0].embedding) == encoder.dimension
        long_text = ["a sentence long enough to be cut at sixteen tokens by the retrieval embedder " * 2]
        via_rag = client.embeddings.create(model="rag", input=long_text, encoding_format="float")
        assert via_rag.data[0].embedding == pytest.approx(rag_embedder.embed(long_text)[0].tolist(), abs=1e-6)
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model=MODEL, input="x")
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="minilm", input="x", dimensions=7)


# ------------------------------------------------------------------------------------ soak


@pytest.mark.slow
def test_soak_with_cancellations_leaves_every_block_free(loaded):
    """1000 requests, concurrency up to 64, every fifth cancelled mid-stream."""
    engine = _engine(loaded)
    app = create_app(engine, tokenizers={MODEL: loaded[1]}, max_queue=None)
    words = _corpus().split()
    errors: list[str] = []
    finished = {"ok": 0, "cancelled": 0}

    async def one(client, i, limit):
        async with limit:
            prompt = " ".join(words[(i * 7) % 400 : (i * 7) % 400 + 2 + i % 10])
            cancel = i % 5 == 0
            # A request to be cancelled asks for far more than it reads, so it is still running when dropped.
            body = {
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": 60 if cancel else 4 + i % 8,
                "temperature": 0 if i % 2 else 0.8,
                "stream": True,
                "seed": i,
                "ignore_eos": cancel,
            }
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {await response.aread()!r}")
                    return
                seen = 0
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        finished["ok"] += 1
                        return
                    seen += 1
                    if cancel and seen == 1:
                        finished["cancelled"] += 1
                        return  # leaving the block closes the connection mid-stream

    async def main(url):
        limit = asyncio.Semaphore(64)
        async with httpx2.AsyncClient(base_url=url, timeout=60, limits=httpx2.Limits(max_connections=64)) as client:
            await asyncio.gather(*(one(client, i, limit) for i in range(1000)))

    with LiveServer(app) as live:
        started = time.monotonic()
        asyncio.run(main(live.url))
        elapsed = time.monotonic() - started
        stats = _wait_idle(engine)
    assert not errors, errors[:5]
    assert finished == {"ok": 800, "cancelled": 200}
    assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0
    assert app.state.queue.in_flight == 0
    # Had the cancelled requests run on, they alone would have generated 200 x 60 tokens.
    assert stats.generation_tokens_total < 800 * 11 + 200 * 60 // 2
    print(f"soak: 1000 requests in {elapsed:.1f} s")


# ------------------------------------------------------------------------- bench and CLI


def test_bench_statistics_on_known_records():
    from genforge.serve.bench import RequestRecord, poisson_offsets, random_workload, summarize

    records = [
        RequestRecord(prompt_tokens=10, output_tokens=5, ttft=0.1, itl=[0.02, 0.03], e2e=0.5, ok=True),
        RequestRecord(prompt_tokens=20, output_tokens=1, ttft=0.3, itl=[], e2e=0.3, ok=True),
        RequestRecord(error="HTTP 500"),
    ]
    summary = summarize(records, duration=2.0)
    assert summary["completed"] == 2 and summary["failed"] == 1
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["output_tokens_per_s"] == pytest.approx(3.0)
    assert summary["tpot"]["mean_ms"] == pytest.approx(100.0)  # (0.5 - 0.1) / 4; one token has no TPOT
    assert summary["ttft"]["p50_ms"] == pytest.approx(200.0)
    assert summary["itl"]["p50_ms"] == pytest.approx(25.0)
    assert summary["e2e"]["p99_ms"] == pytest.approx(300 + 0.99 * 200)  # linear interpolation
    traced = RequestRecord.from_token_times(1.0, [1.1, 1.12, 1.15, 1.5], prompt_tokens=7)
    assert traced.ttft == pytest.approx(0.1) and traced.e2e == pytest.approx(0.5)
    assert traced.itl == pytest.approx([0.02, 0.03, 0.35]) and traced.tpot == pytest.approx(0.4 / 3)
    assert not RequestRecord.from_token_times(1.0, []).ok
    offsets = poisson_offsets(4000, rate=20.0, seed=1)
    gaps = torch.diff(torch.tensor([0.0, *offsets]))
    assert gaps.mean().item() == pytest.approx(1 / 20, rel=0.05) and (gaps >= 0).all()
    assert poisson_offsets(3, float("inf")) == [0.0, 0.0, 0.0]
    work = random_workload(200, input_len=10, output_len=20, range_ratio=0.5, seed=0)
    assert {len(w.prompt.split()) for w in work} <= set(range(5, 16))
    assert min(w.max_tokens for w in work) >= 10 and max(w.max_tokens for w in work) <= 30


@pytest.mark.slow
def test_genforge_serve_command_and_bench_serve(model_dir, tmp_path, monkeypatch):
    """`genforge serve` in a subprocess (API key, named model), `genforge bench serve` against it,
    then SIGTERM mid-request: the request finishes and the server exits."""
    import os
    import signal
    import subprocess
    import sys

    from genforge.cli import main

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "GENFORGE_API_KEYS": "secret"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "genforge.cli",
            "serve",
            "--model",
            f"served={model_dir}",
            "--port",
            str(port),
            "--max-num-seqs",
            "16",
            "--block-size",
            "8",
            "--resident-kv-mib",
            "4",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx2.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["served"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        out = tmp_path / "bench"
        monkeypatch.setenv("GENFORGE_API_KEYS", "secret")  # bench serve reads the key from there too
        code = main(
            [
                "bench",
                "serve",
                "--url",
                url,
                "--rates",
                "20,inf",
                "--num-requests",
                "12",
                "--input-len",
                "8",
                "--output-len",
                "6",
                "--out",
                str(out),
            ]
        )
        assert code == 0
        report = json.loads((out / "serve_bench.json").read_text())
        assert report["settings"]["model"] == "served"
        for result in report["results"]:
            assert result["completed"] == 12 and result["failed"] == 0
            # ignore_eos: every request generated exactly its max_tokens, all between 3 and 9.
            assert 12 * 3 <= result["total_output_tokens"] <= 12 * 9
            assert result["ttft"]["p50_ms"] > 0 and result["output_tokens_per_s"] > 0
        assert "| served @ 20/s |" in (out / "serve_bench.md").read_text()
        # SIGTERM while a request streams: the request still finishes, then the process exits.
        stream = client.completions.create(
            model="served", prompt="drain", max_tokens=80, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = [next(iter(stream))]
        process.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        # uvicorn re-raises the signal it caught once it has shut down cleanly.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_echo_scores_the_prompt(client, loaded):
    """echo + logprobs + max_tokens 0: the prompt's own logprobs (how lm-evaluation-harness scores)."""
    model, tokenizer = loaded
    prompt = "import json as j"
    ids = tokenizer.encode(prompt)
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = done.choices[0]
    assert choice.text == prompt and done.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(prompt) - len(lp.tokens[-1])
    # With generation: the prompt, then the continuation, streamed the same way.
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=0, temperature=0)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert whole.choices[0].text == prompt + plain.choices[0].text
    assert len(whole.choices[0].logprobs.tokens) == len(ids) + 4
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=0, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[0].choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)
    assert _error(info, 400)["param"] == "max_tokens"


def test_serve_refuses_a_negative_resident_memory_before_loading(model_dir, capsys):
    from genforge.cli import main

    assert main(["serve", "--model", str(model_dir), "--resident-kv-mib", "-1"]) == 2
    assert "--resident-kv-mib must be >= 0" in capsys.readouterr().err
