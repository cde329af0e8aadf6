"""Lineage: what produced a model, recorded where the model is made.

A training command (pretrain, finetune, align) leaves `genforge_run.json` in its run directory:
the command and its flags, the model it started from (and the registry version, when it was given
as `registry:NAME@ALIAS`), its data files with their SHA-256 content hashes taken when the run
started, the genforge version and git commit, and the MLflow run when the run was tracked. The
registry reads it when a run's output is registered, so a registered version says which data,
base model, adapter and run made it. Content hashes, not paths or dates, identify data: a file
edited in place after training no longer matches the version's record.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text

RUN_RECORD = "genforge_run.json"
# The flags whose values are a run's data (files, folders or lists of them).
DATA_FLAGS = ("data", "text", "eval_data", "prompts")
_CHUNK = 1 << 20


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder: of its files' relative paths and hashes, in order."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{child.relative_to(path).as_posix()}\0{sha256_of(child)}\n".encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(directory: str | Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `directory`: a model version's manifest."""
    directory = Path(directory)
    return {
        child.relative_to(directory).as_posix(): sha256_of(child)
        for child in sorted(p for p in directory.rglob("*") if p.is_file())
    }


def data_inputs(flags: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[{flag, path, sha256, bytes}] for the data flags among `flags` that name existing files or folders."""
    inputs = []
    for flag in DATA_FLAGS:
        value = flags.get(flag)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and Path(item).exists():
                path = Path(item)
                size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*"))
                inputs.append({"flag": flag, "path": str(path.resolve()), "sha256": sha256_of(path), "bytes": size})
    return inputs


def git_commit(directory: str | Path | None = None) -> str | None:
    """The commit checked out where genforge's source lives (None outside a git checkout)."""
    where = Path(directory) if directory is not None else Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def genforge_version() -> str:
    from .. import __version__

    return __version__


def plain_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed flags as JSON values: callables (argparse's handler) left out, paths as strings."""
    plain = {}
    for key, value in flags.items():
        if callable(value):
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        plain[key] = value
    return plain


def write_run_record(run_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write `record` to `run_dir/genforge_run.json`, atomically."""
    path = Path(run_dir) / RUN_RECORD
    atomic_write_text(path, json.dumps(record, indent=2, default=str))
    return path


def read_run_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The run record in `run_dir`, or None when there is none (or it is unreadable)."""
    path = Path(run_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def find_run_record(candidates: Iterable[str | Path]) -> tuple[Path, dict[str, Any]] | None:
    """The first (directory, record) among `candidates` that holds a run record."""
    for directory in candidates:
        record = read_run_record(directory)
        if record is not None:
            return Path(directory), record
    return None


__all__ = [
    "DATA_FLAGS",
    "RUN_RECORD",
    "data_inputs",
    "file_hashes",
    "find_run_record",
    "genforge_version",
    "git_commit",
    "plain_flags",
    "read_run_record",
    "sha256_of",
    "write_run_record",
]
