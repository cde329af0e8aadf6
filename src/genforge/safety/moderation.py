"""Content moderation: per-category classifiers over sentence embeddings, OpenAI's response shape.

Five categories, as in OpenAI's moderation taxonomy (Markov et al. 2023, "A Holistic Approach
to Undesired Content Detection in the Real World"): ``violence`` (threats, plans or requests to
hurt people), ``self-harm`` (intent, encouragement or methods), ``sexual`` (explicit content
or sexual services; sex education is not), ``hate`` (demeaning or excluding people for a
protected attribute) and ``illicit`` (instructions or requests that facilitate crimes).

Each category is one logistic-regression head over all-MiniLM-L6-v2 embeddings
(`embedding_heads`), trained on the short, non-graphic labelled set shipped in
``safety/data/moderation_train.jsonl``, whose negatives include the near misses a keyword list
trips on (news of a robbery, a history of war, crisis-line questions, "kill the process").
Each head has its own threshold, chosen by cross-validated F1; a text is flagged when any
category reaches its threshold.

Texts are normalised first (`obfuscation.reveal`: look-alike letters, zero-width characters),
and a text over `WINDOW_CHARS` is scored sentence by sentence (distinct sentences only, at most
`MAX_WINDOWS` of them spread evenly over a longer text), each category taking its highest
sentence, so one harmful sentence is not averaged away by the text around it.

`openai_response` writes OpenAI's ``/v1/moderations`` body. OpenAI's subcategories
(``violence/graphic``, ``self-harm/intent``, ``sexual/minors``, ...) and ``harassment`` are
not modelled: they are present with false and 0.0, so clients that read them still parse.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .obfuscation import reveal

__all__ = [
    "CATEGORIES",
    "OPENAI_CATEGORIES",
    "Moderator",
    "ModerationResult",
    "moderate",
    "default_moderator",
    "openai_response",
    "load_moderation_set",
    "MODEL_NAME",
]

CATEGORIES = ("violence", "self-harm", "sexual", "hate", "illicit")
# Every key OpenAI's moderation results carry, in its order.
OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
MODEL_NAME = "genforge-moderation-minilm"
HEADS_FILE = "moderation_heads.json"
TRAINING_FILE = "moderation_train.jsonl"
WINDOW_CHARS = 300
MAX_WINDOWS = 32
_SHORT_SENTENCE = 24  # characters; shorter sentences are read with the next
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class ModerationResult:
    """Per-category scores and verdicts for one text."""

    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]
    thresholds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def flagged_categories(self) -> list[str]:
        return [c for c in CATEGORIES if self.categories.get(c)]

    def to_dict(self) -> dict:
        return {
            "flagged": self.flagged,
            "categories": dict(self.categories),
            "category_scores": {c: round(s, 4) for c, s in self.scores.items()},
            "thresholds": {c: round(t, 4) for c, t in self.thresholds.items()},
            "notes": list(self.notes),
        }


def load_moderation_set(path: str | Path | None = None) -> list[dict]:
    """Labelled texts (``{"text", "categories": [...]}`` per line); the shipped training set by default."""
    from ..jsonl import json_objects

    path = Path(path) if path is not None else Path(str(resources.files("genforge.safety") / "data" / TRAINING_FILE))
    with open(path, encoding="utf-8") as lines:
        numbered = list(json_objects(lines, str(path)))
    records = [record for _, record in numbered]
    for n, record in numbered:
        unknown = set(record.get("categories", [])) - set(CATEGORIES)
        if not isinstance(record.get("text"), str) or unknown:
            raise ValueError(
                f"{path}:{n} needs a 'text' string and 'categories' from {', '.join(CATEGORIES)}"
                + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
            )
    return records


def _windows(text: str) -> list[str]:
    """A text over `WINDOW_CHARS` as its distinct sentences (a longer one cut, a very short one
    joined to the next), at most `MAX_WINDOWS` of them spread evenly over the text. One sentence
    per window keeps a harmful sentence from being diluted by the benign text around it (a
    sentence vector is a mean); repeated sentences are scored once."""
    if len(text) <= WINDOW_CHARS:
        return [text]
    windows: dict[str, None] = {}
    pending = ""
    for sentence in _SENTENCE_BREAK.split(text):
        sentence = f"{pending} {sentence}" if pending else sentence
        pending = ""
        if len(sentence) < _SHORT_SENTENCE:
            pending = sentence
            continue
        for start in range(0, len(sentence), WINDOW_CHARS):
            windows.setdefault(sentence[start : start + WINDOW_CHARS])
    if pending:
        windows.setdefault(pending)
    distinct = list(windows)
    if len(distinct) > MAX_WINDOWS:
        step = (len(distinct) - 1) / (MAX_WINDOWS - 1)
        distinct = [distinct[round(i * step)] for i in range(MAX_WINDOWS)]
    return distinct


class Moderator:
    """The category heads (see the module docstring).

    ``heads``: a `HeadSet` file with one head per category (default: the shipped one).
    ``thresholds``: per-category overrides of the cross-validated thresholds. ``encoder``: a
    `SentenceEncoder` to share (default: the process's shared all-MiniLM-L6-v2)."""

    def __init__(
        self, heads: str | Path | None = None, *, thresholds: Mapping[str, float] | None = None, encoder=None
    ) -> None:
        from .embedding_heads import HeadSet

        path = Path(heads) if heads is not None else Path(str(resources.files("genforge.safety") / "data" / HEADS_FILE))
        head_set = HeadSet.load(path)
        missing = [c for c in CATEGORIES if c not in head_set.heads]
        if missing:
            raise ValueError(f"{path} lacks heads for {', '.join(missing)}")
        self.heads = {c: head_set.heads[c] for c in CATEGORIES}
        self.thresholds = {c: h.threshold for c, h in self.heads.items()}
        for category, value in (thresholds or {}).items():
            if category not in CATEGORIES:
                raise ValueError(f"unknown moderation category {category!r}; accepted: {', '.join(CATEGORIES)}")
            if not 0.0 < value <= 1.0:
                raise ValueError(f"threshold for {category!r} must be in (0, 1], got {value}")
            self.thresholds[category] = float(value)
        self.encoder = encoder

    def moderate(self, text: str) -> ModerationResult:
        return self.moderate_many([text])[0]

    def moderate_many(self, texts: Sequence[str]) -> list[ModerationResult]:
        """Moderate texts in one embedding batch; empty or whitespace-only texts are not flagged."""
        from .embedding_heads import embed

        if isinstance(texts, str):
            raise TypeError("moderate_many takes a list of texts; use moderate for one")
        windows, owners, notes = [], [], []
        for n, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {n} is a {type(text).__name__}, not str; decode bytes first")
            normal = reveal(text).text
            these = [w for w in _windows(normal) if w.strip()]
            note = []
            if not these:
                note.append("empty or whitespace-only input")
            elif len(normal) > WINDOW_CHARS * MAX_WINDOWS:
                note.append(
                    f"long input ({len(normal)} characters): {len(these)} windows of {WINDOW_CHARS} were scored"
                )
            windows += these
            owners += [n] * len(these)
            notes.append(note)
        best = np.zeros((len(texts), len(CATEGORIES)))
        if windows:
            vectors = embed(windows, self.encoder)
            scores = np.stack([self.heads[c].scores(vectors) for c in CATEGORIES], axis=1)
            for owner, row in zip(owners, scores):
                best[owner] = np.maximum(best[owner], row)
        results = []
        for n in range(len(texts)):
            scores = {c: float(best[n, j]) for j, c in enumerate(CATEGORIES)}
            verdicts = {c: scores[c] >= self.thresholds[c] for c in CATEGORIES}
            results.append(ModerationResult(any(verdicts.values()), verdicts, scores, dict(self.thresholds), notes[n]))
        return results


@functools.lru_cache(maxsize=1)
def default_moderator() -> Moderator:
    """The shipped moderator, built once per process."""
    return Moderator()


def moderate(text: str) -> ModerationResult:
    """Moderate one text with the shipped heads."""
    return default_moderator().moderate(text)


def openai_response(results: Sequence[ModerationResult], model: str = MODEL_NAME) -> dict:
    """OpenAI's ``/v1/moderations`` response body for ``results`` (one per input)."""
    body = []
    for result in results:
        categories = {key: bool(result.categories.get(key, False)) for key in OPENAI_CATEGORIES}
        scores = {key: float(result.scores.get(key, 0.0)) for key in OPENAI_CATEGORIES}
        body.append(
            {
                "flagged": result.flagged,
                "categories": categories,
                "category_scores": scores,
                "category_applied_input_types": {key: ["text"] for key in OPENAI_CATEGORIES},
            }
        )
    return {"id": f"modr-{uuid.uuid4().hex}", "model": model, "results": body}
