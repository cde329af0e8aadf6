"""genforge.rag.loaders: every supported format loads; bad files are reported and skipped."""

from __future__ import annotations

import pytest

from genforge.rag.loaders import UnreadableDocument, load_document, load_documents


def _write_pdf(path, encrypt: bool) -> None:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    if encrypt:
        writer.encrypt(user_password="secret", owner_password="owner")
    with open(path, "wb") as f:
        writer.write(f)


def test_each_format_loads_with_source_and_metadata(tmp_path):
    import docx

    (tmp_path / "a.txt").write_text("Plain words about caches.\n")
    (tmp_path / "b.md").write_text("# Title\n\nSome body text.\n")
    (tmp_path / "c.html").write_text(
        "<html><head><title>Page</title><style>p{color:red}</style></head>"
        "<body><h1>Head</h1><p>Visible &amp; kept.</p><script>var hidden = 1;</script></body></html>"
    )
    d = docx.Document()
    d.add_heading("Section one", level=1)
    d.add_paragraph("A paragraph in Word.")
    d.save(tmp_path / "d.docx")

    docs, skipped = load_documents([tmp_path])
    assert skipped == []
    by_name = {doc.source.rsplit("/", 1)[-1]: doc for doc in docs}
    assert set(by_name) == {"a.txt", "b.md", "c.html", "d.docx"}
    assert by_name["a.txt"].metadata["format"] == "text"
    assert by_name["b.md"].metadata["format"] == "markdown"
    html = by_name["c.html"]
    assert "Visible & kept." in html.text and "hidden" not in html.text and "color" not in html.text
    assert html.metadata["title"] == "Page"
    # Word headings come through as Markdown headings, so heading-aware chunking sees them.
    assert by_name["d.docx"].text.splitlines()[0] == "# Section one"
    assert all(doc.source.startswith(str(tmp_path)) for doc in docs)


def test_bad_files_are_reported_and_skipped_without_aborting(tmp_path):
    (tmp_path / "good.txt").write_text("Still loaded.")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "data.xyz").write_text("unknown kind")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (tmp_path / "fake.docx").write_bytes(b"not a zip archive")
    _write_pdf(tmp_path / "locked.pdf", encrypt=True)
    _write_pdf(tmp_path / "blank.pdf", encrypt=False)

    docs, skipped = load_documents([tmp_path, tmp_path / "missing.md"])
    assert [d.source.rsplit("/", 1)[-1] for d in docs] == ["good.txt"]
    reasons = {path.rsplit("/", 1)[-1]: reason for path, reason in skipped}
    assert set(reasons) == {
        "empty.txt",
        "blob.txt",
        "data.xyz",
        "broken.pdf",
        "fake.docx",
        "locked.pdf",
        "blank.pdf",
        "missing.md",
    }
    assert "empty" in reasons["empty.txt"]
    assert "binary" in reasons["blob.txt"]
    assert "unknown extension '.xyz'" in reasons["data.xyz"] and ".pdf" in reasons["data.xyz"]
    assert "encrypted" in reasons["locked.pdf"]
    assert "no text" in reasons["blank.pdf"]
    assert "no such file" in reasons["missing.md"]


def test_load_document_raises_a_clear_error(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x00\x01")
    with pytest.raises(UnreadableDocument, match="unknown extension"):
        load_document(path)
