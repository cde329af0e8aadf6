"""Grounded answers with numbered citations, checked sentence by sentence against their sources.

Two ways to answer from retrieved chunks:

- Extractive (the default, no language model): the answer is made of sentences taken from the
  top chunks, chosen by maximal marginal relevance (Carbonell & Goldstein 1998) between their
  similarity to the question and their redundancy with sentences already chosen, each carrying
  a citation [n] to the chunk (source path, character offsets, heading) it was taken from.
- Generative: the chunks are numbered in a prompt that asks for [n] citations (as in
  Gao et al. 2023, "Enabling Large Language Models to Generate Text with Citations", ALCE), and
  any `expand.Generator` writes the answer: a genforge model or an OpenAI-compatible endpoint.

Whatever wrote it, every answer sentence is checked against the chunks it cites. Its support
score is the mean of a semantic part, the best cosine between the sentence and the cited
chunk's sentences (MiniLM embeddings), and a lexical part, the share of the sentence's content
words that occur in the chunk (a cheap guard against a fluent sentence with the wrong facts).
A sentence scoring under `support_threshold`, or citing nothing or a passage that was not
given, is flagged as unsupported.

What happens to unsupported sentences is a policy (`AnswerConfig.unsupported`): "flag" keeps
them, marked; "drop" removes them; "extractive" replaces the generated answer by an extractive
one quoted from the passages that best support what the generator wrote (a corrective step in
the spirit of RARR, Gao et al. 2023, "Attributed Text Generation via Post-hoc Research and
Revision", without a second model). `Answer.unsupported_action` says which happened.

Retrieved passages can carry instructions meant for the model (indirect prompt injection,
Greshake et al. 2023). With `AnswerConfig.injected_passages` set, each retrieved passage is
screened (`safety.injection.screen_chunks`) and a flagged one is kept and recorded ("flag"),
removed before answering ("drop"), or fenced as quoted data in the generative prompt ("quote");
`Answer.injected` lists what was found and done.

When retrieval confidence (the best cosine between the question and a retrieved chunk) is under
`min_confidence`, the answer says the sources do not cover the question instead of guessing.
The default threshold is calibrated on the seeds evaluation queries against off-topic
questions (docs/rag.md gives the numbers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .chunking import Chunk, sentence_spans
from .retrieve import Hit, Retriever, mmr

NOT_COVERED = "The indexed sources do not cover this question, so I will not guess an answer."
# Best question-chunk cosine under which an answer is refused: between on-topic and off-topic
# questions' best cosines on the seeds corpus (docs/rag.md, "Not covered").
DEFAULT_MIN_CONFIDENCE = 0.27
DEFAULT_SUPPORT_THRESHOLD = 0.5
ANSWER_MODES = ("extractive", "generative")
UNSUPPORTED_POLICIES = ("flag", "drop", "extractive")
INJECTED_PASSAGE_POLICIES = ("off", "flag", "drop", "quote")
# What `Answer.unsupported_action` can say: nothing to do, or which policy acted.
UNSUPPORTED_ACTIONS = ("none", "flagged", "dropped", "extractive_fallback")

GENERATIVE_PROMPT = """Answer the question using only the numbered passages below.
After every sentence, cite the passage or passages that support it as [1], [2], etc.
If the passages do not contain the answer, reply exactly: NOT COVERED

{passages}

