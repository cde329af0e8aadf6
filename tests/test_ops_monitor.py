"""Monitoring in the server and on the command line: the live drift monitor's Prometheus
gauges through the real app (a planted script shift alerts, matching traffic does not), the
`genforge serve` flags of `genforge.ops`, `genforge monitor report` (HTML with embedded plots,
Markdown with PNGs beside it, JSON) and `genforge monitor ab` on outcome logs, its numbers
checked against `genforge.evaluate.stats` called directly."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from genforge.evaluate.stats import two_proportion_ztest, welch_t_test
from genforge.ops import monitor_cli
from genforge.ops.ab import ab_compare, ab_markdown
from genforge.ops.live_monitor import LiveMonitor
from genforge.ops.records import read_records
from genforge.ops.traffic import install_ops
from genforge.serve.api import create_app
from genforge.serve.engine import AsyncEngine, Engine

pytestmark = pytest.mark.usefixtures("one_thread")

ENGLISH = "how do I sort a list of numbers in python with a key function please".split()
RUSSIAN = "как отсортировать список чисел в питоне с ключевой функцией пожалуйста".split()


def _prompts(seed: int, n: int, words=ENGLISH) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 12)))) for _ in range(n)]


def _write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _gauges(text: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def build_app(bpe_tokenizer, bpe_model):
    def build(install=True, **ops):
        names = ("tiny", "tiny2")
        engine = AsyncEngine({n: Engine(bpe_model.eval(), bpe_tokenizer, block_size=8, max_num_seqs=16) for n in names})
        app = create_app(engine, tokenizers=dict.fromkeys(names, bpe_tokenizer))
        if install:
            install_ops(app, **ops)
        return app

    return build


@pytest.mark.parametrize("current_words, drifted", [(RUSSIAN, True), (ENGLISH, False)])
def test_live_monitor_gauges_alert_on_a_script_shift_and_stay_quiet_without_one(build_app, current_words, drifted):
    reference = [{"prompt": p} for p in _prompts(0, 60)]
    monitor = LiveMonitor(reference, window=40, every=40, min_window=40, permutations=99, background=False)
    app = build_app(monitor=monitor)
    with TestClient(app) as client:
        for prompt in _prompts(1, 40, current_words):
            assert (
                client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2}).status_code
                == 200
            )
        gauges = _gauges(client.get("/metrics").text)
    assert gauges[("genforge_drift_checks_total", ())] == 1
    assert (
        gauges[("genforge_drift_window_requests", ())] == 40 and gauges[("genforge_drift_reference_requests", ())] == 60
    )
    assert gauges[("genforge_drift_detected", ())] == float(drifted)
    script_p = gauges[("genforge_drift_p_value", (("feature", "prompt_script"), ("test", "chi2")))]
    assert (script_p < 1e-6) if drifted else (script_p == 1.0)
    assert gauges[("genforge_drift_alert", (("feature", "prompt_script"), ("test", "chi2")))] == float(drifted)
    # Reply features need them in the reference too: a prompt-only reference skips them.
    assert "reply_chars" in monitor.last_report.skipped


def test_live_monitor_takes_its_reference_from_the_first_requests_and_checks_in_the_background():
    monitor = LiveMonitor(window=30, every=30, permutations=99)
    for i, prompt in enumerate(_prompts(2, 30) + _prompts(3, 30, RUSSIAN)):
        monitor.observe({"id": f"cmpl-{i}", "prompt": prompt, "reply": "ok", "completion_tokens": 3})
    monitor.wait()
    assert len(monitor.reference) == 30 and monitor.last_report is not None and monitor.last_report.drifted
    monitor.observe_feedback({"id": "cmpl-59", "score": 1.0})
    assert monitor.recent[-1]["score"] == 1.0


def test_serve_flags_refuse_bad_routes_at_parse_time_and_install_what_is_asked(build_app, tmp_path, capsys):
    from genforge.serve import cli as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_commands(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", "m", "--route", "chat=v1"])
    assert "has no weight; expected VERSION:WEIGHT" in capsys.readouterr().err
    reference = _write(tmp_path / "reference.jsonl", [{"prompt": p} for p in _prompts(0, 10)])
    args = parser.parse_args(
        [
            "serve",
            "--model",
            "m",
            "--route",
            "chat=tiny:1",
            "--outcome-log",
            str(tmp_path / "log.jsonl"),
            "--monitor-reference",
            str(reference),
            "--monitor-window",
            "5",
            "--monitor-every",
            "5",
        ]
    )
    from genforge.ops.serving import install_from_args

    hub = install_from_args(build_app(install=False), args)
    assert hub.router.routes["chat"].versions == ("tiny",) and hub.monitor.reference_fixed
    assert len(hub.monitor.reference) == 10 and hub.outcome_log.path == tmp_path / "log.jsonl"
    nothing = parser.parse_args(["serve", "--model", "m"])
    assert install_from_args(build_app(install=False), nothing) is None
    unserved = parser.parse_args(["serve", "--model", "m", "--route", "chat=v9:1"])
    with pytest.raises(ValueError, match="'v9' is not a served model; served: tiny"):
        install_from_args(build_app(install=False), unserved)


def _monitor_parser():
    parser = argparse.ArgumentParser()
    monitor_cli.add_commands(parser.add_subparsers(dest="command"))
    return parser


def _run(argv) -> int:
    args = _monitor_parser().parse_args(["monitor", *argv])
    return args.func(args)


def _window(seed, n, words=ENGLISH, refusal_share=0.05):
    rng = np.random.default_rng(seed)
    out = []
    for prompt in _prompts(seed, n, words):
        refused = rng.random() < refusal_share
        reply = (
            "I'm sorry, I can't help with that." if refused else "Use sorted(items, key=len) " * int(rng.integers(1, 4))
        )
        out.append({"prompt": prompt, "reply": reply, "completion_tokens": len(reply) // 4, "guard_hit": False})
    return out


@pytest.mark.slow
def test_monitor_report_writes_html_markdown_and_json_with_the_verdict(tmp_path):
    reference = _write(tmp_path / "a.jsonl", _window(0, 80))
    current = _write(tmp_path / "b.jsonl", _window(1, 80, RUSSIAN, refusal_share=0.4))
    common = ["--reference", str(reference), "--current", str(current), "--embedder", "none", "--permutations", "99"]
    status = _run(
        ["report", *common, "--out", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json"), "--fail-on-drift"]
    )
    assert status == 1
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 9 and "drift detected" in page
    verdicts = {
        (t["feature"], t["test"]): t["alert_holm"] for t in json.loads((tmp_path / "r.json").read_text())["tests"]
    }
    assert verdicts[("prompt_script", "chi2")] and verdicts[("reply_refusal", "two_proportion")]
    assert not verdicts[("guard_hit", "two_proportion")]
    assert _run(["report", *common, "--out", str(tmp_path / "r.md")]) == 0  # no --fail-on-drift
    markdown = (tmp_path / "r.md").read_text()
    assert "| prompt_script | chi2 |" in markdown and "(r_files/prompt_words.png)" in markdown
    assert (tmp_path / "r_files" / "prompt_words.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=".html or .md"):
        _run(["report", *common, "--out", str(tmp_path / "r.pdf")])


@pytest.mark.slow
def test_monitor_report_without_drift_says_so(tmp_path):
    reference = _write(tmp_path / "a.jsonl", [{"prompt": r["prompt"]} for r in _window(0, 80)])
    current = _write(tmp_path / "b.jsonl", [{"prompt": r["prompt"]} for r in _window(5, 80)])
    args = ["--reference", str(reference), "--current", str(current), "--embedder", "none", "--permutations", "99"]
    assert _run(["report", *args, "--out", str(tmp_path / "r.html"), "--fail-on-drift"]) == 0
    assert "no drift detected" in (tmp_path / "r.html").read_text()


@pytest.mark.slow
def test_embedding_mmd_on_minilm_finds_a_topic_shift_that_keeps_length_and_script(tmp_path):
    """Same lengths, same script, another subject: only the embedding test can tell."""
    code = "python list sort function key lambda loop index error import module class".split()
    cooking = "recipe oven flour sugar butter bake minutes salt pepper onion garlic pan".split()
    reference = _write(tmp_path / "a.jsonl", [{"prompt": p} for p in _prompts(0, 40, code)])
    current = _write(tmp_path / "b.jsonl", [{"prompt": p} for p in _prompts(1, 40, cooking)])
    same = _write(tmp_path / "c.jsonl", [{"prompt": p} for p in _prompts(2, 40, code)])
    common = ["--reference", str(reference), "--permutations", "99", "--embedder", "minilm"]
    _run(
        [
            "report",
            *common,
            "--current",
            str(current),
            "--out",
            str(tmp_path / "r.md"),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    shifted = {
        t["feature"]: t for t in json.loads((tmp_path / "r.json").read_text())["tests"] if t["test"] in ("mmd", "ks")
    }
    assert shifted["prompt_embedding"]["p_value"] <= 0.01 and shifted["prompt_embedding"]["alert_holm"]
    assert shifted["prompt_words"]["p_value"] > 0.05  # the lengths did not move
    _run(
        ["report", *common, "--current", str(same), "--out", str(tmp_path / "s.md"), "--json", str(tmp_path / "s.json")]
    )
    unshifted = [t for t in json.loads((tmp_path / "s.json").read_text())["tests"] if t["test"] == "mmd"]
    assert unshifted[0]["p_value"] > 0.05


def _outcome_log(path, seed=0):
    """A synthetic log of a canary: v2 errs more (8% vs 2%) and is liked more (70% vs 50%)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(1200):
        version = "v2" if rng.random() < 0.3 else "v1"
        error = rng.random() < (0.08 if version == "v2" else 0.02)
        rid = f"cmpl-{i:x}"
        lines.append(
            {
                "type": "request",
                "id": rid,
                "route": "chat",
                "version": version,
                "error": bool(error),
                "status": 500 if error else 200,
                "latency_s": float(rng.gamma(2.0, 0.1)),
                "completion_tokens": int(rng.integers(10, 60)),
                "finish_reason": "stop",
            }
        )
        if not error and rng.random() < 0.5:
            liked = rng.random() < (0.7 if version == "v2" else 0.5)
            lines.append({"type": "feedback", "id": rid, "score": 1 if liked else 0})
    return _write(path, lines)


