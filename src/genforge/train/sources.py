"""Where training text comes from: files, folders, globs and JSONL resolved to a file list, then
read lazily as documents. Both `genforge data prepare` and tokenizer training read through here."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..jsonl import json_objects
from .data import DataError

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".jsonl")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Document:
    """One document: `id` names where it came from (`path` or `path:line` for JSONL)."""

    id: str
    text: str
    source_index: int  # which resolved file it came from (drives the progress bar)


def resolve_sources(sources: Sequence[str | os.PathLike], extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> list[Path]:
    """Expand `sources` into a sorted, duplicate-free list of files.

    A file is taken as given (whatever its name); a folder contributes every file below it whose
    name ends with one of `extensions` (recursively, hidden entries skipped); anything containing
    `*`, `?` or `[` is a glob (`**` recurses). A missing path, a glob that matches nothing, or a
    folder with no matching file is an error naming what is accepted.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise DataError("no sources given; pass files, folders, globs (quoted) or .jsonl files")
    extensions = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
    found: dict[Path, None] = {}
    for source in sources:
        text = os.fspath(source)
        if set(text) & _GLOB_CHARS and not Path(text).exists():
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"the glob {text!r} matches no file")
            found.update(dict.fromkeys(matches))
            continue
        path = Path(text)
        if path.is_file():
            found[path] = None
        elif path.is_dir():
            matches = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.name.endswith(extensions)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not matches:
                raise DataError(
                    f"the folder {text} holds no file ending with {', '.join(extensions)} (choose others with --ext)"
                )
            found.update(dict.fromkeys(matches))
        else:
            raise DataError(f"source {text} does not exist; pass files, folders, globs or .jsonl files")
    return list(found)


def iter_documents(files: Sequence[Path], text_field: str = "text", max_chars: int | None = None) -> Iterator[Document]:
    """Documents from `files`, read lazily: one per plain-text file, one per line of a `.jsonl`
    file (the string in `text_field`; blank lines are skipped).

    Text is decoded as UTF-8 with undecodable bytes replaced by U+FFFD (the non-text filter
    then sees them). With `max_chars`, a plain-text file is read only up to `max_chars + 1`
    characters, enough to know it is too long, so one huge file cannot exhaust memory.
    """
    for index, path in enumerate(files):
        path = Path(path)
        if path.name.endswith(".jsonl"):
            with open(path, encoding="utf-8", errors="replace") as handle:
                for number, record in json_objects(handle, str(path), DataError):
                    if not isinstance(record.get(text_field), str):
                        raise DataError(
                            f"{path}:{number} has no string field {text_field!r} (found: "
                            f"{sorted(record)}); choose the field with --text-field"
                        )
                    yield Document(f"{path}:{number}", record[text_field], index)
        else:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read() if max_chars is None else handle.read(max_chars + 1)
            yield Document(str(path), text, index)


__all__ = ["DEFAULT_EXTENSIONS", "Document", "iter_documents", "resolve_sources"]
