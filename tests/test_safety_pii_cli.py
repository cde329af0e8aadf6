"""PII scrubbing in `genforge data prepare --redact-pii` (the shards hold no originals, the
report counts redactions per type) and `genforge safety scan | redact | restore`."""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest

from genforge.safety import cli as safety_cli
from genforge.tokenizer import Tokenizer
from genforge.train.cli import add_commands as add_train_commands
from genforge.train.data import DataError
from genforge.train.prepare import PIIRedaction, prepare
from genforge.train.tokenizer_training import train_tokenizer

WORDS = [f"w{i}" for i in range(500)]
PII = [
    "write to ann.lee@example.com today",
    "card 4111 1111 1111 1111 was charged",
    "call +44 20 7946 0958 after six",
    "ssn 536-90-4399 is on file",
]


def run(argv):
    """Parse and run a command with only the parsers under test (genforge.cli wires `safety` in later)."""
    parser = argparse.ArgumentParser(prog="genforge")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_commands(sub)
    safety_cli.add_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("pii")
    docs = []
    for i in range(24):
        words = " ".join(rng.choice(WORDS) for _ in range(40))
        docs.append(f"{words} {PII[i % len(PII)]} {words[:60]}")
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_tokenizer(docs, vocab_size=600, out_dir=root / "tok")
    return source, root / "tok"


def decoded(out_dir, tokenizer_dir) -> str:
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    text = []
    for split in ("train", "val"):
        for shard in sorted(out_dir.glob(f"{split}-*.npy")):
            text.append(tokenizer.decode(np.load(shard).tolist()))
    return " ".join(text)


def test_prepare_redacts_pii_before_the_shards(tmp_path, corpus):
    source, tok = corpus
    result = prepare([source], tok, tmp_path / "out", val_fraction=0.2, pii=PIIRedaction(), dedup=None)
    pii = result.meta["pii"]
    assert pii["style"] == "placeholder" and pii["documents_redacted"] == 24
    assert pii["redactions"] == {"EMAIL": 6, "CREDIT_CARD": 6, "PHONE": 6, "US_SSN": 6}
    text = decoded(tmp_path / "out", tok)
    for original in ("ann.lee@example.com", "4111", "7946", "536-90"):
        assert original not in text.replace(" ", "") and original not in text
    plain = prepare([source], tok, tmp_path / "plain", val_fraction=0.2)
    assert plain.meta["pii"] is None and "4111" in decoded(tmp_path / "plain", tok).replace(" ", "")


def test_prepare_refuses_reversible_and_unknown_types(tmp_path, corpus):
    source, tok = corpus
    with pytest.raises(DataError, match="reversible"):
        prepare([source], tok, tmp_path / "a", pii=PIIRedaction(style="reversible"))
    with pytest.raises(DataError, match="unknown PII type"):
        prepare([source], tok, tmp_path / "b", pii=PIIRedaction(types=("EMAILS",)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_data_prepare_cli_reports_redactions(tmp_path, corpus, capsys):
    source, tok = corpus
    out = tmp_path / "out"
    argv = ["data", "prepare", str(source), "--tokenizer", str(tok), "--out", str(out), "--val-fraction", "0.2"]
    assert run([*argv, "--redact-pii", "--pii-style", "mask", "--pii-types", "email,credit_card"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "PII (mask): 12 documents redacted: 6 EMAIL, 6 CREDIT_CARD" in err
    assert json.loads((out / "meta.json").read_text())["pii"]["types"] == ["EMAIL", "CREDIT_CARD"]
    with pytest.raises(ValueError, match="only with --redact-pii"):
        run([*argv, "--overwrite", "--pii-style", "mask"])


def test_safety_scan_redact_and_restore(tmp_path, capsys):
    source = tmp_path / "in.txt"
    text = "hello ann@example.com\nno pii here\ncall +44 20 7946 0958, card 4111-1111-1111-1111\n"
    source.write_bytes(text.encode() + b"bad byte \xff\n")
    assert run(["safety", "scan", str(source)]) == 0
    captured = capsys.readouterr()
    findings = [json.loads(line) for line in captured.out.splitlines()]
    assert [(f["type"], f["line"]) for f in findings] == [("EMAIL", 1), ("PHONE", 3), ("CREDIT_CARD", 3)]
    assert all("text" not in f for f in findings)  # values only with --show-values
    assert text[findings[1]["start"] : findings[1]["end"]] == "+44 20 7946 0958"
    assert "1 undecodable byte" in captured.err

    assert run(["safety", "redact", str(source), "--types", "EMAIL,PHONE"]) == 0
    assert capsys.readouterr().out.startswith("hello <EMAIL_1>\nno pii here\ncall <PHONE_1>, card 4111-1111-1111-1111")

    vault, key, redacted = tmp_path / "vault.json", tmp_path / "key", tmp_path / "redacted.txt"
    with pytest.raises(ValueError, match="needs --vault"):
        run(["safety", "redact", str(source), "--style", "reversible"])
    assert run(["safety", "redact", str(source), "--style", "reversible", "--vault", str(vault),
                "--key-file", str(key), "--out", str(redacted)]) == 0  # fmt: skip
    assert "ann@example.com" not in redacted.read_text() and key.exists()
    assert run(["safety", "restore", str(redacted), "--vault", str(vault), "--key-file", str(key)]) == 0
    assert capsys.readouterr().out == source.read_bytes().decode("utf-8", errors="replace")


def test_one_registry_entry_adds_a_safety_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        safety_cli.SAFETY_COMMANDS, "find", safety_cli.SafetyCommand("pii_cli", "another name", {"pii_action": "scan"})
    )
    (tmp_path / "in.txt").write_text("mail ann@example.com")
    assert run(["safety", "find", str(tmp_path / "in.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "EMAIL"
