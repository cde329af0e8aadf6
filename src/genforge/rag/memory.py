"""Long-term conversational memory: facts and session summaries kept per user as a vector
memory, and recalled into later sessions.

What is recalled is scored as in Generative Agents (Park et al. 2023, "Generative Agents:
Interactive Simulacra of Human Behavior"): a weighted sum of

- relevance: the cosine between the query and the memory (the RAG embedder's vectors),
- recency: exponential decay with a half-life, 0.5 ** (age / half_life), age since the memory
  was stored (recalling it does not refresh it, so a read never writes to disk),
- importance: in [0, 1], given when the memory is stored, else rated by a chat model on a
  1-10 scale as in the paper, else a default.

A memory less relevant than `min_relevance` is not recalled however new or important it is:
the weights rank what is about the question, they do not bring in what is not.

Forgetting: memories older than an age (`forget_older_than`), single memories by id, and
everything stored about a user (`delete_user`, the right to erasure): each user's memories live
in their own directory, so deleting it leaves nothing of theirs on disk. The directory is named
by a hash of the user id (any string is a valid id, and the name is not spelled in the path); it
holds `memories.json` and a FAISS flat index (`stores.FaissStore`) over the memories' ids,
written together into a staged directory and swapped in atomically.

Session summaries: when a conversation (`sessions.SessionStore`) ends, a chat model summarises
its turns and the summary is stored as a memory of kind "summary" (`remember_session`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import staged_directory
from .stores import FaissStore

MEMORY_KINDS = ("fact", "summary")
FORMAT_VERSION = 1
SECONDS_PER_DAY = 86400.0

IMPORTANCE_PROMPT = """How important is the following memory about a user for helping them in later conversations?
Rate it from 1 (small talk, forgettable) to 10 (a lasting fact, preference or goal of the user).
Reply with the number only.

Memory: {text}
Rating:"""

SUMMARY_PROMPT = """Summarise this conversation for a memory of the user: what they asked about, what they
said about themselves (preferences, goals, what they know) and what was concluded.
Write at most three sentences.

{conversation}
Summary:"""


@dataclass
class Memory:
    id: int
    text: str
    kind: str  # one of MEMORY_KINDS
    importance: float  # in [0, 1]
    created: float  # Unix time
    session: str = ""  # the session it came from, if any


@dataclass
class Recalled:
    memory: Memory
    score: float
    relevance: float
    recency: float


@dataclass
class MemoryConfig:
    half_life_days: float = 30.0
    relevance_weight: float = 1.0
    recency_weight: float = 0.5
    importance_weight: float = 0.5
    min_relevance: float = 0.2
    default_importance: float = 0.5  # when neither given nor rated

    def __post_init__(self) -> None:
        if not self.half_life_days > 0:
            raise ValueError(f"half_life_days must be positive, got {self.half_life_days}")
        weights = (self.relevance_weight, self.recency_weight, self.importance_weight)
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError(f"memory weights must be >= 0 and not all 0, got {weights}")
        if not 0.0 <= self.default_importance <= 1.0:
            raise ValueError(f"default_importance must be in [0, 1], got {self.default_importance}")


def user_key(user: str) -> str:
    """The directory name of a user's memories."""
    if not isinstance(user, str) or not user.strip():
        raise ValueError("a user id must be a non-empty string")
    return hashlib.sha256(user.encode("utf-8")).hexdigest()[:32]


def rate_importance(text: str, chat_model, max_tokens: int = 8) -> float | None:
    """A chat model's 1-10 importance rating mapped to [0, 1]; None when its reply holds no
    rating in range (the caller then uses its default)."""
    reply = chat_model.complete(IMPORTANCE_PROMPT.format(text=text), max_tokens=max_tokens)
    found = re.search(r"\d+(?:\.\d+)?", reply)
    if not found or not 1.0 <= float(found.group()) <= 10.0:
        return None
    return (float(found.group()) - 1.0) / 9.0


class _UserMemory:
    """One user's memories and their vector index, as loaded in this process."""

    def __init__(self, user: str, memories: list[Memory], store: FaissStore, next_id: int) -> None:
        self.user, self.memories, self.store, self.next_id = user, memories, store, next_id


