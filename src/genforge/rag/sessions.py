"""Conversational follow-ups: sessions kept in SQLite, and questions rewritten from the history.

A follow-up such as "what about its memory cost?" cannot be retrieved on its own: "its" points
at the previous turn's topic. Before retrieval the question is rewritten into a standalone one
(query rewriting for conversational search, e.g. Yu et al. 2020, "Few-Shot Generative
Conversational Query Rewriting"): by the configured generator when there is one, else by a
rule: pronouns are replaced by the previous question's topic (its content words), and a
follow-up with no pronoun ("and the memory cost?") gets the topic appended.

Sessions live in one SQLite file (stdlib `sqlite3`): every turn's question, the standalone
query it was rewritten to, the answer and its citations. `PRAGMA user_version` holds the schema
version; a file written by a newer schema is refused rather than misread.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .answer import Answer, content_words

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    turn INTEGER NOT NULL,
    question TEXT NOT NULL,
    query TEXT NOT NULL,
    answer TEXT NOT NULL,
    covered INTEGER NOT NULL,
    citations TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (session_id, turn)
);
"""
# Words of a question that say what is asked, not what it is about.
_GENERIC = frozenset(
    [
        "work",
        "works",
        "working",
        "explain",
        "describe",
        "difference",
        "differ",
        "use",
        "used",
        "using",
        "mean",
        "means",
        "meaning",
        "define",
        "definition",
        "tell",
        "give",
        "example",
        "examples",
        "role",
        "purpose",
        "compare",
        "versus",
        "vs",
        "help",
        "helps",
        "good",
        "bad",
        "better",
        "best",
        "main",
        "key",
        "idea",
        "ideas",
        "happen",
        "happens",
    ]
)
_PRONOUN = re.compile(r"\b(its|their|it|they|them)\b", re.IGNORECASE)
_FOLLOWUP_START = re.compile(r"^\s*(what about|how about|and|also|what of|same for|and what about)\b", re.IGNORECASE)
_DEMONSTRATIVE = re.compile(r"\b(this|that|these|those)\b", re.IGNORECASE)

REWRITE_PROMPT = """Rewrite the last question of this conversation as a standalone question that can be understood
without the conversation. Reply with the rewritten question only.

{history}
Last question: {question}
Standalone question:"""


@dataclass
class Turn:
    turn: int
    question: str
    query: str
    answer: str
    covered: bool
    citations: list[dict]


def topic_of(text: str) -> str:
    """The content words of a question in their order, generic question words removed."""
    return " ".join(w for w in content_words(text) if w not in _GENERIC)


def rewrite_followup(question: str, history: Sequence[Turn], generator=None, max_tokens: int = 64) -> str:
    """A standalone version of `question` given the earlier turns (oldest first)."""
    question = question.strip()
    if not history:
        return question
    if generator is not None:
        shown = "\n".join(f"User: {t.question}\nAssistant: {t.answer[:300]}" for t in history[-3:])
        reply = generator.complete(REWRITE_PROMPT.format(history=shown, question=question), max_tokens=max_tokens)
        lines = [ln.strip().strip('"') for ln in reply.strip().splitlines() if ln.strip()]
        return lines[0] if lines else question
    topic = topic_of(history[-1].query)
    if not topic:
        return question
    asked = set(content_words(question))
    if set(topic.split()) <= asked:
        return question  # already names the topic
    replaced = _PRONOUN.sub(
        lambda m: f"{topic}'s" if m.group(1).lower() in ("its", "their") else topic, question, count=1
    )
    if replaced != question:
        return replaced
    if _FOLLOWUP_START.search(question) or _DEMONSTRATIVE.search(question):
        return f"{question.rstrip('?').rstrip()} ({topic})?" if question.endswith("?") else f"{question} ({topic})"
    return question


class SessionStore:
    """Conversation turns in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path} is not a genforge session database (SQLite said: {err})") from None
        if version > SCHEMA_VERSION:
            self.db.close()
            raise ValueError(
                f"{self.path} uses session schema version {version}; this genforge reads up to "
                f"{SCHEMA_VERSION}. Upgrade genforge or use another --sessions file."
            )
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version == 0 and tables - {"sessions", "turns"}:
            self.db.close()
            raise ValueError(
                f"{self.path} is an SQLite file of something else (tables {sorted(tables)}); "
                "give a new or existing genforge session file"
            )
        with self.db:
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("PRAGMA foreign_keys = ON")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sessions(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM sessions ORDER BY created, id")]

    def history(self, session_id: str) -> list[Turn]:
        rows = self.db.execute(
            "SELECT turn, question, query, answer, covered, citations FROM turns WHERE session_id = ? ORDER BY turn",
            (session_id,),
        )
        return [Turn(t, q, qq, a, bool(c), json.loads(cits)) for t, q, qq, a, c, cits in rows]

    def add_turn(self, session_id: str, question: str, query: str, answer: Answer) -> Turn:
        if not session_id:
            raise ValueError("a session needs a non-empty name")
        with self.db:  # one transaction: the session row and its turn land together or not at all
            self.db.execute("INSERT OR IGNORE INTO sessions (id, created) VALUES (?, ?)", (session_id, time.time()))
            turn = self.db.execute(
                "SELECT COALESCE(MAX(turn), 0) + 1 FROM turns WHERE session_id = ?", (session_id,)
            ).fetchone()[0]
            citations = [
                {"number": c.number, "source": c.source, "start": c.start, "end": c.end, "title": c.title}
                for c in answer.citations
            ]
            self.db.execute(
                "INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session_id,
                    turn,
                    question,
                    query,
                    answer.text,
                    int(answer.covered),
                    json.dumps(citations),
                    time.time(),
                ),
            )
        return Turn(turn, question, query, answer.text, answer.covered, citations)

    def delete(self, session_id: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM turns WHERE session_id = ?", (session_id,))
            self.db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))


def ask_in_session(store: SessionStore, session_id: str, question: str, answerer, generator=None) -> Answer:
    """Rewrite the question from the session's history, answer it, and record the turn."""
    query = rewrite_followup(question, store.history(session_id), generator)
    answer = answerer.ask(question, query=query)
    store.add_turn(session_id, question, query, answer)
    return answer
