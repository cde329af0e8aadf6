"""Chunking: cut documents into retrievable pieces that keep where they came from.

Five strategies, all returning `Chunk`s with character offsets into the document text
(`document.text[chunk.start:chunk.end] == chunk.text`, always):

- fixed token windows with overlap (the baseline of most RAG tutorials and of Lewis et al.
  2020, "Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks", which indexed
  100-word passages);
- sentence-aware: windows that only break between sentences;
- recursive: split on the coarsest separator (blank line, line, sentence, space) that brings
  every piece under the size limit, then merge neighbours back up to it;
- Markdown-heading-aware: one section per heading, the heading path recorded;
- question/answer-aware: documents that are lists of Q&A items (numbered Markdown headings,
  "Q:/A:" pairs, chat exports) become one chunk per item, titled by its question, with
  items that appear twice (chat exports repeat them) kept once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .loaders import Document

STRATEGIES = ("fixed", "sentence", "recursive", "markdown", "qa")
# Bumped whenever `Chunk.embedding_text` changes, so caches keyed on it (the embedded docs index)
# are rebuilt; 2: layout labels removed and the heading path prefixed.
EMBEDDING_TEXT_VERSION = 2

# Layout that is not content: an item number or Markdown heading marks at the start of a line,
# question/answer labels, bold/italic markers.
_LAYOUT_LABEL = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]+)?(?:\d+[.)][ \t]*)?(?:\*\*)?(?:Q|Question|A|Answer)(?:\*\*)?[ \t]*:(?:\*\*)?"
    r"|^[ \t]*#{1,6}[ \t]+(?:\d+[.)][ \t]+)?|^[ \t]*\d+[.)][ \t]+(?=\S)|\*\*|__",
    re.M,
)


@dataclass
class Chunk:
    """A span of a document: text, source, char offsets [start, end), title, heading path."""

    text: str
    source: str
    start: int
    end: int
    title: str = ""
    heading_path: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_id(self) -> str:
        """Stable id: the source and the offsets (an item number is added by Q&A chunking)."""
        item = self.metadata.get("item")
        return f"{self.source}#{item}" if item is not None else f"{self.source}@{self.start}-{self.end}"

    @property
    def content_hash(self) -> str:
        """What the embedding depends on; an unchanged chunk keeps its hash across re-indexing."""
        return hashlib.sha256(self.embedding_text.encode("utf-8")).hexdigest()

    @property
    def embedding_text(self) -> str:
        """What the dense encoder sees: the heading path, then the text with its layout labels
        removed (item numbers, "Q:"/"A:" and "Answer:" labels, heading hashes, emphasis marks).

        The labels carry no meaning but spend the encoder's short window (128 tokens for
        all-MiniLM-L6-v2) and pull every item of a collection towards one another; the heading
        path ties the later pieces of a long section, and items of a titled section, to their
        topic. `text` itself is untouched, so offsets and citations are unchanged."""
        body = _LAYOUT_LABEL.sub(" ", self.text)
        body = re.sub(r"[ \t]*\n\s*", "\n", body).strip()
        context = [h for h in self.heading_path if h and h not in body[: len(h) + 40]]
        if self.title and self.title not in body:
            context.append(self.title)
        return "\n".join(context + [body]) if context else body

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "source": self.source,
            "start": self.start,
            "end": self.end,
            "title": self.title,
            "heading_path": self.heading_path,
            "metadata": self.metadata,
        }


def _span(doc: Document, start: int, end: int, **kw) -> Chunk | None:
    """A chunk over doc.text[start:end] with surrounding whitespace trimmed (offsets follow)."""
    piece = doc.text[start:end]
    lead = len(piece) - len(piece.lstrip())
    start, end = start + lead, start + len(piece.rstrip())
    if end <= start:
        return None
    kw.setdefault("metadata", {})
    kw["metadata"] = {**doc.metadata, **kw["metadata"]}
    return Chunk(doc.text[start:end], doc.source, start, end, **kw)


def _check_size(size: int, overlap: int = 0) -> None:
    if size <= 0:
        raise ValueError(f"chunk size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size={size}), got {overlap}")


def fixed_token_chunks(doc: Document, size: int = 200, overlap: int = 40) -> list[Chunk]:
    """Windows of `size` whitespace tokens, each starting `size - overlap` tokens after the last."""
    _check_size(size, overlap)
    tokens = [m.span() for m in re.finditer(r"\S+", doc.text)]
    chunks, step = [], size - overlap
    for first in range(0, max(len(tokens) - overlap, 1), step):
        window = tokens[first : first + size]
        if window and (c := _span(doc, window[0][0], window[-1][1], metadata={"tokens": len(window)})):
            chunks.append(c)
    return chunks


# A sentence ends at . ! ? (optionally closed by quotes/brackets) followed by whitespace, or at a blank line.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) offsets of the sentences of text[start:end]."""
    end = len(text) if end is None else end
    spans, pos = [], start
    for m in _SENTENCE_END.finditer(text, start, end):
        if m.start() > pos:
            spans.append((pos, m.start()))
        pos = m.end()
    if pos < end and text[pos:end].strip():
        spans.append((pos, end))
    return spans


