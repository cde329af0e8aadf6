"""Conversational sessions: SQLite storage with a schema version, and follow-up rewriting."""

from __future__ import annotations

import sqlite3

import pytest
from test_rag_retrieve import FakeGenerator, HashEmbedder, tiny_chunks

from genforge.rag import HybridIndex, Retriever
from genforge.rag.answer import AnswerConfig, Answerer
from genforge.rag.sessions import (
    SCHEMA_VERSION,
    SessionStore,
    Turn,
    ask_in_session,
    rewrite_followup,
    topic_of,
)


def turn(question, query=None):
    return Turn(1, question, query or question, "answer", True, [])


def test_topic_drops_question_words():
    assert topic_of("how does paged attention work?") == "paged attention"


@pytest.mark.parametrize(
    "follow_up, expected",
    [
        ("what about its memory cost?", "what about paged attention's memory cost?"),
        ("is it used in vLLM?", "is paged attention used in vLLM?"),
        ("and the memory cost?", "and the memory cost (paged attention)?"),
        ("what is BM25?", "what is BM25?"),  # a new, standalone question stays as it is
        ("does paged attention waste memory?", "does paged attention waste memory?"),
    ],
)
def test_follow_ups_are_rewritten_from_the_previous_topic(follow_up, expected):
    assert rewrite_followup(follow_up, [turn("how does paged attention work?")]) == expected
    assert rewrite_followup(follow_up, []) == follow_up


def test_generator_rewrites_with_the_history():
    generator = FakeGenerator({"Standalone question:": "What is the memory cost of paged attention?\n"})
    out = rewrite_followup("what about its memory cost?", [turn("how does paged attention work?")], generator)
    assert out == "What is the memory cost of paged attention?"
    assert "User: how does paged attention work?" in generator.prompts[0]


def test_turns_persist_with_a_schema_version(tmp_path):
    embedder = HashEmbedder()
    answerer = Answerer(
        Retriever(HybridIndex.build(tiny_chunks(), embedder), embedder), config=AnswerConfig(min_confidence=0.2)
    )
    path = tmp_path / "sessions.sqlite"
    with SessionStore(path) as store:
        first = ask_in_session(store, "s1", "how does paged attention work?", answerer)
        second = ask_in_session(store, "s1", "what about its memory blocks?", answerer)
        ask_in_session(store, "other", "what is LoRA?", answerer)
    assert first.covered and second.query == "what about paged attention's memory blocks?"
    with SessionStore(path) as store:
        history = store.history("s1")
        assert [t.turn for t in history] == [1, 2] and store.sessions() == ["s1", "other"]
        assert history[1].query == second.query and history[1].answer == second.text
        assert history[1].citations and history[1].citations[0]["source"] == "paged.md"
        store.delete("other")
        assert store.sessions() == ["s1"]
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_foreign_or_newer_files_are_refused(tmp_path):
    newer = tmp_path / "newer.sqlite"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="schema version"):
        SessionStore(newer)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE invoices (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="something else"):
        SessionStore(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a genforge session database"):
        SessionStore(junk)
    with SessionStore(tmp_path / "ok.sqlite") as store, pytest.raises(ValueError, match="non-empty name"):
        from genforge.rag.answer import Answer

        store.add_turn("", "q", "q", Answer("q", [], [], False, 0.0, "extractive"))
