"""genforge.ops.registry: versions, aliases and lineage with the same rules in a folder and in
MLflow's model registry; `registry:NAME@ALIAS` / `registry:NAME/VERSION` resolved where a model
directory is read, end to end through `genforge serve` (a re-aliased version is what a restart
serves); errors that say what exists."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json

import httpx
import pytest
from live_server import LiveServer
from mlflow import MlflowClient

from genforge.checkpoint import read_config, save_model
from genforge.cli import main
from genforge.model import Transformer
from genforge.ops import registry_cli
from genforge.ops.registry import (
    DirectoryRegistry,
    MlflowRegistry,
    RegistryError,
    open_registry,
    parse_ref,
    resolve_model_ref,
)
from genforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates the tables once (~5 s)
    return uri


@pytest.fixture(scope="module")
def short_context_dir(text_model_dir, tmp_path_factory):
    """Another version of text_model_dir's model: other weights, a 128-token context (so a server
    shows which one it serves in /v1/models' max_model_len)."""
    import torch

    torch.manual_seed(1)
    config = dataclasses.replace(read_config(text_model_dir), max_position_embeddings=128)
    directory = tmp_path_factory.mktemp("short") / "model"
    return save_model(Transformer(config), directory, tokenizer=Tokenizer.from_dir(text_model_dir))


@pytest.fixture(params=["directory", "mlflow"])
def location(request, tmp_path, monkeypatch):
    """A registry of each kind, also made the default ($GENFORGE_REGISTRY) for references (the
    MLflow store is the module's: the test using it registers names no other test uses)."""
    value = str(tmp_path / "registry") if request.param == "directory" else request.getfixturevalue("store")
    monkeypatch.setenv("GENFORGE_REGISTRY", value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the download cache stays in the test
    return value


def registry_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genforge")
    registry_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["registry", *(str(a) for a in argv)])
    return args.func(args)


def _model_dir(tmp_path, name: str, seed: int):
    from factories import tiny_model

    return save_model(tiny_model(seed), tmp_path / name)


def test_versions_aliases_and_errors_follow_one_set_of_rules(location, tmp_path):
    first, second = _model_dir(tmp_path, "a", 0), _model_dir(tmp_path, "b", 1)
    registry = open_registry(location)
    assert isinstance(registry, MlflowRegistry if location.startswith("sqlite") else DirectoryRegistry)
    v1 = registry.register("tiny", first, aliases=["champion"])
    v2 = registry.register("tiny", second, aliases=["canary"], description="more steps")
    assert (v1.version, v2.version) == (1, 2) and v1.aliases == ["champion"] and v2.description == "more steps"
    weights = (first / "model.safetensors").read_bytes()
    assert v1.lineage["files"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    # a version is a copy: the registered directory may change or go, the version stays
    (first / "model.safetensors").write_bytes(b"overwritten")
    resolved = resolve_model_ref("registry:tiny@champion")
    assert (resolved / "model.safetensors").read_bytes() == weights
    assert resolve_model_ref("registry:tiny/latest") == resolve_model_ref("registry:tiny/2")
    assert (resolve_model_ref("registry:tiny@canary") / "model.safetensors").read_bytes() == (
        second / "model.safetensors"
    ).read_bytes()
    registry.set_alias("tiny", "champion", 2)
    assert registry.fetch("tiny", alias="champion").version == 2
    assert [v.aliases for v in registry.versions("tiny")] == [[], ["canary", "champion"]]
    (listed,) = registry.list_models()
    assert listed.name == "tiny" and listed.versions == [1, 2] and listed.aliases == {"canary": 2, "champion": 2}
    registry.delete_alias("tiny", "canary")
    with pytest.raises(RegistryError, match=r"has no alias 'canary'; its aliases: champion -> 2"):
        resolve_model_ref("registry:tiny@canary")
    with pytest.raises(RegistryError, match=r"no registered model 'tinny' .*; registered: tiny"):
        resolve_model_ref("registry:tinny@champion")
    with pytest.raises(RegistryError, match=r"has no version 7; its versions: 1, 2"):
        resolve_model_ref("registry:tiny/7")
    with pytest.raises(RegistryError, match="has no version 3; its versions: 1, 2"):
        registry.set_alias("tiny", "champion", 3)
    for reserved in ("latest", "v3", "V12"):
        with pytest.raises(RegistryError, match="reserved"):
            registry.set_alias("tiny", reserved, 1)
    with pytest.raises(RegistryError, match="neither a model directory"):
        registry.register("tiny", tmp_path)
    assert [v.version for v in registry.versions("tiny")] == [1, 2]  # refusals changed nothing


def test_a_remote_mlflow_version_is_downloaded_once(store, tmp_path, monkeypatch):
    import mlflow

    import genforge.ops.registry as registry_module

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    registry = MlflowRegistry(store)
    registry.register("remote", _model_dir(tmp_path, "m", 0))
    monkeypatch.setattr(registry_module, "_local_artifact_dir", lambda source: None)  # as if on a server
    fetched = registry.fetch("remote", version=1).path
    assert fetched.is_relative_to(tmp_path / "home" / ".cache" / "genforge" / "registry")
    assert {p.name for p in fetched.iterdir()} >= {"config.json", "model.safetensors"}
    weights = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert (fetched / "model.safetensors").read_bytes() == weights

    def no_second_download(**_):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_second_download)
    assert registry.fetch("remote", version=1).path == fetched