def test_ab_comparisons_are_the_evaluate_stats_tests_on_the_logged_outcomes(tmp_path):
    records = read_records(_outcome_log(tmp_path / "log.jsonl"))
    comparisons = {c.metric: c for c in ab_compare(records)}
    a = [r for r in records if r["version"] == "v1"]
    b = [r for r in records if r["version"] == "v2"]
    assert comparisons["error_rate"].baseline == "v1"  # the most requested
    expected = two_proportion_ztest(sum(r["error"] for r in a), len(a), sum(r["error"] for r in b), len(b))
    assert comparisons["error_rate"].result == expected and expected.significant()
    liked_a = [r["score"] for r in a if "score" in r]
    liked_b = [r["score"] for r in b if "score" in r]
    feedback = comparisons["feedback_positive_rate"].result
    assert feedback == two_proportion_ztest(int(sum(liked_a)), len(liked_a), int(sum(liked_b)), len(liked_b))
    assert feedback.significant() and feedback.effect > 0
    latency = welch_t_test([r["latency_s"] for r in a if not r["error"]], [r["latency_s"] for r in b if not r["error"]])
    assert comparisons["latency_s"].result == latency
    assert comparisons["truncation_rate"].result.p_value == 1.0  # every request stopped
    table = ab_markdown(list(comparisons.values()))
    assert "| chat | v1 | v2 | error_rate |" in table and "**significant**" in table
    with pytest.raises(ValueError, match="no routed requests for the route 'other'"):
        ab_compare(records, route="other")
    with pytest.raises(ValueError, match="versions: "):
        ab_compare(records, baseline="v7")


