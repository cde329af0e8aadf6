"""`genforge safety scan | redact | restore`: PII detection and redaction on a file or stdin.

The input is read in blocks of whole lines (about 1 MB each), so a large file streams; offsets
in `scan`'s output count characters from the start of the input. Undecodable bytes are read as
U+FFFD and counted in a note.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

BLOCK_CHARS = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .pii import PII_TYPES, REDACTION_STYLES

    action = parser.get_default("pii_action")
    parser.add_argument("input", help="a text file, or - for stdin")
    parser.add_argument("--out", default=None, help="write here instead of stdout")
    if action == "restore":
        parser.description = "Restore the values a reversible redaction replaced, from its vault and key."
        parser.add_argument("--vault", required=True, help="the vault JSON written by `genforge safety redact`")
        parser.add_argument("--key-file", required=True, help="the file holding the redaction key")
        return
    parser.add_argument(
        "--types",
        default=None,
        help=f"comma-separated PII types (default: all pattern types, plus names with --ner-model): {','.join(PII_TYPES)}",
    )
    parser.add_argument(
        "--ner-model",
        default=None,
        metavar="DIR",
        help="a BertForTokenClassification checkpoint for PERSON/ORGANIZATION/LOCATION (none ships with genforge)",
    )
    parser.add_argument(
        "--phone-regions", default=None, help="comma-separated regions whose national phone formats count"
    )
    if action == "scan":
        parser.description = (
            "Find personal data: one JSON object per finding on stdout (type, start, end, line, score, source); "
            "counts per type on stderr. Values are left out unless --show-values."
        )
        parser.add_argument("--show-values", action="store_true", help="include each finding's text (it is PII)")
        return
    parser.description = (
        "Redact personal data and write the text to stdout. Styles: mask (****), placeholder (<EMAIL_1>), "
        "pseudonym (a consistent fake value, keyed), reversible (<EMAIL_3fa85f6457c1>, restorable with the vault "
        "and key)."
    )
    parser.add_argument("--style", choices=REDACTION_STYLES, default="placeholder", help="how to replace a value")
    parser.add_argument(
        "--key-file",
        default=None,
        help="key for pseudonym/reversible; for reversible a missing file is created with a fresh key",
    )
    parser.add_argument("--vault", default=None, help="reversible style: where to write the vault (required)")


def _blocks(path: str) -> Iterator[str]:
    """Whole-line blocks of about BLOCK_CHARS characters from a file or stdin."""
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    try:
        pending: list[str] = []
        size = 0
        for raw in stream:
            line = raw.decode("utf-8", errors="replace")
            pending.append(line)
            size += len(line)
            if size >= BLOCK_CHARS:
                yield "".join(pending)
                pending, size = [], 0
        if pending:
            yield "".join(pending)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _detector(args):
    from .pii import DEFAULT_PHONE_REGIONS, PIIDetector

    regions = DEFAULT_PHONE_REGIONS if args.phone_regions is None else args.phone_regions.split(",")
    return PIIDetector(args.types, ner=args.ner_model, phone_regions=regions)


def _read_key(path: str) -> bytes:
    key = Path(path).read_bytes().strip()
    if not key:
        raise ValueError(f"{path} is empty; it must hold the redaction key")
    return key


def _output(args):
    return open(args.out, "w", encoding="utf-8") if args.out else sys.stdout


def _check_input(path: str) -> None:
    if path != "-" and not Path(path).is_file():
        raise ValueError(f"{path} is not a file; give a text file or - for stdin")


def run(args: argparse.Namespace) -> int:
    from ..console import console
    from .pii import Redactor, Vault, restore

    _check_input(args.input)
    action = args.pii_action
    if action == "restore":
        vault, key = Vault.load(args.vault), _read_key(args.key_file)
        out = _output(args)
        for block in _blocks(args.input):
            out.write(restore(block, vault, key))
        if out is not sys.stdout:
            out.close()
        return 0

    detector = _detector(args)
    counts: Counter[str] = Counter()
    replaced = 0
    if action == "scan":
        out = _output(args)
        offset, line = 0, 1
        for block in _blocks(args.input):
            replaced += block.count("\ufffd")
            findings = detector.detect(block)
            starts = [f.start for f in findings]
            lines_before = _line_numbers(block, starts)
            for finding, line_offset in zip(findings, lines_before):
                record = {**finding.to_dict(), "start": finding.start + offset, "end": finding.end + offset}
                record["line"] = line + line_offset
                if args.show_values:
                    record["text"] = block[finding.start : finding.end]
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[finding.type] += 1
            offset += len(block)
            line += block.count("\n")
        if out is not sys.stdout:
            out.close()
    else:
        key = None
        if args.key_file is not None:
            key_path = Path(args.key_file)
            if not key_path.exists() and args.style == "reversible":
                key_path.write_text(secrets.token_hex(32) + "\n")
                os.chmod(key_path, 0o600)
                console.print(f"wrote a new key to {key_path}: keep it apart from the vault")
            key = _read_key(args.key_file)
        if args.style == "reversible" and (args.vault is None or key is None):
            raise ValueError("--style reversible needs --vault FILE and --key-file FILE, or nothing could be restored")
        redactor = Redactor(args.style, key=key, detector=detector)
        out = _output(args)
        for block in _blocks(args.input):
            replaced += block.count("\ufffd")
            redaction = redactor.redact(block)
            out.write(redaction.text)
            counts.update(redaction.counts)
        if out is not sys.stdout:
            out.close()
        if args.style == "reversible":
            redactor.vault.save(args.vault)
    summary = ", ".join(f"{n} {t}" for t, n in counts.most_common()) or "no PII found"
    console.print(f"{'found' if action == 'scan' else 'redacted'}: {summary}")
    if replaced:
        console.print(f"note: {replaced} undecodable byte sequence(s) were read as U+FFFD")
    return 0


def _line_numbers(block: str, starts: list[int]) -> list[int]:
    """For each offset (ascending), how many newlines come before it in `block`."""
    numbers, count, position = [], 0, 0
    for start in starts:
        count += block.count("\n", position, start)
        position = start
        numbers.append(count)
    return numbers
