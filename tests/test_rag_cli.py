"""`genforge rag index|search|ask|eval` end to end on a small folder, and the embedded docs index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genforge.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

PAGES = {
    "paging.md": "# Paged attention\n\nPaged attention keeps the key-value cache in fixed-size blocks, the way an "
    "operating system keeps virtual memory in pages. A block table maps every sequence to its blocks.\n\n"
    "## Memory\n\nBecause blocks are small, at most one partly filled block per sequence is wasted.\n",
    "lora.md": "# LoRA\n\nLoRA freezes the pretrained weights and trains two small low-rank matrices beside each one.\n",
    "bread.txt": "Knead the dough for ten minutes, let it rise for two hours and bake it in a hot oven.\n",
}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    for name, text in PAGES.items():
        (corpus / name).write_text(text)
    (corpus / "data.bin").write_bytes(b"\x00\x01binary")
    out = tmp_path_factory.mktemp("index") / "idx"
    assert main(["rag", "index", str(corpus), "--index", str(out), "--max-tokens", "128"]) == 0
    return out


def test_index_skips_bad_files_and_search_prints_hits(index_dir, capsys):
    assert (index_dir / "manifest.json").is_file()
    assert (
        main(["rag", "search", "where is the key value cache kept", "--index", str(index_dir), "-k", "2", "--json"])
        == 0
    )
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 2 and Path(hits[0]["source"]).name == "paging.md" and hits[0]["rank"] == 1
    assert "blocks" in hits[0]["text"]


def test_ask_with_a_session_rewrites_the_follow_up(index_dir, tmp_path, capsys):
    db = str(tmp_path / "s.sqlite")
    common = ["--index", str(index_dir), "--session", "chat", "--sessions-db", db, "--json"]
    assert main(["rag", "ask", "how does paged attention work?", *common]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["covered"] and Path(first["citations"][0]["source"]).name == "paging.md"
    for sentence in first["sentences"]:
        cited = first["citations"][sentence["citations"][0] - 1]
        text = (Path(cited["source"]).read_text())[cited["start"] : cited["end"]]
        assert " ".join(sentence["text"].split()) in " ".join(text.split())
    assert main(["rag", "ask", "how much memory does it waste?", *common]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["query"] == "how much memory does paged attention waste?"
    assert any("wasted" in s["text"] for s in second["sentences"])


def test_ask_outside_the_corpus_is_not_covered(index_dir, capsys):
    assert main(["rag", "ask", "who won the 1998 football world cup?", "--index", str(index_dir)]) == 0
    assert "do not cover" in capsys.readouterr().out


@pytest.mark.slow  # ranx compiles its metrics with numba on first use
def test_eval_reports_every_system(index_dir, tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        json.dumps({"id": "p", "text": "blocks of the attention cache"})
        + "\n"
        + json.dumps({"id": "l", "text": "low-rank adapters on frozen weights"})
        + "\n"
    )
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("p 0 paging.md 1\nl 0 lora.md 1\n")
    out = tmp_path / "result.json"
    assert (
        main(
            [
                "rag",
                "eval",
                "--queries",
                str(queries),
                "--qrels",
                str(qrels),
                "--index",
                str(index_dir),
                "--doc-id",
                "file",
                "--answers",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| bm25 |" in printed and "| hybrid |" in printed and "citation_precision" in printed
    result = json.loads(out.read_text())
    assert result["retrieval"]["hybrid"]["mrr"] == 1.0
    assert result["answers"]["faithfulness"] == 1.0
    # Quoted sentences are their own passages' claims; the answers are about the queries.
    assert result["answers"]["claim_faithfulness"] == 1.0 and result["answers"]["answer_relevance"] > 0.3


def test_bad_input_is_refused_before_loading(tmp_path, capsys):
    assert main(["rag", "eval", "--queries", str(tmp_path / "none.jsonl"), "--qrels", str(tmp_path / "q")]) == 2
    bad = tmp_path / "q.csv"
    bad.write_text("x")
    assert main(["rag", "eval", "--queries", str(bad), "--qrels", str(bad)]) == 2
    assert "accepted: .json, .jsonl, .tsv" in " ".join(capsys.readouterr().err.split())
    assert main(["rag", "ask", "x", "--model", "a", "--openai-model", "b"]) == 2
    assert main(["rag", "search", "x", "--index", str(tmp_path), "--rerank", "nonsense"]) == 2
    assert main(["rag", "search", "x", "--index", str(tmp_path)]) == 2
    assert "not a genforge RAG index" in " ".join(capsys.readouterr().err.split())
    assert main(["rag", "index", str(tmp_path), "--index", str(tmp_path / "i"), "--backend", "milvus"]) == 2


@pytest.mark.slow
def test_default_docs_index_is_built_once_and_cites_the_docs(tmp_path, monkeypatch, capsys):
    import shutil

    from genforge.rag.retrieve import docs_dir

    monkeypatch.setenv("GENFORGE_CACHE_DIR", str(tmp_path / "cache"))
    # A snapshot of the real docs, so that an edit made meanwhile cannot change the digest mid-test.
    shutil.copytree(docs_dir(), tmp_path / "docs")
    monkeypatch.setenv("GENFORGE_DOCS", str(tmp_path / "docs"))
    assert main(["rag", "ask", "which file formats can the document loaders read?", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["covered"] and any(Path(c["source"]).name == "rag.md" for c in answer["citations"])
    built = list((tmp_path / "cache" / "rag").glob("docs-*"))
    assert len(built) == 1 and (built[0] / "manifest.json").is_file()
    stamp = (built[0] / "manifest.json").stat().st_mtime_ns
    assert main(["rag", "search", "reciprocal rank fusion", "--json", "-k", "1"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["source"]).name == "rag.md"
    assert (built[0] / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert main(["rag", "ask", "how does paged attention work?", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["covered"] and all(Path(c["source"]).suffix == ".md" for c in answer["citations"])
    assert any("paged" in s["text"].lower() for s in answer["sentences"])


def test_index_and_search_on_milvus_lite(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in PAGES.items():
        (corpus / name).write_text(text)
    out = tmp_path / "idx"
    assert (
        main(
            [
                "rag",
                "index",
                str(corpus),
                "--index",
                str(out),
                "--max-tokens",
                "128",
                "--backend",
                "milvus",
                "--milvus-uri",
                str(tmp_path / "rag.db"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["rag", "search", "low rank adapters", "--index", str(out), "-k", "1", "--json"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["source"]).name == "lora.md"
    assert main(["rag", "ask", "what does LoRA train?", "--index", str(out), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["covered"] and Path(answer["citations"][0]["source"]).name == "lora.md"


def test_search_with_late_interaction_reranking(index_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GENFORGE_CACHE_DIR", str(tmp_path / "cache"))
    command = [
        "rag",
        "search",
        "where is the key value cache kept",
        "--index",
        str(index_dir),
        "-k",
        "2",
        "--rerank",
        "late",
        "--json",
    ]
    assert main(command) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert Path(hits[0]["source"]).name == "paging.md"
    # Re-ranked scores are MaxSim per query token: cosine-scaled, not fused scores.
    assert 0 < hits[1]["score"] <= hits[0]["score"] <= 1
    (cache,) = (tmp_path / "cache" / "rag").glob("late-tokens-*.npz")
    stamp = cache.stat().st_mtime_ns
    assert main(command) == 0  # every passage cached: nothing new to write
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == hits
    assert cache.stat().st_mtime_ns == stamp


def test_docs_are_found_where_a_wheel_install_puts_them(tmp_path, monkeypatch):
    import sysconfig

    from genforge.rag import retrieve

    installed = tmp_path / "prefix" / "share" / "genforge" / "docs"
    installed.mkdir(parents=True)
    (installed / "rag.md").write_text("# RAG\n")
    monkeypatch.delenv("GENFORGE_DOCS", raising=False)
    # A wheel install: the module lives in site-packages, with no checkout around it.
    monkeypatch.setattr(retrieve, "__file__", str(tmp_path / "site-packages" / "genforge" / "rag" / "retrieve.py"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, scheme=None: str(tmp_path / "prefix"))
    assert retrieve.docs_dir() == installed
    (installed / "rag.md").unlink()
    with pytest.raises(FileNotFoundError, match="GENFORGE_DOCS"):
        retrieve.docs_dir()


@pytest.mark.slow
def test_the_wheel_carries_every_doc(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    # Built from a copy: setuptools builds in the source tree and would leave build/ behind.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for name in ("src", "docs"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(source),
            "-w",
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("genforge-*.whl")
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/data/share/genforge/docs/" in n}
    assert shipped == {p.name for p in (root / "docs").glob("*.md")}


def test_ask_falls_back_to_an_extractive_answer_when_the_generator_is_unsupported(index_dir, text_model_dir, capsys):
    # A random tiny model writes nothing the passages support: the answer is quoted instead.
    common = ["--index", str(index_dir), "--model", str(text_model_dir), "--min-confidence", "0", "-k", "1"]
    common += ["--max-new-tokens", "24"]
    assert main(["rag", "ask", "how does paged attention work?", *common, "--unsupported", "extractive", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["unsupported_action"] == "extractive_fallback" and answer["mode"] == "extractive"
    assert answer["removed_sentences"] and all(s["supported"] for s in answer["sentences"])
    assert main(["rag", "ask", "how does paged attention work?", *common, "--unsupported", "extractive"]) == 0
    shown = capsys.readouterr()
    assert "[1]" in shown.out and "answered extractively from the best-supported" in " ".join(
        (shown.out + shown.err).split()
    )
