"""Metadata filters over chunks: `{field: value or list of values}`, every field matching.

A search checks its filter once (`check_filters`); BM25 and FAISS then test chunks with
`chunk_matches`, and Milvus runs the same checked filter as an expression
(`milvus.filter_expression`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .chunking import Chunk
from .stores import RagIndexError

FilterValue = str | int | float | bool
Filters = Mapping[str, "FilterValue | Sequence[FilterValue]"]

# What `chunk_field` returns for a metadata key the chunk lacks (None is a valid value).
_MISSING = object()


def check_filters(filters: Filters | None) -> dict[str, tuple[FilterValue, ...]] | None:
    """Validate a filter and normalise it to {key: allowed values}.

    A filter maps a field to one value (equality) or a list of values ("in"); all fields must
    match. Fields: `source` (the document path), `extension` (its suffix, e.g. ".md") and any
    key of the chunk's metadata (e.g. `format`, `title`, `item`)."""
    if filters is None:
        return None
    if not isinstance(filters, Mapping):
        raise RagIndexError(f"filters must be a dict {{field: value or list of values}}, got {type(filters).__name__}")
    out = {}
    for key, value in filters.items():
        if not isinstance(key, str) or not key.replace("_", "").isalnum():
            raise RagIndexError(
                f"filter field {key!r} is not accepted; use a metadata key made of letters, digits and '_', "
                "or 'source' / 'extension'"
            )
        values = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else (value,)
        if not values:
            raise RagIndexError(f"filter on {key!r} lists no values; give at least one")
        for v in values:
            if not isinstance(v, (str, int, float, bool)):
                raise RagIndexError(
                    f"filter on {key!r}: value {v!r} is a {type(v).__name__}; accepted: str, int, float, bool "
                    "or a list of them"
                )
        out[key] = values
    return out


def chunk_field(chunk: Chunk, key: str) -> Any:
    """The value a filter on `key` compares: the source path, its lowercased suffix, or a metadata value."""
    if key == "source":
        return chunk.source
    if key == "extension":
        return Path(chunk.source).suffix.lower()
    return chunk.metadata.get(key, _MISSING)


def _same(value: Any, wanted: FilterValue) -> bool:
    # bool is an int in Python; keep True from matching 1 so that both backends agree.
    if isinstance(value, bool) or isinstance(wanted, bool):
        return value is wanted
    return value == wanted


def chunk_matches(chunk: Chunk, filters: Mapping[str, tuple[FilterValue, ...]]) -> bool:
    """Whether a chunk passes a checked filter (every field equal to one of its values)."""
    for key, allowed in filters.items():
        value = chunk_field(chunk, key)
        if value is _MISSING or not any(_same(value, a) for a in allowed):
            return False
    return True
