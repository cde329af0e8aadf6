"""Long-term memory: per-user vector memories recalled by relevance, recency and importance,
persisted atomically, forgotten by age, by id and entirely per user (nothing left on disk), and
session summaries written by a scripted chat model and recalled into a later session."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from test_rag_retrieve import FakeGenerator, HashEmbedder, tiny_chunks

from genforge.rag import HybridIndex, Retriever
from genforge.rag.answer import AnswerConfig, Answerer
from genforge.rag.memory import (
    SECONDS_PER_DAY,
    LongTermMemory,
    MemoryConfig,
    rate_importance,
    remember_session,
    summarize_session,
    user_key,
)
from genforge.rag.sessions import SCHEMA_VERSION, SessionStore, ask_in_session, forget_user

DAY = SECONDS_PER_DAY
NOW = 1_700_000_000.0


def memory_at(root, **config):
    return LongTermMemory(root, HashEmbedder(), MemoryConfig(**config), clock=lambda: NOW)


def files_under(root):
    return [p for p in root.rglob("*") if p.is_file()]


def test_memories_persist_atomically_and_reload(tmp_path):
    memory = memory_at(tmp_path)
    first = memory.remember("ada", "ada prefers answers with python code examples", importance=0.9)
    memory.remember("ada", "ada is learning rust this year", created=NOW - 3 * DAY)
    directory = tmp_path / user_key("ada")
    assert sorted(p.name for p in directory.iterdir()) == ["dense.faiss", "memories.json"]
    assert [p.name for p in tmp_path.iterdir()] == [user_key("ada")]  # no staging directory left over
    again = memory_at(tmp_path)
    assert again.users() == ["ada"] and again.memories("ada") == memory.memories("ada")
    (best,) = again.recall("ada", "python code examples", k=1)
    assert best.memory == first and best.relevance > 0.5 and best.recency == pytest.approx(1.0)
    assert first.id == 1 and first.importance == 0.9 and first.kind == "fact"


def test_recency_decays_with_the_half_life_and_breaks_ties(tmp_path):
    memory = memory_at(tmp_path, half_life_days=10, importance_weight=0.0)
    memory.remember("ada", "ada uses the paged attention engine", created=NOW - 10 * DAY)
    memory.remember("ada", "ada uses the paged attention engine daily", created=NOW - 1 * DAY)
    memory.remember("ada", "ada uses the paged attention engine often", created=NOW - 30 * DAY)
    recalled = memory.recall("ada", "paged attention engine", k=3)
    assert [r.memory.created for r in recalled] == [NOW - DAY, NOW - 10 * DAY, NOW - 30 * DAY]
    assert recalled[1].recency == pytest.approx(0.5) and recalled[2].recency == pytest.approx(0.125)
    for r in recalled:
        assert r.score == pytest.approx(r.relevance + 0.5 * r.recency)


def test_importance_given_rated_or_default_lifts_a_memory(tmp_path):
    rater = FakeGenerator({"Memory: ada is allergic": "Rating: 10", "Memory: ada had": "maybe"})
    memory = LongTermMemory(tmp_path, HashEmbedder(), MemoryConfig(recency_weight=0.0), rater=rater)
    allergy = memory.remember("ada", "ada is allergic to peanuts at dinner")
    lunch = memory.remember("ada", "ada had dinner with peanuts")  # unparseable rating: the default
    given = memory.remember("ada", "ada cooks dinner", importance=0.1)  # given: the rater is not asked
    assert (allergy.importance, lunch.importance, given.importance) == (1.0, 0.5, 0.1)
    assert len(rater.prompts) == 2 and "1 (small talk" in rater.prompts[0]
    recalled = memory.recall("ada", "dinner with peanuts", k=3)
    assert recalled[0].memory == allergy  # as relevant as the lunch memory, and more important
    scores = {r.memory.id: r.score - r.relevance for r in recalled}
    assert scores == pytest.approx({allergy.id: 0.5, lunch.id: 0.25, given.id: 0.05})
    assert rate_importance("x", FakeGenerator({"Rating:": "7"})) == pytest.approx(6 / 9)
    assert rate_importance("x", FakeGenerator({"Rating:": "42"})) is None


def test_irrelevant_memories_are_not_recalled_however_new_or_important(tmp_path):
    memory = memory_at(tmp_path, min_relevance=0.5)
    memory.remember("ada", "knead the dough and bake bread", importance=1.0)
    memory.remember("ada", "lora trains low rank matrices", importance=0.0, created=NOW - 90 * DAY)
    (only,) = memory.recall("ada", "low rank matrices of lora")
    assert only.memory.text.startswith("lora")
    assert memory.recall("nobody", "anything") == []


def test_forgetting_by_age_and_by_id(tmp_path):
    memory = memory_at(tmp_path)
    old = memory.remember("ada", "ada once asked about bm25", created=NOW - 400 * DAY)
    keep = memory.remember("ada", "ada asks about lora", created=NOW - 5 * DAY)
    memory.remember("bob", "bob asked about rrf long ago", created=NOW - 200 * DAY)
    assert memory.forget_older_than(180) == 2  # every user
    assert [m.id for m in memory.memories("ada")] == [keep.id] and memory.memories("bob") == []
    assert memory.forget("ada", [keep.id, old.id, 99]) == 1 and memory.memories("ada") == []
    reloaded = memory_at(tmp_path)
    assert reloaded.memories("ada") == [] and reloaded.recall("ada", "lora") == []
    assert "bm25" not in (tmp_path / user_key("ada") / "memories.json").read_text()


def test_a_user_can_delete_everything_stored_about_them(tmp_path):
    embedder = HashEmbedder()
    retriever = Retriever(HybridIndex.build(tiny_chunks(), embedder), embedder)
    answerer = Answerer(retriever, config=AnswerConfig(min_confidence=0.2))
    memory = memory_at(tmp_path / "memory")
    secret = "zanzibar-7731 is carol's private project codename"
    memory.remember("carol", secret)
    memory.remember("dave", "dave studies bm25 scoring")
    db = tmp_path / "sessions.sqlite"
    with SessionStore(db) as store:
        store.db.execute("PRAGMA secure_delete = OFF")  # as many SQLite builds ship
        ask_in_session(store, "carol-1", "how does paged attention work for zanzibar-7731?", answerer, user="carol")
        ask_in_session(store, "dave-1", "how does bm25 score documents?", answerer, user="dave")
        with pytest.raises(ValueError, match="another user"):
            ask_in_session(store, "carol-1", "what is lora?", answerer, user="dave")
        assert forget_user("carol", memory, store) == {"memory": 1, "sessions": 1}
        assert store.sessions() == ["dave-1"] and store.sessions("carol") == []
    # Nothing of carol's is left on disk: no memory directory, no text in any file.
    assert not (tmp_path / "memory" / user_key("carol")).exists()
    for path in files_under(tmp_path):
        data = path.read_bytes()
        assert b"zanzibar" not in data and b"carol" not in data, path
    assert memory_at(tmp_path / "memory").users() == ["dave"]
    assert forget_user("carol", memory) == {"memory": 0, "sessions": 0}


def test_session_summaries_are_recalled_into_a_later_session(tmp_path):
    embedder = HashEmbedder()
    retriever = Retriever(HybridIndex.build(tiny_chunks(), embedder), embedder)
    summarizer = FakeGenerator({"Summary:": "Ada asked how paged attention stores the key value cache in blocks."})
    generator = FakeGenerator({"Question:": "Paged attention stores the key value cache in fixed size blocks [1]."})
    answerer = Answerer(retriever, generator, AnswerConfig(mode="generative", k=2, min_confidence=0.2))
    memory = LongTermMemory(tmp_path / "memory", embedder)
    with SessionStore(tmp_path / "s.sqlite") as store:
        ask_in_session(store, "monday", "how does paged attention store the key value cache?", answerer, user="ada")
        summary = remember_session(memory, "ada", store, "monday", summarizer, importance=0.8)
        assert summary.kind == "summary" and summary.session == "monday" and summary.importance == 0.8
        assert "User: how does paged attention store" in summarizer.prompts[0]
        answer = ask_in_session(
            store, "friday", "what maps paged attention blocks to sequences?", answerer, memory=memory, user="ada"
        )
        with pytest.raises(ValueError, match="no turns"):
            summarize_session(store.history("never"), summarizer)
        with pytest.raises(ValueError, match="user's id"):
            ask_in_session(store, "friday", "x", answerer, memory=memory)
    assert answer.memories == [summary.text]
    assert "What you remember about the user (do not cite):\n- Ada asked how" in generator.prompts[-1]
    assert answer.to_dict()["memories"] == [summary.text]


def test_version_1_session_files_are_upgraded(tmp_path):
    path = tmp_path / "v1.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, created REAL NOT NULL);"
        "CREATE TABLE turns (session_id TEXT NOT NULL, turn INTEGER NOT NULL, question TEXT NOT NULL, "
        "query TEXT NOT NULL, answer TEXT NOT NULL, covered INTEGER NOT NULL, citations TEXT NOT NULL, "
        "created REAL NOT NULL, PRIMARY KEY (session_id, turn));"
        "INSERT INTO sessions VALUES ('old', 1.0); PRAGMA user_version = 1;"
    )
    db.commit()
    db.close()
    with SessionStore(path) as store:
        assert store.sessions() == ["old"] and store.sessions("") == ["old"]
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


def test_bad_input_is_refused(tmp_path):
    memory = memory_at(tmp_path)
    with pytest.raises(ValueError, match="accepted: fact, summary"):
        memory.remember("ada", "x", kind="dream")
    with pytest.raises(ValueError, match="importance"):
        memory.remember("ada", "x", importance=3)
    with pytest.raises(ValueError, match="non-empty"):
        memory.remember(" ", "x")
    with pytest.raises(ValueError, match="half_life"):
        MemoryConfig(half_life_days=0)
    with pytest.raises(ValueError, match="weights"):
        MemoryConfig(relevance_weight=0, recency_weight=0, importance_weight=0)
    memory.remember("ada", "ada likes tea")

    class OtherEmbedder(HashEmbedder):
        name = "another-model"

    with pytest.raises(ValueError, match="embedded with 'hash-bow-64'"):
        LongTermMemory(tmp_path, OtherEmbedder()).memories("ada")
    assert np.isclose(memory.recall("ada", "tea")[0].recency, 1.0)