def _pack(spans: list[tuple[int, int]], max_chars: int, overlap_units: int = 0) -> list[tuple[int, int]]:
    """Greedily join consecutive spans into groups no longer than max_chars (a single longer span stands alone)."""
    groups, i = [], 0
    while i < len(spans):
        j = i + 1
        while j < len(spans) and spans[j][1] - spans[i][0] <= max_chars:
            j += 1
        groups.append((spans[i][0], spans[j - 1][1]))
        i = max(j - overlap_units, i + 1) if j < len(spans) else j
    return groups


def sentence_chunks(doc: Document, max_chars: int = 1000, overlap_sentences: int = 1) -> list[Chunk]:
    """Windows that break only between sentences, repeating `overlap_sentences` across the cut."""
    _check_size(max_chars)
    groups = _pack(sentence_spans(doc.text), max_chars, overlap_sentences)
    return [c for s, e in groups if (c := _span(doc, s, e))]


_SEPARATORS = (r"\n\s*\n", r"\n", r"(?<=[.!?])\s+", r"\s+")


def _recursive_spans(text: str, start: int, end: int, max_chars: int, level: int) -> list[tuple[int, int]]:
    if end - start <= max_chars or level == len(_SEPARATORS):
        return [(start, end)] if text[start:end].strip() else []
    pieces, pos = [], start
    for m in re.compile(_SEPARATORS[level]).finditer(text, start, end):
        pieces.append((pos, m.start()))
        pos = m.end()
    pieces.append((pos, end))
    out = []
    for s, e in pieces:
        out.extend(
            _recursive_spans(text, s, e, max_chars, level + 1)
            if e - s > max_chars
            else [(s, e)]
            if text[s:e].strip()
            else []
        )
    return out


def recursive_chunks(doc: Document, max_chars: int = 1000) -> list[Chunk]:
    """Split by the coarsest separator that fits (paragraph, line, sentence, word), then re-merge."""
    _check_size(max_chars)
    groups = _pack(_recursive_spans(doc.text, 0, len(doc.text), max_chars, 0), max_chars)
    return [c for s, e in groups if (c := _span(doc, s, e))]


_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def _in_code_fence(text: str, pos: int) -> bool:
    # A '#' line inside a ``` fence is a comment in code, not a heading.
    return text.count("```", 0, pos) % 2 == 1


def markdown_chunks(doc: Document, max_chars: int | None = None) -> list[Chunk]:
    """One chunk per Markdown section, with its heading path (h1 > h2 > ...); long sections are
    cut further by `recursive_chunks` when max_chars is given."""
    headings = [m for m in _HEADING.finditer(doc.text) if not _in_code_fence(doc.text, m.start())]
    bounds = [(0, None)] + [(m.start(), m) for m in headings]
    chunks, path = [], []
    for i, (start, m) in enumerate(bounds):
        end = bounds[i + 1][0] if i + 1 < len(bounds) else len(doc.text)
        if m is not None:
            level = len(m.group(1))
            path = [p for p in path if p[0] < level] + [(level, m.group(2).strip())]
        names = [p[1] for p in path]
        pieces = [(start, end)]
        if max_chars is not None and end - start > max_chars:
            pieces = _pack(_recursive_spans(doc.text, start, end, max_chars, 0), max_chars)
        for s, e in pieces:
            if c := _span(doc, s, e, title=names[-1] if names else "", heading_path=names):
                chunks.append(c)
    return chunks