Question: {question}
Answer:"""

_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "why",
        "how",
        "do",
        "does",
        "did",
        "can",
        "could",
        "should",
        "would",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "not",
        "no",
        "yes",
        "i",
        "you",
        "he",
        "she",
        "we",
        "they",
        "them",
        "their",
        "our",
        "your",
        "my",
        "me",
        "his",
        "her",
        "than",
        "then",
        "so",
        "such",
        "also",
        "very",
        "into",
        "out",
        "over",
        "under",
        "about",
        "above",
        "below",
        "between",
        "through",
        "during",
        "before",
        "after",
        "again",
        "further",
        "once",
        "all",
        "any",
        "both",
        "each",
        "few",
        "more",
        "most",
        "other",
        "some",
        "same",
        "only",
        "own",
        "too",
        "just",
        "s",
        "t",
        "don",
        "now",
        "q",
        "a",
        "answer",
        "question",
    ]
)
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_CITE = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")
# Labels and list markers that open a unit of a chunk but are no part of what it says.
_LEAD = re.compile(
    r"(?:\s|\d+[.)](?=\s|$)|[-*•>#]+(?=\s)|\*\*(?:Q|A|Question|Answer)\s*:?\*\*:?|(?:Q|A|Question|Answer)\s*:)+"
)
# Abbreviations after which a full stop does not end a sentence.
_ABBREVIATION = re.compile(r"(?:\bet al|\be\.g|\bi\.e|\bvs|\bcf|\bFig|\bEq|\bSec)\.[\"')\]]*$")


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1]


@dataclass
class Citation:
    """Where a numbered citation points: a chunk, by source path, offsets and heading."""

    number: int
    chunk_id: str
    source: str
    start: int
    end: int
    title: str = ""
    heading_path: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, number: int, chunk: Chunk) -> Citation:
        return cls(number, chunk.chunk_id, chunk.source, chunk.start, chunk.end, chunk.title, list(chunk.heading_path))

    def label(self) -> str:
        heading = " > ".join(
            self.heading_path + ([self.title] if self.title and self.title not in self.heading_path else [])
        )
        return f"[{self.number}] {self.source}:{self.start}-{self.end}" + (f" — {heading}" if heading else "")


@dataclass
class AnswerSentence:
    text: str
    citations: list[int]
    support: float  # best support over its citations (0 when it cites nothing usable)
    supported: bool
    citation_support: dict[int, float] = field(default_factory=dict)  # per cited passage
    problem: str = ""  # why it is flagged: "", "no citation", "cites an unknown passage", "low support"
    span: tuple[int, int] | None = None  # extractive: offsets in the cited chunk's document


@dataclass
class Answer:
    question: str
    sentences: list[AnswerSentence]
    citations: list[Citation]  # the passages cited, by number
    covered: bool
    confidence: float
    mode: str
    query: str = ""  # what was searched (a follow-up's rewrite; else the question)
    support_threshold: float = DEFAULT_SUPPORT_THRESHOLD  # the checker's, for citation precision
    unsupported_action: str = "none"  # one of UNSUPPORTED_ACTIONS
    removed: list[AnswerSentence] = field(default_factory=list)  # generated sentences dropped or replaced
    memories: list[str] = field(default_factory=list)  # long-term memories shown to the generator
    injected: list[dict] = field(default_factory=list)  # passages the injection screen flagged, and what was done

    @property
    def text(self) -> str:
        if not self.covered:
            return NOT_COVERED
        parts = []
        for s in self.sentences:
            cites = "".join(f"[{n}]" for n in s.citations)
            parts.append(f"{s.text} {cites}".strip() + ("" if s.supported else " (unsupported)"))
        return " ".join(parts)

    @property
    def unsupported(self) -> list[AnswerSentence]:
        return [s for s in self.sentences if not s.supported]

    def render(self) -> str:
        """The answer followed by its numbered sources."""
        if not self.covered:
            return NOT_COVERED
        return self.text + "\n\nSources:\n" + "\n".join(c.label() for c in self.citations)

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "query": self.query,
            "answer": self.text,
            "covered": self.covered,
            "confidence": self.confidence,
            "mode": self.mode,
            "unsupported_action": self.unsupported_action,
            "sentences": [asdict(s) for s in self.sentences],
            "citations": [asdict(c) for c in self.citations],
            "removed_sentences": [asdict(s) for s in self.removed],
            "memories": list(self.memories),
            "injected_passages": list(self.injected),
        }


_LIST_LINE = re.compile(r"[ \t]*(?:[-*•>|#]|\d+[.)]\s|(?:Q|A|Question|Answer)\s*:|\*\*)")


def chunk_units(chunk: Chunk) -> list[tuple[int, int]]:
    """(start, end) offsets, within the chunk's text, of the prose units of a chunk: its
    sentences, also cut where a line break starts a list item or label or follows a question or a
    colon (Q&A answers and lists are often lines without a full stop), but not where Markdown
    merely wraps a long line. Labels such as 'A:' are stripped; headings, table rows and code
    are left out (they are not claims an answer can quote)."""
    text = chunk.text
    units = []
    spans: list[tuple[int, int]] = []
    for s, e in sentence_spans(text):
        # "Kwon et al. 2023" is one sentence: rejoin a span that ends in an abbreviation.
        if spans and _ABBREVIATION.search(text, spans[-1][0], spans[-1][1]) and "\n\n" not in text[spans[-1][1] : s]:
            spans[-1] = (spans[-1][0], e)
        else:
            spans.append((s, e))
    for s, e in spans:
        cuts, pos = [s], s
        for line in text[s:e].split("\n")[:-1]:
            pos += len(line) + 1
            if (
                _LIST_LINE.match(text, pos)
                or line.rstrip().endswith(("?", ":"))
                or line.lstrip().startswith(("#", "|"))
            ):
                cuts.append(pos)
        cuts.append(e)
        for us, ue in zip(cuts, cuts[1:]):
            first = text[us:ue].lstrip()
            if first.startswith(("#", "|", "```")) or text.count("```", 0, us) % 2 == 1 or first.count("|") >= 2:
                continue
            lead = _LEAD.match(text, us, ue)
            if lead:
                us = lead.end()
            while ue > us and text[ue - 1].isspace():
                ue -= 1
            if ue > us:
                units.append((us, ue))
    return units


class SupportChecker:
    """Scores how well a chunk supports a sentence: mean of the best sentence-level cosine and
    the share of the sentence's content words found in the chunk."""

    def __init__(self, embedder, threshold: float = DEFAULT_SUPPORT_THRESHOLD) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"support threshold must be in [0, 1], got {threshold}")
        self.embedder, self.threshold = embedder, threshold
        self._vectors: dict[str, np.ndarray] = {}

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        todo = sorted({t for t in texts if t not in self._vectors})
        if todo:
            if len(self._vectors) > 20000:
                self._vectors.clear()
            fresh = np.asarray(self.embedder.embed(todo), np.float64)
            fresh /= np.linalg.norm(fresh, axis=1, keepdims=True).clip(min=1e-12)
            self._vectors.update(zip(todo, fresh))
        if not texts:
            return np.zeros((0, self.embedder.dimension))
        return np.stack([self._vectors[t] for t in texts])

    def score(self, sentence: str, chunk: Chunk) -> float:
        units = [chunk.text[s:e] for s, e in chunk_units(chunk)] or [chunk.text]
        sentence_vector = self.vectors([sentence])[0]
        semantic = float(max(0.0, (self.vectors(units) @ sentence_vector).max()))
        words = content_words(sentence)
        chunk_words = set(content_words(chunk.text))
        lexical = sum(w in chunk_words for w in words) / len(words) if words else 0.0
        return 0.5 * min(semantic, 1.0) + 0.5 * lexical

    def check(self, text: str, cited: Sequence[int], passages: dict[int, Chunk], span=None) -> AnswerSentence:
        """An `AnswerSentence` for `text` citing passage numbers `cited`, scored and flagged."""
        known = [n for n in cited if n in passages]
        per = {n: self.score(text, passages[n]) for n in known}
        best = max(per.values(), default=0.0)
        problem = (
            "no citation"
            if not cited
            else "cites an unknown passage"
            if len(known) < len(cited)
            else "low support"
            if best < self.threshold
            else ""
        )
        return AnswerSentence(text, list(cited), best, not problem, per, problem, span)