class LongTermMemory:
    """Per-user vector memory under `root` (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        embedder,
        config: MemoryConfig | None = None,
        rater=None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root, self.embedder = Path(root), embedder
        self.config = config or MemoryConfig()
        self.rater, self.clock = rater, clock  # rater: a chat model that rates importance
        self._loaded: dict[str, _UserMemory] = {}

    # -- storage ---------------------------------------------------------------------------

    def _directory(self, user: str) -> Path:
        return self.root / user_key(user)

    def _load(self, user: str) -> _UserMemory:
        key = user_key(user)
        if key in self._loaded:
            return self._loaded[key]
        directory = self.root / key
        if not (directory / "memories.json").is_file():
            state = _UserMemory(
                user, [], FaissStore.create(np.zeros((0, self.embedder.dimension)), np.zeros(0), "flat"), 1
            )
        else:
            data = json.loads((directory / "memories.json").read_text(encoding="utf-8"))
            if data.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(
                    f"{directory} holds memory format {data['format_version']}; this genforge reads up to {FORMAT_VERSION}"
                )
            if data["embedder"] != self.embedder.name:
                raise ValueError(
                    f"{directory} was embedded with {data['embedder']!r}, not {self.embedder.name!r}: "
                    "open the memory with the embedder it was built with"
                )
            store = FaissStore.load(directory, {"kind": "flat"})
            state = _UserMemory(data["user"], [Memory(**m) for m in data["memories"]], store, data["next_id"])
        self._loaded[key] = state
        return state

    def _save(self, state: _UserMemory) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with staged_directory(self._directory(state.user)) as staging:
            state.store.save(staging)
            data = {
                "format_version": FORMAT_VERSION,
                "user": state.user,
                "embedder": self.embedder.name,
                "next_id": state.next_id,
                "memories": [asdict(m) for m in state.memories],
            }
            (staging / "memories.json").write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")

    def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.asarray(self.embedder.embed(list(texts)), np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)

    # -- writing ---------------------------------------------------------------------------

    def remember(
        self,
        user: str,
        text: str,
        kind: str = "fact",
        importance: float | None = None,
        session: str = "",
        created: float | None = None,
    ) -> Memory:
        """Store `text` for `user`; importance given, else rated by the rater model, else the default."""
        if kind not in MEMORY_KINDS:
            raise ValueError(f"memory kind {kind!r} is not supported; accepted: {', '.join(MEMORY_KINDS)}")
        if not text or not text.strip():
            raise ValueError("a memory needs non-empty text")
        if importance is not None and not 0.0 <= importance <= 1.0:
            raise ValueError(f"importance must be in [0, 1], got {importance}")
        state = self._load(user)
        if importance is None and self.rater is not None:
            importance = rate_importance(text, self.rater)
        if importance is None:
            importance = self.config.default_importance
        memory = Memory(
            state.next_id, text.strip(), kind, float(importance), self.clock() if created is None else created, session
        )
        state.store.add(np.array([memory.id], np.int64), self._vectors([memory.text]), ())
        state.memories.append(memory)
        state.next_id += 1
        self._save(state)
        return memory

    def forget(self, user: str, ids: Sequence[int]) -> int:
        """Delete memories by id; returns how many were deleted."""
        state = self._load(user)
        doomed = {int(i) for i in ids} & {m.id for m in state.memories}
        if doomed:
            state.store.remove(np.array(sorted(doomed), np.int64))
            state.memories = [m for m in state.memories if m.id not in doomed]
            self._save(state)
        return len(doomed)

    def forget_older_than(self, max_age_days: float, user: str | None = None, now: float | None = None) -> int:
        """Delete memories stored more than `max_age_days` ago, for one user or all; returns the count."""
        if not max_age_days >= 0:
            raise ValueError(f"max_age_days must be >= 0, got {max_age_days}")
        now = self.clock() if now is None else now
        cutoff = now - max_age_days * SECONDS_PER_DAY
        removed = 0
        for name in [user] if user is not None else self.users():
            old = [m.id for m in self._load(name).memories if m.created < cutoff]
            removed += self.forget(name, old)
        return removed

    def delete_user(self, user: str) -> bool:
        """Delete everything stored about `user`: their directory, index and memories. Returns
        whether there was anything."""
        key = user_key(user)
        self._loaded.pop(key, None)
        existed = False
        # A staged write interrupted by a crash can leave a sibling named after the directory.
        for path in [self.root / key, *self.root.glob(f".{key}.*")] if self.root.is_dir() else []:
            if path.is_dir():
                existed = True
                shutil.rmtree(path)
            elif path.exists():
                existed = True
                path.unlink()
        return existed

    # -- reading ---------------------------------------------------------------------------

    def users(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for path in sorted(self.root.iterdir()):
            if (path / "memories.json").is_file():
                names.append(json.loads((path / "memories.json").read_text(encoding="utf-8"))["user"])
        return names

    def memories(self, user: str) -> list[Memory]:
        return list(self._load(user).memories)

    def recall(self, user: str, query: str, k: int = 5, now: float | None = None) -> list[Recalled]:
        """The `k` memories of `user` scoring best for `query`, best first."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if not query or not query.strip():
            raise ValueError("the query is empty")
        state = self._load(user)
        if not state.memories:
            return []
        cfg = self.config
        now = self.clock() if now is None else now
        by_id = {m.id: m for m in state.memories}
        # Recency and importance can lift a less similar memory, so look past the top k by cosine.
        hits = state.store.search(self._vectors([query])[0], max(10 * k, 100), None, None)
        recalled = []
        for memory_id, relevance in hits:
            if relevance < cfg.min_relevance:
                continue
            memory = by_id[memory_id]
            age_days = max(0.0, now - memory.created) / SECONDS_PER_DAY
            recency = 0.5 ** (age_days / cfg.half_life_days)
            score = (
                cfg.relevance_weight * relevance
                + cfg.recency_weight * recency
                + cfg.importance_weight * memory.importance
            )
            recalled.append(Recalled(memory, score, relevance, recency))
        recalled.sort(key=lambda r: (-r.score, -r.memory.created))
        return recalled[:k]

    def context(self, user: str, query: str, k: int = 3) -> list[str]:
        """The texts of the best `k` memories: what `Answerer.ask(memories=...)` takes."""
        return [r.memory.text for r in self.recall(user, query, k)]


def summarize_session(turns: Sequence, chat_model, max_tokens: int = 128) -> str:
    """A chat model's summary of a session's turns (`sessions.Turn`s, oldest first)."""
    if not turns:
        raise ValueError("the session has no turns to summarise")
    conversation = "\n".join(f"User: {t.question}\nAssistant: {t.answer[:400]}" for t in turns)
    summary = chat_model.complete(SUMMARY_PROMPT.format(conversation=conversation), max_tokens=max_tokens).strip()
    if not summary:
        raise ValueError("the model wrote an empty summary")
    return summary


def remember_session(
    memory: LongTermMemory, user: str, store, session_id: str, chat_model, importance: float | None = None
) -> Memory:
    """Summarise a finished session of `store` (a `SessionStore`) and store the summary for `user`."""
    summary = summarize_session(store.history(session_id), chat_model)
    return memory.remember(user, summary, kind="summary", importance=importance, session=session_id)