# Q&A item starts, tried in this order; the first kind found at least twice defines the items.
#  - "12. Q: question" (chat exports), "Q: question" / "Question: question"
#  - "## 12. question" (numbered Markdown headings)
#  - "12. question" on its own line (plain numbered lists; numbers must run consecutively so
#    a numbered list inside an answer is not taken for a new item)
_QA_PATTERNS = (
    ("numbered_q", re.compile(r"^[ \t]*(\d+)[.)][ \t]*(?:Q|Question)[ \t]*[:.][ \t]*(.+?)[ \t]*$", re.M)),
    ("numbered_heading", re.compile(r"^#{1,6}[ \t]*(\d+)[.)][ \t]+(.+?)[ \t#]*$", re.M)),
    ("q_prefix", re.compile(r"^[ \t]*()(?:\*\*)?(?:Q|Question)(?:\*\*)?[ \t]*[:.](?:\*\*)?[ \t]*(.+?)[ \t]*$", re.M)),
    ("numbered_line", re.compile(r"^[ \t]*(\d+)[.)][ \t]+(\S.+?)[ \t]*$", re.M)),
)
# Lines a chat export puts between turns; they belong to no item.
_CHAT_MARKER = re.compile(r"^\s*(You asked:|You said:|ChatGPT said:|Expanded Q&A.*|---+|\*\*\*+)\s*$", re.M)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _item_starts(text: str) -> tuple[str, list[re.Match]]:
    for kind, pattern in _QA_PATTERNS:
        found = [m for m in pattern.finditer(text) if not _in_code_fence(text, m.start())]
        if kind == "numbered_line":
            # Keep only a consecutive run of numbers: 51, 52, 53, ...
            run, expected = [], None
            for m in found:
                n = int(m.group(1))
                if expected is None or n == expected:
                    run.append(m)
                    expected = n + 1
            found = run
            # A plain numbered list (steps, bullet points of a Markdown page) is not a Q&A
            # collection: its items must read as questions, most of them ending in "?".
            if sum("?" in m.group(2) for m in found) * 2 < len(found):
                found = []
        if len(found) >= 2:
            return kind, found
    return "", []


def qa_chunks(doc: Document) -> list[Chunk]:
    """One chunk per question/answer item, titled by the question; repeated items kept once.

    An item runs from its question line to the next item's question line; chat-turn markers
    and section headings between items are trimmed off its end. Two items are the same when
    their normalised question and answer text match (a chat export that repeats a block), or,
    for numbered items, when number and question match. Returns [] when the document has no
    Q&A structure (fewer than two items), so callers can fall back to another strategy.
    """
    kind, starts = _item_starts(doc.text)
    if not starts:
        return []
    headings = [m for m in _HEADING.finditer(doc.text) if not _in_code_fence(doc.text, m.start())]
    item_starts = {m.start() for m in starts}
    chunks, seen = [], set()
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(doc.text)
        # Trim trailing chat markers and any heading that opens the next section.
        tail_cut = end
        for marker in list(_CHAT_MARKER.finditer(doc.text, m.end(), end)) + [
            h for h in headings if m.end() < h.start() < end and h.start() not in item_starts
        ]:
            tail_cut = min(tail_cut, marker.start()) if _only_markers_after(doc.text, marker.start(), end) else tail_cut
        end = tail_cut
        # A flattened export may carry the answer on the question line ("Q: ... A: ...").
        question = re.split(r"\s+(?:A|Answer)\s*:", m.group(2))[0]
        question = re.sub(r"^\*\*|\*\*$", "", question).strip()
        number = int(m.group(1)) if m.group(1) else None
        path = []
        for h in headings:
            if h.start() >= m.start():
                break
            if h.start() in item_starts:
                continue
            level = len(h.group(1))
            path = [p for p in path if p[0] < level] + [(level, h.group(2).strip())]
        body = _norm(doc.text[m.end() : end])
        key = (number, _norm(question)) if number is not None else (_norm(question), body)
        if key in seen:
            continue
        seen.add(key)
        meta = {"item": number if number is not None else len(chunks) + 1, "qa_format": kind, "question": question}
        if c := _span(doc, m.start(), end, title=question, heading_path=[p[1] for p in path], metadata=meta):
            chunks.append(c)
    return chunks


def _only_markers_after(text: str, pos: int, end: int) -> bool:
    """True when text[pos:end] holds only chat markers, headings and blank lines."""
    for line in text[pos:end].splitlines():
        if line.strip() and not _CHAT_MARKER.match(line) and not _HEADING.match(line):
            return False
    return True


def chunk_document(doc: Document, strategy: str = "auto", **options) -> list[Chunk]:
    """Chunk with one strategy; "auto" takes Q&A items when the document has them, Markdown
    sections when it has headings, and recursive chunks otherwise."""
    table: dict[str, Callable[..., list[Chunk]]] = {
        "fixed": fixed_token_chunks,
        "sentence": sentence_chunks,
        "recursive": recursive_chunks,
        "markdown": markdown_chunks,
        "qa": qa_chunks,
    }
    if strategy == "auto":
        chunks = qa_chunks(doc)
        if chunks:
            return chunks
        if _HEADING.search(doc.text):
            return markdown_chunks(doc, max_chars=options.get("max_chars", 2000))
        return recursive_chunks(doc, **options)
    if strategy not in table:
        raise ValueError(f"unknown chunking strategy {strategy!r}; accepted: auto, {', '.join(STRATEGIES)}")
    return table[strategy](doc, **options)
