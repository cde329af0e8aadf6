"""Reading the JSONL records that monitoring and A/B analysis work on.

A server started with ``--outcome-log`` writes one ``{"type": "request", ...}`` object per
generation request and one ``{"type": "feedback", "id", "score"}`` per client report
(`ops.routing`). Any other JSONL of objects with a ``prompt`` (and optionally ``reply``,
``judge_score``, ...) is read as requests too, so a data set of prompts can be a reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..jsonl import json_objects

__all__ = ["read_records"]


def read_records(path: str | Path, *, join_feedback: bool = True) -> list[dict[str, Any]]:
    """The request records of a JSONL file, in order; with ``join_feedback`` each feedback
    record's ``score`` is set on the request with its ``id`` (the latest score wins)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such records file: {path}")
    requests: list[dict[str, Any]] = []
    feedback: dict[str, float] = {}
    with open(path, encoding="utf-8") as handle:
        for _, record in json_objects(handle, str(path)):
            kind = record.get("type", "request")
            if kind == "feedback":
                if isinstance(record.get("id"), str) and isinstance(record.get("score"), (int, float)):
                    feedback[record["id"]] = float(record["score"])
            elif kind == "request":
                requests.append(record)
    if join_feedback and feedback:
        for record in requests:
            if record.get("id") in feedback:
                record["score"] = feedback[record["id"]]
    return requests
