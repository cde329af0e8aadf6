"""Canary/A-B routing in the server (`genforge.ops.routing`): the split by weight over 2,000
requests (a binomial test on the counts), exact stickiness per user and per API key, the
response's model and headers, per-version Prometheus metrics, the JSONL outcome log and
``POST /v1/feedback``, and the `--route` specs refused with what is accepted.

Requests go through the real app and engine in process (Starlette's TestClient), serving one
tiny random Llama under two names, ``v1`` and ``v2``.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import binomtest

from genforge.ops.routing import Route, Router, RouteSpecError, parse_route, parse_routes
from genforge.ops.traffic import ROUTE_HEADER, VERSION_HEADER, install_ops
from genforge.serve.api import create_app
from genforge.serve.engine import AsyncEngine, Engine
from genforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def served(bpe_tokenizer, bpe_model):
    """An app factory: the tiny model served as v1 and v2 (and v3), with ops installed."""
    tokenizer = Tokenizer(
        bpe_tokenizer.backend, {"eos_token": "<eos>", "bos_token": "<bos>", "chat_template": CHAT_TEMPLATE}
    )
    model = bpe_model.eval()

    def build(api_keys=None, **ops):
        engines = {name: Engine(model, tokenizer, block_size=8, max_num_seqs=16) for name in ("v1", "v2", "v3")}
        app = create_app(AsyncEngine(engines), tokenizers=dict.fromkeys(engines, tokenizer), api_keys=api_keys)
        hub = install_ops(app, **ops)
        return app, hub

    return build


def _concurrently(app, bodies, headers=(), batch=64):
    """POST each body to /v1/completions through the app in process, ``batch`` at a time (the
    engine batches them, which is what makes 2,000 requests take seconds)."""
    import asyncio

    import httpx

    headers = list(headers) or [{}] * len(bodies)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = []
            for start in range(0, len(bodies), batch):
                responses += await asyncio.gather(
                    *(
                        client.post("/v1/completions", json=body, headers=header)
                        for body, header in zip(bodies[start : start + batch], headers[start : start + batch])
                    )
                )
            return responses

    return asyncio.run(main())


def _complete(client, model="chat", headers=None, **body):
    body = {"model": model, "prompt": "def f", "max_tokens": 1, **body}
    return client.post("/v1/completions", json=body, headers=headers or {})


@pytest.mark.slow
def test_weights_split_traffic_within_binomial_tolerance_over_2000_requests(served):
    app, _ = served(routes=["chat=v1:0.9,v2:0.1"], seed=1)
    counts = {"v1": 0, "v2": 0}
    for response in _concurrently(app, [{"model": "chat", "prompt": "def f", "max_tokens": 1}] * 2000):
        assert response.status_code == 200
        version = response.headers[VERSION_HEADER]
        assert response.json()["model"] == version and response.headers[ROUTE_HEADER] == "chat"
        counts[version] += 1
    # Two-sided exact binomial test of the canary's share against its weight.
    assert binomtest(counts["v2"], 2000, 0.1).pvalue > 0.001, counts


def test_users_split_by_weight_and_ramping_the_canary_only_moves_users_onto_it():
    users = [f"user-{i}" for i in range(2000)]
    before = Router({"chat": parse_route("chat=v1:0.9,v2:0.1")})
    placed = {u: before.assign("chat", user=u).version for u in users}
    assert binomtest(sum(v == "v2" for v in placed.values()), 2000, 0.1).pvalue > 0.001
    after = Router({"chat": parse_route("chat=v1:0.5,v2:0.5")})
    moved = {u: after.assign("chat", user=u).version for u in users}
    assert all(moved[u] == "v2" for u in users if placed[u] == "v2")
    assert binomtest(sum(v == "v2" for v in moved.values()), 2000, 0.5).pvalue > 0.001
    # Another salt is another experiment: users are re-drawn.
    salted = Router({"chat": parse_route("chat=v1:0.5,v2:0.5")}, salt="exp-2")
    assert sum(salted.assign("chat", user=u).version != moved[u] for u in users) > 800


def test_stickiness_is_exact_per_user_and_per_key_across_restarts(served):
    users = [f"u{i}" for i in range(40)]
    bodies = [{"model": "chat", "prompt": "x", "max_tokens": 1, "user": u} for u in users for _ in range(3)]
    seen = []
    for restart in range(2):  # a new app is a restarted server: no state carries over
        app, _ = served(routes=["chat=v1:0.5,v2:0.5"], seed=restart)
        seen.append([r.headers[VERSION_HEADER] for r in _concurrently(app, bodies)])
    assert seen[0] == seen[1]
    by_user = {}
    for body, version in zip(bodies, seen[0]):
        by_user.setdefault(body["user"], set()).add(version)
    assert all(len(versions) == 1 for versions in by_user.values())
    assert {v for (v,) in by_user.values()} == {"v1", "v2"}
    # Keyed: the server checks keys, so each key is an identity.
    keys = [f"key-{i}" for i in range(12)]
    app, _ = served(api_keys=keys, routes=["chat=v1:0.5,v2:0.5"])
    headers = [{"Authorization": f"Bearer {k}"} for k in keys for _ in range(3)]
    answers = _concurrently(app, [{"model": "chat", "prompt": "x", "max_tokens": 1}] * len(headers), headers)
    router = Router({"chat": parse_route("chat=v1:0.5,v2:0.5")})
    for header, response in zip(headers, answers):
        key = header["Authorization"].split()[1]
        assert response.headers[VERSION_HEADER] == router.assign("chat", key=key).version


def test_random_placement_without_identity_and_keys_ignored_when_the_server_checks_none(served):
    app, _ = served(routes=["chat=v1:0.5,v2:0.5"], seed=3)
    same_placeholder = [{"Authorization": "Bearer none"}] * 60
    answers = _concurrently(app, [{"model": "chat", "prompt": "x", "max_tokens": 1}] * 60, same_placeholder)
    versions = [r.headers[VERSION_HEADER] for r in answers]
    assert 10 < versions.count("v2") < 50  # random, not all in the placeholder key's slice


def test_metrics_log_and_feedback(served, tmp_path):
    log = tmp_path / "outcomes.jsonl"
    app, _ = served(routes=["chat=v1:0.5,v2:0.5"], outcome_log=log, log_text=True, seed=0)
    with TestClient(app) as client:
        plain = _complete(client, user="alice", max_tokens=4)
        streamed = client.post(
            "/v1/chat/completions",
            json={
                "model": "chat",
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 3,
                "stream": True,
                "user": "bob",
            },
        )
        direct = _complete(client, model="v3", max_tokens=2)
        failed = _complete(client, user="carol", max_tokens=-1)
        assert plain.status_code == streamed.status_code == direct.status_code == 200 and failed.status_code == 400
        assert ROUTE_HEADER not in direct.headers and direct.json()["model"] == "v3"
        response_id = plain.json()["id"]
        ok = client.post("/v1/feedback", json={"id": response_id, "score": 1, "comment": "good"})
        assert ok.status_code == 200 and ok.json()["version"] == plain.headers[VERSION_HEADER]
        unknown = client.post("/v1/feedback", json={"id": "chatcmpl-0", "score": 1})
        bad_score = client.post("/v1/feedback", json={"id": response_id, "score": "great"})
        assert unknown.status_code == 404 and "remembers" in unknown.json()["error"]["message"]
        assert bad_score.status_code == 400 and bad_score.json()["error"]["param"] == "score"
        metrics = client.get("/metrics").text
    records = [json.loads(line) for line in log.read_text().splitlines()]
    requests = [r for r in records if r["type"] == "request"]
    assert len(requests) == 4
    first, chat, plain_v3, error = requests
    assert first["id"] == response_id and first["route"] == "chat" and first["assignment"] == "user"
    assert first["version"] == plain.headers[VERSION_HEADER] and len(first["user_hash"]) == 16
    assert first["completion_tokens"] == plain.json()["usage"]["completion_tokens"]
    assert first["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    assert first["reply"] == plain.json()["choices"][0]["text"] and first["prompt"] == "def f"
    assert first["finish_reason"] == plain.json()["choices"][0]["finish_reason"]
    streamed_text = "".join(
        (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    )
    assert chat["stream"] and chat["prompt"] == "hello" and chat["reply"] == streamed_text
    assert 1 <= chat["completion_tokens"] <= 3
    assert plain_v3["route"] is None and plain_v3["version"] == "v3"
    assert error["status"] == 400 and error["error"] and error["route"] == "chat"
    (feedback,) = [r for r in records if r["type"] == "feedback"]
    assert feedback == {**feedback, "id": response_id, "score": 1.0, "comment": "good", "version": first["version"]}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    v_first, v_chat = first["version"], chat["version"]
    count = samples[("genforge_route_request_latency_seconds_count", (("route", "chat"), ("version", v_first)))]
    assert count >= 1
    tokens = samples[("genforge_route_tokens_total", (("kind", "completion"), ("route", "chat"), ("version", v_chat)))]
    assert tokens >= chat["completion_tokens"]
    assert samples[("genforge_route_errors_total", (("route", "chat"), ("version", error["version"])))] == 1
    assert samples[("genforge_route_feedback_total", (("route", "chat"), ("version", v_first)))] == 1


@pytest.mark.parametrize(
    "spec, says",
    [
        ("chat", "NAME=VERSION:WEIGHT"),
        ("chat=v1,v2:0.5", "has no weight"),
        ("chat=v1:abc", "not a number"),
        ("chat=v1:-0.1,v2:1", ">= 0"),
        ("chat=v1:0,v2:0", "every weight is 0"),
        ("chat=v1:1,v1:1", "listed twice"),
        ("chat=v1:0.5,nope:0.5", "'nope' is not a served model; served: v1, v2"),
        ("v1=v1:0.5,v2:0.5", "already the name of a served model"),
        ("chat=v1:nan", "finite"),
    ],
)
def test_bad_route_specs_are_refused_saying_what_is_accepted(spec, says):
    with pytest.raises(RouteSpecError, match=None) as info:
        parse_route(spec, ["v1", "v2"])
    assert says in str(info.value)


def test_weights_are_normalised_and_adapters_can_be_versions():
    route = parse_route("chat=base:lora-a:9,base:1", ["base", "base:lora-a"])
    assert route == Route("chat", ("base:lora-a", "base"), (0.9, 0.1))
    assert parse_route("chat=a:0,b:2", ["a", "b"]).pick(0.0) == "b"  # zero weight: no traffic
    with pytest.raises(RouteSpecError, match="given twice"):
        parse_routes(["chat=a:1", "chat=b:1"], ["a", "b"])


def test_install_refuses_routes_to_models_not_served(served):
    with pytest.raises(RouteSpecError, match="served: v1, v2, v3"):
        served(routes=["chat=v1:0.5,v9:0.5"])
