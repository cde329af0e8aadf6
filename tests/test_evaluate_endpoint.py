"""Evaluating a model behind an OpenAI-compatible endpoint: the harness over genforge's own
server gives the numbers the harness gives on the same model in-process, and an endpoint
judge returns the verdicts its replies name."""

import copy
import json

import pytest
from live_server import LiveServer

from genforge.cli import main
from genforge.evaluate import MetricError
from genforge.evaluate.endpoint import EndpointLanguageModel, endpoint_judge
from genforge.evaluate.harness import LocalLanguageModel, evaluate_task
from genforge.evaluate.judge import judge_all
from genforge.serve.api import create_app
from genforge.serve.engine import AsyncEngine, Engine

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny"
CONTEXT = 256  # the bpe_model fixture's context


@pytest.fixture(scope="module")
def served(bpe_model, bpe_tokenizer):
    engine = AsyncEngine({MODEL: Engine(bpe_model, bpe_tokenizer, block_size=8)})
    with LiveServer(create_app(engine, tokenizers={MODEL: bpe_tokenizer})) as live:
        yield live


@pytest.fixture(scope="module")
def remote(served, bpe_tokenizer):
    return EndpointLanguageModel(served.url + "/v1", MODEL, bpe_tokenizer, max_length=CONTEXT, concurrency=4)


@pytest.fixture(scope="module")
def local(bpe_model, bpe_tokenizer):
    return LocalLanguageModel(bpe_model, bpe_tokenizer)


def test_loglikelihoods_over_http_equal_the_local_ones(remote, local):
    requests = [("import json\n", "def dumps(obj):"), ("The encoder ", "is fast"), ("x", " = 1"), ("", "return")]
    here, there = local.loglikelihood(requests), remote.loglikelihood(requests)
    assert [ll for ll, _ in there] == pytest.approx([ll for ll, _ in here], abs=1e-3)
    assert [greedy for _, greedy in there] == [greedy for _, greedy in here]
    texts = ["def loads(s, *, cls=None):\n    return s", '{"a": [1, 2, 3]}']
    assert remote.loglikelihood_rolling(texts) == pytest.approx(local.loglikelihood_rolling(texts), abs=1e-3)


def test_long_texts_are_scored_in_windows(served, bpe_tokenizer, local):
    text = open(json.__file__, encoding="utf-8").read()[:1500]
    assert len(bpe_tokenizer.encode(text, add_special_tokens=False)) > CONTEXT
    narrow = EndpointLanguageModel(served.url + "/v1", MODEL, bpe_tokenizer, max_length=CONTEXT)
    total = narrow.loglikelihood_rolling([text])[0]
    # Every token is scored exactly once: the total is finite and about as likely per token as
    # a short text scored whole (a random model gives every token roughly log(1/vocab)).
    tokens = len(bpe_tokenizer.encode(text, add_special_tokens=False))
    short = local.loglikelihood_rolling([text[:200]])[0] / len(
        bpe_tokenizer.encode(text[:200], add_special_tokens=False)
    )
    assert total / tokens == pytest.approx(short, rel=0.2)


def test_harness_tasks_give_the_same_metrics_over_http(tmp_path, remote, bpe_model, bpe_tokenizer):
    docs = [{"q": f"item {i}", "choices": ["true", "false", "null"], "label": i % 3, "answer": "0"} for i in range(6)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    base = (
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\ntest_split: test\n"
        "doc_to_text: 'Q: {{q}}\\nA:'\n"
    )
    tasks = {
        "mc": base + "task: mc\noutput_type: multiple_choice\ndoc_to_target: label\ndoc_to_choice: choices\n",
        "gen": base + "task: gen\noutput_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n",
    }
    for name, yaml_text in tasks.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml_text)
        here = evaluate_task(bpe_model, bpe_tokenizer, path)
        there = evaluate_task(remote, None, path)
        assert there.metrics == pytest.approx(here.metrics, abs=1e-6), name
        if name == "mc":
            for a, b in zip(there.samples, here.samples):
                assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-3)
        else:
            assert [s["output"] for s in there.samples] == [s["output"] for s in here.samples]
        assert there.settings["model"]["endpoint"].endswith("/v1")


def test_harness_refuses_what_it_cannot_evaluate(tmp_path):
    with pytest.raises(MetricError, match="loglikelihood_rolling and generate_until"):
        from genforge.evaluate.harness import _language_model

        _language_model(object(), None, 8)


