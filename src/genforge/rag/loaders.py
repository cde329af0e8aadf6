"""Document loaders: plain text, Markdown, HTML, PDF (pypdf) and DOCX (python-docx).

A batch of real files always contains some that cannot be read (an encrypted PDF, an empty
file, a stray binary). `load_documents` reports each of those with a reason and carries on,
so one bad file never costs the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = {".txt", ".text"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | MARKDOWN_SUFFIXES | HTML_SUFFIXES | {".pdf", ".docx"}


@dataclass
class Document:
    """One loaded file: its text, where it came from, and what the loader learned about it."""

    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


class UnreadableDocument(ValueError):
    """A file that cannot be turned into text; the message says why."""


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    # A NUL byte in the first block is the usual sign of a binary file renamed to .txt.
    if b"\x00" in raw[:8192]:
        raise UnreadableDocument("binary content (NUL bytes) in a text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UnreadableDocument(f"not UTF-8 text ({err.reason} at byte {err.start})") from None


class _HTMLText(HTMLParser):
    """Collects visible text; script and style bodies are not text a reader sees."""

    SKIP = {"script", "style", "noscript", "template"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def _read_html(path: Path) -> tuple[str, dict]:
    parser = _HTMLText()
    parser.feed(_read_text_file(path))
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    text = "\n".join(line for line in lines if line)
    return text, ({"title": parser.title.strip()} if parser.title.strip() else {})


def _read_pdf(path: Path) -> tuple[str, dict]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise UnreadableDocument("encrypted PDF (a password is needed to read it)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except UnreadableDocument:
        raise
    except (PdfReadError, ValueError, OSError, KeyError) as err:
        raise UnreadableDocument(f"unreadable PDF: {err}") from None
    info = reader.metadata or {}
    meta: dict[str, Any] = {"pages": len(pages)}
    if info.get("/Title"):
        meta["title"] = str(info["/Title"])
    # Pages are joined with a form feed so page boundaries survive into chunk offsets.
    return "\f".join(pages), meta


def _read_docx(path: Path) -> tuple[str, dict]:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(str(path))
    except (PackageNotFoundError, ValueError, KeyError, OSError) as err:
        raise UnreadableDocument(f"unreadable DOCX: {err}") from None
    lines = []
    for paragraph in document.paragraphs:
        style = (paragraph.style.name or "") if paragraph.style is not None else ""
        # Word headings become Markdown headings so heading-aware chunking sees them.
        if style.startswith("Heading ") and style[8:].isdigit() and paragraph.text.strip():
            lines.append("#" * int(style[8:]) + " " + paragraph.text.strip())
        else:
            lines.append(paragraph.text)
    meta = {"title": document.core_properties.title} if document.core_properties.title else {}
    return "\n".join(lines), meta


def load_document(path: str | Path) -> Document:
    """Load one file; raises `UnreadableDocument` with the reason when it cannot."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnreadableDocument(
            f"unknown extension {suffix or '(none)'!r}; accepted: {', '.join(sorted(SUPPORTED_SUFFIXES))}"
        )
    if path.stat().st_size == 0:
        raise UnreadableDocument("empty file")
    meta: dict[str, Any] = {}
    if suffix in TEXT_SUFFIXES:
        text, kind = _read_text_file(path), "text"
    elif suffix in MARKDOWN_SUFFIXES:
        text, kind = _read_text_file(path), "markdown"
    elif suffix in HTML_SUFFIXES:
        (text, meta), kind = _read_html(path), "html"
    elif suffix == ".pdf":
        (text, meta), kind = _read_pdf(path), "pdf"
    else:
        (text, meta), kind = _read_docx(path), "docx"
    if not text.strip():
        raise UnreadableDocument("no text (empty after extraction)")
    return Document(text=text, source=str(path), metadata={"format": kind, "bytes": path.stat().st_size, **meta})


def load_documents(paths: Iterable[str | Path]) -> tuple[list[Document], list[tuple[str, str]]]:
    """Load files and folders (recursively, in sorted order).

    Returns (documents, skipped) where skipped lists (path, reason) for every file that could
    not be read; the batch never aborts on one bad file.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            skipped.append((str(p), "no such file or folder"))
    documents = []
    for f in files:
        try:
            documents.append(load_document(f))
        except UnreadableDocument as err:
            skipped.append((str(f), str(err)))
        except Exception as err:  # a loader library failing on a malformed file must not end the batch
            skipped.append((str(f), f"{type(err).__name__}: {err}"))
    return documents, skipped