def test_references_parse_or_say_what_is_accepted():
    assert parse_ref("registry:chat@champion") == ("chat", "champion", None)
    assert parse_ref("registry:chat-v2.1/3") == ("chat-v2.1", None, 3)
    assert parse_ref("registry:chat/latest") == ("chat", None, None)
    for bad in ("registry:chat", "registry:chat/0", "registry:chat@", "registry:@x", "registry:a/b/c"):
        with pytest.raises(RegistryError, match="accepted: registry:NAME@ALIAS"):
            parse_ref(bad)
    assert str(resolve_model_ref("some/dir")) == "some/dir"  # plain paths pass through unchecked


@pytest.mark.slow
def test_a_run_directory_registers_with_its_lineage(text_model_dir, store, tmp_path, monkeypatch, capsys):
    """Train from a registered base (`--model registry:...`), tracked; register the run: the version
    names its base version, data with content hash, command and MLflow run."""
    monkeypatch.setenv("GENFORGE_REGISTRY", str(tmp_path / "registry"))
    assert registry_main(["register", "base", text_model_dir, "--alias", "champion"]) == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the key value cache keeps past keys and values so decoding is fast. " * 30)
    run_dir = tmp_path / "run"
    argv = ["pretrain", "--model", "registry:base@champion", "--init-weights", "--text", corpus, "--out", run_dir]
    argv += ["--steps", "1", "--seq-len", "16", "--batch-size", "2", "--warmup", "0", "--track", store]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    assert registry_main(["register", "trained", run_dir, "--alias", "canary"]) == 0
    assert capsys.readouterr().out.strip() == "registry:trained/1"
    assert registry_main(["show", "trained@canary"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    lineage = shown["lineage"]
    assert lineage["base_model"] == "base/1" and lineage["command"] == "genforge pretrain"
    (data,) = lineage["data"]
    assert data["path"] == str(corpus) and data["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(tracking_uri=store).get_run(run_id).data.tags["genforge.start_model"] == "registry:base/1"
    assert lineage["run_id"] == run_id and lineage["source"] == str(run_dir / "model")
    assert shown["kind"] == "model" and shown["aliases"] == ["canary"]
    assert registry_main(["list"]) == 0
    table = capsys.readouterr().out
    assert "| base | 1 | 1 | champion -> 1 |" in table and "| trained | 1 | 1 | canary -> 1 |" in table
    # the MLflow registry takes the same run directory and keeps the lineage as version tags
    assert registry_main(["register", "trained", run_dir, "--registry", store]) == 0
    version = MlflowClient(tracking_uri=store).get_model_version("trained", "1")
    assert version.run_id == run_id and json.loads(version.tags["genforge.lineage"])["base_model"] == "base/1"
    assert registry_main(["alias", "trained", "canary", "--delete"]) == 0
    with pytest.raises(RegistryError, match="has no alias 'canary'; its aliases: none"):
        registry_main(["show", "trained@canary"])


@pytest.mark.slow
def test_serve_generate_and_eval_read_registry_references(
    text_model_dir, short_context_dir, tmp_path, monkeypatch, capsys
):
    import uvicorn

    monkeypatch.setenv("GENFORGE_REGISTRY", str(tmp_path / "registry"))
    registry_main(["register", "chat", text_model_dir, "--alias", "champion"])
    registry_main(["register", "chat", short_context_dir])
    served = []

    def serve_once(app, **options):  # stands in for uvicorn.run: serve, ask, stop
        with LiveServer(app) as live:
            (card,) = httpx.get(live.url + "/v1/models").json()["data"]
            reply = live.client().completions.create(model="chat", prompt="the cache", max_tokens=4, temperature=0)
            served.append((card["id"], card["max_model_len"], reply.choices[0].text))

    monkeypatch.setattr(uvicorn, "run", serve_once)
    assert main(["serve", "--model", "registry:chat@champion", "--port", "0"]) == 0
    registry_main(["alias", "chat", "champion", "2"])
    assert main(["serve", "--model", "registry:chat@champion", "--port", "0"]) == 0  # a restart
    assert [(name, length) for name, length, _ in served] == [("chat", 256), ("chat", 128)]
    assert all(text for _, _, text in served)
    capsys.readouterr()
    assert main(["serve", "--model", "registry:chat@nightly"]) == 2
    assert "has no alias 'nightly'; its aliases: champion -> 2" in capsys.readouterr().err

    assert main(["generate", "--model", "registry:chat/1", "--prompt", "the cache", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    (tmp_path / "text.txt").write_text("the key value cache keeps past keys and values. " * 4)
    assert main(["eval", "ppl", "--model", "registry:chat@champion", "--text", str(tmp_path / "text.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    with pytest.raises(SystemExit):
        main(["generate", "--model", "registry:chat/9", "--prompt", "x"])
    assert "has no version 9; its versions: 1, 2" in capsys.readouterr().err
