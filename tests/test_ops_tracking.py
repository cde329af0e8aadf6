"""genforge.ops.tracking: `--track` makes each training or evaluation command one MLflow run in a
local store (parameters, per-step metric histories, artifacts, tags), `--resume` continues the
same run, and without MLflow installed `--track` is one line naming the extra, before any work."""

from __future__ import annotations

import hashlib
import json
import re
import sys

import pytest
from finetune_shared import arithmetic_records, tiny_chat_model_dir
from mlflow import MlflowClient

from genforge.align.cli import ALIGN_COMMANDS
from genforge.cli import main
from genforge.ops.hooks import metric_listener, publish_metrics
from genforge.ops.lineage import git_commit, read_run_record
from genforge.ops.tracking import INSTALL_HINT, TRACKING_FILE, flatten_params, metric_values


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module: creating its tables takes MLflow ~5 s."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def _run_of(run_dir, store):
    pointer = json.loads((run_dir / TRACKING_FILE).read_text())
    assert pointer["tracking_uri"] == store
    return MlflowClient(tracking_uri=store).get_run(pointer["run_id"])


def _artifacts(client, run_id, path=None) -> set[str]:
    return {entry.path for entry in client.list_artifacts(run_id, path)}


@pytest.mark.slow
def test_pretrain_is_one_tracked_run_and_resume_continues_it(text_model_dir, store, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("the key value cache keeps past keys and values so decoding is fast. " * 40)
    run_dir = tmp_path / "run"
    base = ["pretrain", "--model", str(text_model_dir), "--text", str(tmp_path / "corpus.txt"), "--out", str(run_dir)]
    base += ["--seq-len", "16", "--batch-size", "2", "--warmup", "1", "--eval-every", "2", "--save-every", "2"]
    base += ["--val-fraction", "0.2", "--lr", "1e-3", "--track", store, "--experiment", "pretrain-test"]
    assert main(base + ["--steps", "2"]) == 0
    run = _run_of(run_dir, store)
    client = MlflowClient(tracking_uri=store)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "pretrain-test"
    params = run.data.params
    assert params["steps"] == "2" and params["seq_len"] == "16" and params["lr"] == "0.001"
    assert params["model"] == str(text_model_dir) and "track" not in params and "func" not in params
    assert run.data.tags["genforge.version"] == "0.1.0" and run.data.tags["genforge.command"] == "genforge pretrain"
    if git_commit() is not None:
        assert run.data.tags["mlflow.source.git.commit"] == git_commit()
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2]
    recorded = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in losses] == pytest.approx([r["loss"] for r in recorded if "loss" in r])
    for name in ("lr", "tokens_per_s", "grad_norm"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 2
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [2]
    artifacts = _artifacts(client, run.info.run_id)
    assert {"loss_curve.png", "metrics.jsonl", "genforge_run.json", "model"} <= artifacts
    assert "checkpoints" not in artifacts and TRACKING_FILE not in artifacts
    assert "model/model.safetensors" in _artifacts(client, run.info.run_id, "model")
    assert read_run_record(run_dir)["mlflow"]["run_id"] == run.info.run_id

    # --resume with a bare --track continues the same MLflow run in the store it recorded
    resumed = [a for a in base if a != store] + ["--steps", "4", "--resume"]
    assert main(resumed) == 0
    again = _run_of(run_dir, store)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [2, 4]
    assert again.data.params["steps"] == "2"  # MLflow keeps a parameter's first value ...
    assert json.loads(again.data.tags["genforge.resumed_flags"])["steps"] == "4"  # ... the change is a tag
    assert len(client.search_runs([run.info.experiment_id])) == 1
    capsys.readouterr()
    # resuming into another store than the run's is refused before training
    assert main(resumed[:-3] + ["--track", f"sqlite:///{tmp_path / 'other.db'}", "--steps", "6", "--resume"]) == 2
    assert "this run was tracked in" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_logs_the_adapter_and_records_its_data_hash(store, tmp_path_factory, tmp_path):
    model_dir = tiny_chat_model_dir(tmp_path_factory.mktemp("base"))
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in arithmetic_records(40)))
    out = tmp_path / "sft"
    argv = ["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", "2"]
    argv += ["--batch-size", "4", "--seq-len", "48", "--rank", "4", "--track", store, "--experiment", "sft"]
    assert main(argv) == 0
    run = _run_of(out, store)
    client = MlflowClient(tracking_uri=store)
    assert run.data.params["method"] == "lora" and run.data.params["data"] == json.dumps([str(data)])
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2
    assert {"adapter", "finetune.json", "loss_curve.png"} <= _artifacts(client, run.info.run_id)
    assert "adapter/adapter_config.json" in _artifacts(client, run.info.run_id, "adapter")
    (entry,) = read_run_record(out)["data"]
    assert entry["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest() and entry["flag"] == "data"


@pytest.mark.slow
def test_an_alignment_command_logs_its_own_metrics(store, tmp_path_factory, tmp_path):
    model_dir = tiny_chat_model_dir(tmp_path_factory.mktemp("base"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)}) + "\n"
            for a in range(10)
        )
    )
    out = tmp_path / "dpo"
    argv = ["align", "dpo", "--model", str(model_dir), "--data", str(pairs), "--out", str(out), "--steps", "2"]
    assert main(argv + ["--batch-size", "4", "--rank", "4", "--eval-fraction", "0.2", "--track", store]) == 0
    run = _run_of(out, store)
    client = MlflowClient(tracking_uri=store)
    recorded = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    own = [name for name in metric_values(recorded) if name not in ("loss", "lr", "grad_norm", "tokens")]
    assert own, recorded  # the method's metrics (rewards, margins) go through the same seam
    for name in own[:3]:
        assert len(client.get_metric_history(run.info.run_id, name)) == 2
    assert run.data.params["loss"] == "dpo" and "adapter" in _artifacts(client, run.info.run_id)