@dataclass
class AnswerConfig:
    k: int = 5  # passages retrieved (and shown to a generator)
    mode: str = "extractive"
    max_sentences: int = 3
    mmr_lambda: float = 0.7
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    support_threshold: float = DEFAULT_SUPPORT_THRESHOLD
    max_tokens: int = 256  # generative answers
    passage_chars: int = 1200  # of each passage in the generative prompt
    search: dict = field(default_factory=dict)  # extra Retriever.search options (fusion, rerank, ...)
    unsupported: str = "flag"  # what to do with unsupported sentences: one of UNSUPPORTED_POLICIES
    fallback_passages: int = 2  # passages the extractive fallback quotes from
    injected_passages: str = "off"  # passages carrying instructions: one of INJECTED_PASSAGE_POLICIES

    def __post_init__(self) -> None:
        if self.mode not in ANSWER_MODES:
            raise ValueError(f"answer mode {self.mode!r} is not supported; accepted: {', '.join(ANSWER_MODES)}")
        if self.k <= 0 or self.max_sentences <= 0:
            raise ValueError(
                f"k and max_sentences must be positive, got k={self.k}, max_sentences={self.max_sentences}"
            )
        if not 0.0 <= self.mmr_lambda <= 1.0:
            raise ValueError(f"mmr_lambda must be in [0, 1], got {self.mmr_lambda}")
        if self.unsupported not in UNSUPPORTED_POLICIES:
            raise ValueError(
                f"unsupported-sentence policy {self.unsupported!r} is not supported; "
                f"accepted: {', '.join(UNSUPPORTED_POLICIES)}"
            )
        if self.injected_passages not in INJECTED_PASSAGE_POLICIES:
            raise ValueError(
                f"injected-passage policy {self.injected_passages!r} is not supported; "
                f"accepted: {', '.join(INJECTED_PASSAGE_POLICIES)}"
            )
        if self.fallback_passages <= 0:
            raise ValueError(f"fallback_passages must be positive, got {self.fallback_passages}")


