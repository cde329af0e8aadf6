"""`genforge prompt render|compress` through their argument parser."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from genforge.prompting import PromptTemplateError
from genforge.prompting.cli import add_commands

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds overhead


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genforge")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_render_with_vars_files_and_json(tmp_path, capsys):
    template = tmp_path / "ask.yaml"
    template.write_text(
        "variables: [question, context]\nsystem: Use the context.\ntemplate: '{{ context }} Q: {{ question }}'\n"
    )
    (tmp_path / "ctx.txt").write_text("Tea is a drink.")
    assert (
        _run(["prompt", "render", str(template), "--vars", "question=What is tea?", f"context=@{tmp_path / 'ctx.txt'}"])
        == 0
    )
    assert capsys.readouterr().out == "Tea is a drink. Q: What is tea?\n"
    assert (
        _run(["prompt", "render", str(template), "--vars-json", '{"question": "q", "context": "c"}', "--messages"]) == 0
    )
    assert json.loads(capsys.readouterr().out) == [
        {"role": "system", "content": "Use the context."},
        {"role": "user", "content": "c Q: q"},
    ]
    with pytest.raises(PromptTemplateError, match="needs 'context'"):
        _run(["prompt", "render", str(template), "--vars", "question=x"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        _run(["prompt", "render", str(template), "--vars", "question"])


def test_render_reads_a_template_from_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello {{ who }}\n"))
    assert _run(["prompt", "render", "-", "--vars", "who=you"]) == 0
    assert capsys.readouterr().out == "Hello you\n"


def test_compress_a_file_under_a_budget(tmp_path, capsys, text_model_dir):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(
        "<keep>Answer from the context.</keep>\n"
        + "The json module encodes and decodes data in the JSON format used by many web services. " * 3
        + "\n<keep>Question: what does json do?</keep>\n"
    )
    assert _run(["prompt", "compress", str(prompt), "--budget", "40", "--model", str(text_model_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compressed_tokens"] <= 40 < result["original_tokens"]
    assert result["text"].startswith("Answer from the context.\n")
    assert result["text"].rstrip().endswith("Question: what does json do?")
    with pytest.raises(ValueError, match="never closed"):
        bad = tmp_path / "bad.txt"
        bad.write_text("<keep>open")
        _run(["prompt", "compress", str(bad), "--budget", "5", "--model", str(text_model_dir)])