@pytest.mark.slow
def test_grpo_its_own_loop_publishes_through_the_same_seam(store, tmp_path_factory, tmp_path):
    model_dir = tiny_chat_model_dir(tmp_path_factory.mktemp("base"))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(3)))
    out = tmp_path / "grpo"
    argv = ["align", "grpo", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", "2"]
    argv += ["--reward", "exact_match:answer", "--prompts-per-step", "2", "--num-generations", "2"]
    assert main(argv + ["--max-new-tokens", "3", "--beta", "0.04", "--track", store]) == 0
    run = _run_of(out, store)
    client = MlflowClient(tracking_uri=store)
    for name in ("reward", "kl", "completions/mean_length"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2]
    assert {"adapter", "grpo.json", "genforge_run.json"} <= _artifacts(client, run.info.run_id)


def test_eval_is_one_run_of_its_results_and_a_failure_is_marked(store, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("0\n1\n0\n1\n1\n0\n")
    (tmp_path / "b.txt").write_text("1\n1\n1\n1\n0\n1\n")
    argv = ["eval", "ab", "--a", str(tmp_path / "a.txt"), "--b", str(tmp_path / "b.txt"), "--track", store]
    assert main(argv + ["--experiment", "evals"]) == 0
    printed = json.loads(capsys.readouterr().out)
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("evals")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["p_value"] == pytest.approx(printed["p_value"])
    assert run.data.metrics["effect_b_minus_a"] == pytest.approx(printed["effect_b_minus_a"])
    assert run.data.params["a"] == str(tmp_path / "a.txt") and run.info.run_name == "eval-ab"
    assert main(["eval", "ab", "--a", str(tmp_path / "missing.txt"), "--b", str(tmp_path / "b.txt")] + argv[-2:]) == 2
    failed = [r for r in client.search_runs([client.get_experiment_by_name("genforge").experiment_id])]
    assert [r.info.status for r in failed if r.info.run_name == "eval-ab"] == ["FAILED"]


def test_without_mlflow_track_is_one_line_before_any_work(monkeypatch, text_model_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    (tmp_path / "corpus.txt").write_text("some text " * 50)
    argv = ["pretrain", "--model", str(text_model_dir), "--text", str(tmp_path / "corpus.txt")]
    assert main(argv + ["--out", str(tmp_path / "run"), "--steps", "1", "--track"]) == 2
    err = capsys.readouterr().err
    assert INSTALL_HINT in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    (tmp_path / "a.txt").write_text("1\n0\n")
    assert main(["eval", "ab", "--a", str(tmp_path / "a.txt"), "--b", str(tmp_path / "a.txt"), "--track"]) == 2
    captured = capsys.readouterr()
    assert INSTALL_HINT in captured.err and captured.out == ""
    # the registry in a folder needs no MLflow; one in MLflow says what to install
    from factories import tiny_model

    from genforge.checkpoint import save_model
    from genforge.ops.registry import open_registry

    folder = open_registry(str(tmp_path / "registry"))
    folder.register("tiny", save_model(tiny_model(), tmp_path / "model"), aliases=["champion"])
    assert (folder.fetch("tiny", alias="champion").path / "config.json").is_file()
    with pytest.raises(
        ValueError, match=re.escape(f"(MLflow's model registry) needs MLflow, which is not installed: {INSTALL_HINT}")
    ):
        open_registry(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.parametrize("command", [["pretrain"], ["finetune"], *(["align", m] for m in ALIGN_COMMANDS)])
def test_every_training_command_takes_track(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert "--track [URI]" in text and "--experiment" in text


def test_listeners_see_their_own_context_and_params_flatten():
    seen = []
    publish_metrics({"step": 1, "loss": 2.0})  # no listener: nothing happens
    with metric_listener(seen.append):
        publish_metrics({"step": 1, "loss": 2.0})
    publish_metrics({"step": 2, "loss": 1.0})
    assert seen == [{"step": 1, "loss": 2.0}]
    flat = flatten_params({"a": {"b": 1, "c": None}, "d": [1, 2], "e": "x" * 7000})
    assert flat == {"a.b": "1", "d": "[1, 2]", "e": "x" * 6000}
    assert metric_values({"step": 3, "rewards/chosen": 0.5, "note": "text", "odd key!": 1}) == {
        "rewards/chosen": 0.5,
        "odd key_": 1.0,
    }