class Answerer:
    """Retrieves, checks confidence, answers (extractive or generative) and checks support."""

    def __init__(
        self,
        retriever: Retriever,
        generator=None,
        config: AnswerConfig | None = None,
        checker: SupportChecker | None = None,
    ) -> None:
        self.retriever, self.generator = retriever, generator
        self.config = config or AnswerConfig()
        if self.config.mode == "generative" and generator is None:
            raise ValueError(
                "generative answers need a generator (a genforge model directory or an OpenAI-compatible "
                "endpoint); use mode='extractive' to answer without one"
            )
        self.checker = checker or SupportChecker(retriever.embedder, self.config.support_threshold)

    def _answer(self, question, sentences, citations, covered, confidence, query, mode=None) -> Answer:
        return Answer(
            question,
            sentences,
            citations,
            covered,
            confidence,
            mode or self.config.mode,
            query,
            self.checker.threshold,
        )

    def ask(self, question: str, query: str | None = None, memories: Sequence[str] = ()) -> Answer:
        """Answer `question`, retrieving with `query` (a rewritten follow-up) when given.

        `memories` (long-term memories about the user, `memory.LongTermMemory.recall`) are shown
        to a generator as background it may use but not cite; the answer records them."""
        if not question or not question.strip():
            raise ValueError("the question is empty")
        query = (query or question).strip()
        cfg = self.config
        hits = self.retriever.search(query, k=cfg.k, **cfg.search)
        injected: list[dict] = []
        if cfg.injected_passages != "off" and hits:
            hits, injected = self._screen(hits)
        confidence = self.retriever.confidence(query, hits)
        if not hits or confidence < cfg.min_confidence:
            answer = self._answer(question, [], [], False, confidence, query)
        elif cfg.mode == "extractive":
            answer = self._handle_unsupported(self._extractive(question, query, hits, confidence), hits)
        else:
            answer = self._handle_unsupported(self._generative(question, query, hits, confidence, memories), hits)
        answer.memories = list(memories)
        answer.injected = injected
        return answer

    def _screen(self, hits: Sequence[Hit]) -> tuple[list[Hit], list[dict]]:
        """Indirect-injection screen of retrieved passages under the configured policy."""
        from ..safety.injection import screen_chunks

        kept, found = [], []
        for hit, screened in zip(hits, screen_chunks([h.chunk.text for h in hits], self.config.injected_passages)):
            if screened.action != "kept":
                found.append(
                    {
                        "chunk_id": hit.chunk.chunk_id,
                        "source": hit.chunk.source,
                        "action": screened.action,
                        "score": round(screened.result.score, 4),
                        "categories": screened.result.categories,
                    }
                )
            if screened.action == "dropped":
                continue
            if screened.action == "quoted":
                hit.details["injection"] = "quoted"
            kept.append(hit)
        return kept, found

    def _handle_unsupported(self, answer: Answer, hits: Sequence[Hit]) -> Answer:
        """Apply the configured policy to an answer's unsupported sentences."""
        policy = self.config.unsupported
        bad = answer.unsupported
        if not answer.covered or not bad:
            return answer
        if policy == "flag":
            answer.unsupported_action = "flagged"
            return answer
        kept = [s for s in answer.sentences if s.supported]
        if policy == "drop" and kept:
            used = {n for s in kept for n in s.citations}
            answer.sentences, answer.removed = kept, bad
            answer.citations = [c for c in answer.citations if c.number in used]
            answer.unsupported_action = "dropped"
            return answer
        # Extractive fallback (also what "drop" does when no sentence is left): quote the passages
        # that best support what was generated, so the answer stays on what the generator meant.
        support = [max((self.checker.score(s.text, h.chunk) for s in answer.sentences), default=0.0) for h in hits]
        best = sorted(range(len(hits)), key=lambda i: (-support[i], i))[: self.config.fallback_passages]
        fallback = self._extractive(answer.question, answer.query, [hits[i] for i in best], answer.confidence)
        fallback.unsupported_action, fallback.removed = "extractive_fallback", list(answer.sentences)
        return fallback

    def _extractive(self, question: str, query: str, hits: Sequence[Hit], confidence: float) -> Answer:
        cfg = self.config
        candidates = []  # (hit rank, chunk, start, end) with offsets within the chunk text
        for rank, hit in enumerate(hits):
            for s, e in chunk_units(hit.chunk):
                unit = hit.chunk.text[s:e]
                # A question restates the query and answers nothing; fragments carry no claim.
                if unit.rstrip().endswith("?") or len(content_words(unit)) < 3:
                    continue
                candidates.append((rank, hit.chunk, s, e))
        if not candidates:
            return self._answer(question, [], [], False, confidence, query, "extractive")
        # Wrapped lines read as one sentence; the span still points at the exact source text.
        texts = [" ".join(c.text[s:e].split()) for _, c, s, e in candidates]
        vectors = self.checker.vectors(texts)
        qvec = self.checker.vectors([query])[0]
        picked = mmr(qvec, vectors, cfg.max_sentences, cfg.mmr_lambda)
        # Read in source order: by the chunk's rank, then by position in the chunk.
        picked.sort(key=lambda j: (candidates[j][0], candidates[j][2]))
        numbers: dict[str, int] = {}
        citations, sentences = [], []
        for j in picked:
            rank, chunk, s, e = candidates[j]
            if chunk.chunk_id not in numbers:
                numbers[chunk.chunk_id] = len(numbers) + 1
                citations.append(Citation.of(numbers[chunk.chunk_id], chunk))
            n = numbers[chunk.chunk_id]
            sentences.append(self.checker.check(texts[j], [n], {n: chunk}, span=(chunk.start + s, chunk.start + e)))
        return self._answer(question, sentences, citations, True, confidence, query, "extractive")

    def prompt(self, question: str, hits: Sequence[Hit], memories: Sequence[str] = ()) -> str:
        blocks = []
        for n, h in enumerate(hits, 1):
            title = f" ({h.chunk.title})" if h.chunk.title else ""
            text = h.chunk.text[: self.config.passage_chars]
            if h.details.get("injection") == "quoted":
                from ..safety.injection import quote_as_data

                text = quote_as_data(text, "passage")
            blocks.append(f"[{n}] {Path(h.chunk.source).name}{title}\n{text}")
        prompt = GENERATIVE_PROMPT.format(passages="\n\n".join(blocks), question=question)
        if memories:
            # Background about the user, kept apart from the passages: it may shape the answer
            # (what they already know, what they prefer) but is not a source to cite.
            known = "\n".join(f"- {m}" for m in memories)
            prompt = prompt.replace(
                "\nQuestion:", f"\nWhat you remember about the user (do not cite):\n{known}\n\nQuestion:"
            )
        return prompt

    def _generative(
        self, question: str, query: str, hits: Sequence[Hit], confidence: float, memories: Sequence[str] = ()
    ) -> Answer:
        cfg = self.config
        reply = self.generator.complete(self.prompt(question, hits, memories), max_tokens=cfg.max_tokens).strip()
        if not reply or "NOT COVERED" in reply.upper():
            return self._answer(question, [], [], False, confidence, query)
        passages = {n: h.chunk for n, h in enumerate(hits, 1)}
        sentences = []
        for s, e in sentence_spans(reply):
            raw = reply[s:e].strip()
            cited = [int(x) for m in _CITE.finditer(raw) for x in re.split(r"\s*[,;]\s*", m.group(1))]
            text = re.sub(r"\s+([.!?,;:])", r"\1", _CITE.sub("", raw)).strip()
            if not text:
                # A citation standing alone after a full stop belongs to the sentence before it.
                if sentences and cited:
                    prev = sentences.pop()
                    sentences.append(self.checker.check(prev.text, prev.citations + cited, passages))
                continue
            sentences.append(self.checker.check(text, list(dict.fromkeys(cited)), passages))
        used = sorted({n for s in sentences for n in s.citations if n in passages})
        citations = [Citation.of(n, passages[n]) for n in used]
        return self._answer(question, sentences, citations, True, confidence, query)
