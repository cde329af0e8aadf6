"""genforge.rag.chunking: Q&A items from the real seeds, and the generic strategies' invariants.

Assertions are on counts, structure and offsets; no seed text is copied here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from genforge.rag.chunking import (
    Chunk,
    chunk_document,
    fixed_token_chunks,
    markdown_chunks,
    qa_chunks,
    recursive_chunks,
    sentence_chunks,
)
from genforge.rag.loaders import Document, load_documents

SEEDS = Path("/work/shared/seeds")
needs_seeds = pytest.mark.skipif(not SEEDS.is_dir(), reason=f"seeds corpus not found at {SEEDS}")


@pytest.fixture(scope="module")
def seed_docs():
    docs, skipped = load_documents([SEEDS])
    assert skipped == []
    return {Path(d.source).name[:3]: d for d in docs}


def _assert_offsets(doc, chunks):
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text
        assert c.text == c.text.strip() and c.source == doc.source


@needs_seeds
def test_qa_items_recovered_from_every_seed(seed_docs):
    formats = {}
    for prefix, doc in seed_docs.items():
        chunks = qa_chunks(doc)
        assert len(chunks) > 0, prefix
        _assert_offsets(doc, chunks)
        formats[prefix] = chunks[0].metadata["qa_format"]
        numbers = [c.metadata["item"] for c in chunks]
        assert len(numbers) == len(set(numbers)), f"{prefix}: an item kept twice"
        assert numbers == sorted(numbers)
        for c in chunks:
            first_line = c.text.splitlines()[0]
            assert c.title and c.title in first_line
            # The title ends with "?" exactly when the question in the source does.
            question_part = re.split(r"\s+(?:A|Answer)\s*:", first_line)[0].rstrip("*# ").rstrip()
            assert c.title.endswith("?") == question_part.endswith("?")
        assert sum(c.title.endswith("?") for c in chunks) >= 0.6 * len(
            chunks
        )  # some items are imperatives ("Explain ...")
    # Counts of items per file, by structure: two short lists, a 200-item guide with sections,
    # a 50-item list numbered from 51, and a chat export.
    assert {p: len(qa_chunks(d)) for p, d in seed_docs.items() if p != "004"} == {
        "000": 10,
        "001": 10,
        "002": 200,
        "003": 50,
    }
    assert [c.metadata["item"] for c in qa_chunks(seed_docs["003"])] == list(range(51, 101))
    assert formats == {
        "000": "numbered_heading",
        "001": "numbered_heading",
        "002": "numbered_heading",
        "003": "numbered_line",
        "004": "numbered_q",
    }
    # Section headings of the 200-item guide become the heading path, not item titles.
    assert all(len(c.heading_path) == 2 for c in qa_chunks(seed_docs["002"]))


@needs_seeds
def test_chat_export_duplicates_are_removed(seed_docs):
    doc = seed_docs["004"]
    raw = re.findall(r"^(\d+)\.\s*Q:", doc.text, re.M)
    chunks = qa_chunks(doc)
    assert len(raw) == 2 * len(set(raw)), "the export is expected to hold every item twice"
    assert len(chunks) == len(set(raw))
    # The first (fully formatted) copy is the one kept: it comes before the second copies begin.
    second_copy_of_first = [m.start() for m in re.finditer(r"^1\.\s*Q:", doc.text, re.M)][1]
    assert all(c.start < second_copy_of_first for c in chunks)
    # No chat-turn marker leaks into the end of an item.
    assert not any(re.search(r"(You asked:|ChatGPT said:)\s*$", c.text) for c in chunks)


def test_qa_formats_on_small_documents():
    doc = Document(
        "Q: What is a cache?\nA: A store of results.\n\nQ: Why batch requests?\nA: To share work.\n", "mem.txt"
    )
    chunks = qa_chunks(doc)
    assert [c.title for c in chunks] == ["What is a cache?", "Why batch requests?"]
    _assert_offsets(doc, chunks)
    assert qa_chunks(Document("Just a paragraph.\n", "p.txt")) == []


def test_numbered_list_is_not_taken_for_qa_items():
    steps = "# Setup\n\nDo this in order:\n\n1. Install the package.\n2. Build the index.\n3. Run a query.\n"
    doc = Document(steps, "setup.md")
    assert qa_chunks(doc) == []
    assert [c.heading_path for c in chunk_document(doc)] == [["Setup"]]
    questions = "1. What is a cache?\nA store.\n2. Why batch?\nTo share work.\n3. When to stop?\nAt the end.\n"
    assert [c.title for c in qa_chunks(Document(questions, "q.txt"))] == [
        "What is a cache?",
        "Why batch?",
        "When to stop?",
    ]


def test_embedding_text_drops_layout_and_keeps_context():
    text = "### 7. What is a cache?\n**Answer:** A store of results.\n\n1. fast\n2. small"
    chunk = Chunk(
        text,
        "c.md",
        0,
        len(text),
        title="What is a cache?",
        heading_path=["Book", "Systems"],
        metadata={"item": 7, "question": "What is a cache?"},
    )
    # The heading path leads, the labels and item numbers are gone, the words stay in order.
    assert chunk.embedding_text == "Book\nSystems\nWhat is a cache?\nA store of results.\nfast\nsmall"
    qa = "12. Q: Why batch requests?\n\nA:\n\nTo share work."
    assert (
        Chunk(qa, "c.txt", 0, len(qa), title="Why batch requests?").embedding_text
        == "Why batch requests?\nTo share work."
    )
    # A markdown section is not prefixed with the heading it starts with.
    section = "## Part A\n\nAlpha text."
    assert (
        Chunk(section, "g.md", 0, len(section), title="Part A", heading_path=["Guide", "Part A"]).embedding_text
        == "Guide\nPart A\nAlpha text."
    )
    # The content hash follows what is embedded, so a changed rule re-embeds.
    assert chunk.content_hash != Chunk(text, "c.md", 0, len(text)).content_hash


TEXT = (
    "# Guide\n\nIntro sentence one. Intro sentence two!\n\n## Part A\n\nAlpha text here. More alpha?\n\n"
    "### Detail\n\nDeep words.\n\n## Part B\n\n```\n# not a heading\n```\nBeta closes.\n"
)


def test_markdown_chunks_record_heading_paths():
    doc = Document(TEXT, "g.md")
    chunks = markdown_chunks(doc)
    _assert_offsets(doc, chunks)
    assert [c.heading_path for c in chunks] == [
        ["Guide"],
        ["Guide", "Part A"],
        ["Guide", "Part A", "Detail"],
        ["Guide", "Part B"],
    ]
    assert "# not a heading" in chunks[-1].text


def test_fixed_sentence_and_recursive_chunks_cover_the_text():
    doc = Document(" ".join(f"Sentence number {i} ends here." for i in range(60)), "s.txt")
    fixed = fixed_token_chunks(doc, size=20, overlap=5)
    _assert_offsets(doc, fixed)
    assert all(c.metadata["tokens"] <= 20 for c in fixed)
    assert fixed[0].end > fixed[1].start  # windows overlap
    sentences = sentence_chunks(doc, max_chars=200, overlap_sentences=1)
    _assert_offsets(doc, sentences)
    assert all(len(c.text) <= 200 and c.text.endswith(".") for c in sentences)
    rec = recursive_chunks(doc, max_chars=150)
    _assert_offsets(doc, rec)
    assert all(len(c.text) <= 150 for c in rec)
    assert rec[0].start == 0 and rec[-1].end == len(doc.text)
    with pytest.raises(ValueError, match="overlap"):
        fixed_token_chunks(doc, size=10, overlap=10)
    with pytest.raises(ValueError, match="accepted"):
        chunk_document(doc, "paragraphs")
