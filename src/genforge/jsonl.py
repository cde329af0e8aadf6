"""JSON Lines input: one JSON object per line, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def json_objects(
    lines: Iterable[str], where: str, error: type[ValueError] = ValueError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of `lines` (a file handle streams).

    A line that is not JSON, or is JSON but not an object, raises `error` naming
    `where:line`, so each caller keeps its own error type.
    """
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(
                f"{where}:{number} is not valid JSON ({err.msg}); the file must hold one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise error(f"{where}:{number} holds a {type(record).__name__}; each line must be a JSON object")
        yield number, record