def test_monitor_ab_command_on_a_log_the_server_wrote(build_app, tmp_path, capsys):
    log = tmp_path / "outcomes.jsonl"
    app = build_app(routes=["chat=tiny:0.5,tiny2:0.5"], outcome_log=log)
    with TestClient(app) as client:
        for i in range(16):
            body = {"model": "chat", "prompt": "def", "max_tokens": 2 + i % 3, "user": f"u{i}"}
            answer = client.post("/v1/completions", json=body)
            assert client.post("/v1/feedback", json={"id": answer.json()["id"], "score": i % 2}).status_code == 200
    assert _run(["ab", "--log", str(log), "--json", str(tmp_path / "ab.json")]) == 0
    table = capsys.readouterr().out
    comparisons = json.loads((tmp_path / "ab.json").read_text())
    assert {c["metric"] for c in comparisons} == {
        "error_rate",
        "feedback_positive_rate",
        "latency_s",
        "completion_tokens",
        "truncation_rate",
    }
    served = read_records(log)
    assert len(served) == 16 and all("score" in r for r in served)
    counts = {v: sum(r["version"] == v for r in served) for v in ("tiny", "tiny2")}
    baseline = comparisons[0]["baseline"]
    assert counts[baseline] >= 8 and comparisons[0]["n_baseline"] == counts[baseline]
    assert "| chat |" in table and "feedback_positive_rate" in table
