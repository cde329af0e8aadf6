"""Conversational follow-ups: sessions kept in SQLite, and questions rewritten from the history.

A follow-up such as "what about its memory cost?" cannot be retrieved on its own: "its" points
at the previous turn's topic. Before retrieval the question is rewritten into a standalone one
(query rewriting for conversational search, e.g. Yu et al. 2020, "Few-Shot Generative
Conversational Query Rewriting"): by the configured generator when there is one, else by a
rule: pronouns are replaced by the previous question's topic (its content words), and a
follow-up with no pronoun ("and the memory cost?") gets the topic appended.

Sessions live in one SQLite file (stdlib `sqlite3`): every turn's question, the standalone
query it was rewritten to, the answer and its citations. `PRAGMA user_version` holds the schema
version; a file written by a newer schema is refused rather than misread. Version 2 added the
user a session belongs to (version 1 files are upgraded in place, their sessions owned by no
user), so that `delete_user` can erase a user's conversations.

Long-term memory across sessions is `memory.LongTermMemory`: `ask_in_session` recalls what it
holds about the user into the answer, `memory.remember_session` stores a finished session's
summary, and `forget_user` erases a user from both.
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

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    user TEXT NOT NULL DEFAULT ''
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
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(sessions)")}
            if "user" not in columns:  # a version 1 file
                self.db.execute("ALTER TABLE sessions ADD COLUMN user TEXT NOT NULL DEFAULT ''")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("PRAGMA foreign_keys = ON")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sessions(self, user: str | None = None) -> list[str]:
        """Session ids, oldest first; only `user`'s when given."""
        if user is None:
            return [r[0] for r in self.db.execute("SELECT id FROM sessions ORDER BY created, id")]
        return [r[0] for r in self.db.execute("SELECT id FROM sessions WHERE user = ? ORDER BY created, id", (user,))]

    def history(self, session_id: str) -> list[Turn]:
        rows = self.db.execute(
            "SELECT turn, question, query, answer, covered, citations FROM turns WHERE session_id = ? ORDER BY turn",
            (session_id,),
        )
        return [Turn(t, q, qq, a, bool(c), json.loads(cits)) for t, q, qq, a, c, cits in rows]

    def add_turn(self, session_id: str, question: str, query: str, answer: Answer, user: str = "") -> Turn:
        if not session_id:
            raise ValueError("a session needs a non-empty name")
        with self.db:  # one transaction: the session row and its turn land together or not at all
            owner = self.db.execute("SELECT user FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if owner is not None and user and owner[0] != user:
                raise ValueError(f"session {session_id!r} belongs to another user; use another session name")
            self.db.execute(
                "INSERT OR IGNORE INTO sessions (id, created, user) VALUES (?, ?, ?)", (session_id, time.time(), user)
            )
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

    def delete_user(self, user: str) -> int:
        """Delete every session of `user` and their turns; returns how many sessions. Deleted
        content is overwritten (`secure_delete`) and the file vacuumed: without them, SQLite
        leaves deleted rows readable in free pages (secure_delete is off in many builds)."""
        if not user:
            raise ValueError("delete_user needs a non-empty user id")
        ids = self.sessions(user)
        self.db.execute("PRAGMA secure_delete = ON")
        with self.db:
            for session_id in ids:
                self.db.execute("DELETE FROM turns WHERE session_id = ?", (session_id,))
            self.db.execute("DELETE FROM sessions WHERE user = ?", (user,))
        self.db.execute("VACUUM")
        return len(ids)


def ask_in_session(
    store: SessionStore,
    session_id: str,
    question: str,
    answerer,
    generator=None,
    memory=None,
    user: str = "",
    memory_k: int = 3,
) -> Answer:
    """Rewrite the question from the session's history, answer it, and record the turn. With a
    `memory.LongTermMemory` and a `user`, the user's best `memory_k` memories for the question
    are recalled into the answer (shown to a generator; listed in `Answer.memories`)."""
    if memory is not None and not user:
        raise ValueError("recalling long-term memory needs the user's id")
    query = rewrite_followup(question, store.history(session_id), generator)
    memories = memory.context(user, query, memory_k) if memory is not None else []
    answer = answerer.ask(question, query=query, memories=memories)
    store.add_turn(session_id, question, query, answer, user)
    return answer


def forget_user(user: str, memory=None, store: SessionStore | None = None) -> dict[str, int]:
    """Erase `user` from long-term memory and from the session store (either may be None)."""
    deleted = {"memory": 0, "sessions": 0}
    if memory is not None:
        deleted["memory"] = int(memory.delete_user(user))
    if store is not None:
        deleted["sessions"] = store.delete_user(user)
    return deleted