def test_an_endpoint_that_does_not_echo_is_reported(served, bpe_tokenizer, monkeypatch):
    lm = EndpointLanguageModel(served.url + "/v1", MODEL, bpe_tokenizer, max_length=CONTEXT)

    class NoEcho:
        class choices_item:
            logprobs = None

        choices = [choices_item]

    monkeypatch.setattr(lm.client.completions, "create", lambda **kwargs: NoEcho)
    with pytest.raises(MetricError, match="did not echo"):
        lm.loglikelihood([("a", "b")])


class AlwaysA:
    """Stands in for AsyncEngine: every request gets the reply "[[A]]"."""

    models = [MODEL]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.reply = tokenizer.encode("[[A]]", add_special_tokens=False)

    def engine(self, model):
        return type("E", (), {"max_model_len": 4096, "eos_token_ids": frozenset({self.tokenizer.eos_token_id})})

    async def generate(self, model, request):
        from genforge.serve.engine import RequestOutput

        yield RequestOutput(
            request.request_id,
            self.reply,
            self.tokenizer.decode(self.reply),
            None,
            True,
            "stop",
            len(request.prompt_token_ids),
            len(self.reply),
            0,
            0.0,
            0.0,
        )

    def abort(self, model, request_id):
        pass

    def stats(self, model):
        from genforge.serve.engine import EngineStats

        return EngineStats(0, 0, 1, 0, 0, 0, 0, 0, 0)

    async def shutdown(self, drain_timeout=30.0):
        pass


@pytest.fixture(scope="module")
def always_a(bpe_tokenizer):
    """A chat endpoint whose model always answers "[[A]]"."""
    tokenizer = copy.copy(bpe_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with LiveServer(create_app(AlwaysA(tokenizer), tokenizers={MODEL: tokenizer})) as live:
        yield live


def test_endpoint_judge_reads_the_verdicts_of_a_chat_endpoint(always_a):
    # The position swap turns every pair into a tie: what a judge with total position bias deserves.
    judge = endpoint_judge(always_a.url + "/v1", MODEL)
    assert judge("q", "one", "two") == "A"
    battles = judge_all(judge, ["q1", "q2"], {"m1": ["a", "b"], "m2": ["c", "d"]})
    assert [b.winner for b in battles.battles] == ["tie", "tie"] and battles.consistency == 0.0


def test_cli_judges_answers_through_an_endpoint(always_a, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps({"question": f"q{i}", "answers": {"m1": "a", "m2": "b", "m3": "c"}}) + "\n" for i in range(2)
        )
    )
    battles = tmp_path / "battles.jsonl"
    code = main(
        [
            "eval",
            "judge",
            "--answers",
            str(answers),
            "--endpoint",
            always_a.url + "/v1",
            "--judge-model",
            MODEL,
            "--battles",
            str(battles),
        ]
    )
    assert code == 0
    written = [json.loads(line) for line in battles.read_text().splitlines()]
    assert len(written) == 6 and {b["winner"] for b in written} == {"tie"}
    assert "| m1 |" in capsys.readouterr().out


def test_cli_runs_harness_tasks_against_an_endpoint(served, bpe_model, bpe_tokenizer, tmp_path, capsys):
    docs = [{"q": f"item {i}", "choices": ["true", "false"], "label": i % 2} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = tmp_path / "mc.yaml"
    task.write_text(
        "task: mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: 'Q: {{q}}\\nA:'\n"
        "doc_to_target: label\ndoc_to_choice: choices\n"
    )
    bpe_tokenizer.save(tmp_path / "tokenizer")
    assert (
        main(
            [
                "eval",
                "harness",
                "--endpoint",
                served.url + "/v1",
                "--served-model",
                MODEL,
                "--tokenizer",
                str(tmp_path / "tokenizer"),
                "--max-length",
                str(CONTEXT),
                "--tasks",
                str(task),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    remote = json.loads((tmp_path / "out" / "results.json").read_text())["mc"]["metrics"]
    assert remote == pytest.approx(evaluate_task(bpe_model, bpe_tokenizer, task).metrics, abs=1e-6)
    assert main(["eval", "harness", "--tasks", str(task)]) == 2  # neither --model nor --endpoint
    assert main(["eval", "harness", "--tasks", str(task), "--endpoint", served.url + "/v1"]) == 2  # no tokenizer
