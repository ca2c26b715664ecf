"""Document text extraction: each supported format, and a clear one-line error for everything else."""

from __future__ import annotations

import io
import textwrap

import pytest
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from mesh_rag.extract import SUPPORTED, ExtractError, extract, media_type_for

pytestmark = pytest.mark.unit


def make_pdf(pages: list[str], password: str | None = None) -> bytes:
    """A real PDF whose pages show ``pages`` in Helvetica (one text line per input line)."""
    writer = PdfWriter()
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    for text in pages:
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
        ops = ["BT", "/F1 11 Tf", "14 TL", "72 740 Td"]
        for line in text.splitlines():
            ops.append("(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj T*")
        stream = DecodedStreamObject()
        stream.set_data("\n".join([*ops, "ET"]).encode("latin-1"))
        page.replace_contents(stream)
    if password is not None:
        writer.encrypt(password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_media_types_by_suffix() -> None:
    assert {s: media_type_for(f"doc{s.upper()}") for s in SUPPORTED} == SUPPORTED
    with pytest.raises(ExtractError) as e:
        media_type_for("report.docx")
    assert str(e.value) == "unsupported document type '.docx' (supported: .md .markdown .txt .html .htm .pdf)"
    with pytest.raises(ExtractError, match="'Makefile'"):
        media_type_for("Makefile")


def test_markdown_and_plain_text() -> None:
    raw = "\ufeff# Title\r\n\r\nCafé line one.\r\nline two\r\n".encode()
    assert extract(raw, "text/markdown") == "# Title\n\nCafé line one.\nline two"
    assert extract(b"caf\xe9 ok", "text/plain; charset=latin-1") == "café ok"
    assert extract(b"bad \xff byte", "text/plain") == "bad \ufffd byte"  # invalid utf-8 is replaced, not fatal
    assert extract("\ufeffWindows notes".encode("utf-16-le"), "text/plain") == "Windows notes"


def test_binary_and_empty_inputs_are_rejected() -> None:
    with pytest.raises(ExtractError, match="binary data"):
        extract(b"PK\x03\x04\x00\x00zip", "text/plain")
    with pytest.raises(ExtractError, match="no text found in text/markdown"):
        extract(b" \n\t\n", "text/markdown")
    with pytest.raises(ExtractError, match="unsupported media type 'application/msword'"):
        extract(b"x", "application/msword")
    # A few bad bytes are replaced; a "text" that is mostly not text in its charset is refused.
    assert extract(b"ok " * 600 + b"\xff" * 16, "text/plain").count("\ufffd") == 16
    with pytest.raises(ExtractError, match=r"not utf-8 text: 100000 of 300000 characters cannot be decoded"):
        extract(b"\xc7\x1cq" * 100_000, "text/plain")  # what base64 'xxxx...' decodes to


HTML = b"""<!DOCTYPE html><html><head><title>Ignored title</title>
<meta charset="utf-8"><style>p { color: red }</style>
<script>var s = "<p>not text</p>";</script></head>
<body><nav><a href="/">Home</a> &rsaquo; Docs</nav>
<h1>Refunds &amp; Returns</h1>
<p>Caf&eacute; owners get a &ldquo;full&rdquo;
   refund&nbsp;within 14&#160;days.</p>
<ul><li>First item</li><li>Second<br>line</li></ul>
<table><tr><th>Plan</th><td>Gold</td></tr></table>
<h2>Timing</h2><p>Cards take <b>5&ndash;10</b> days.</p>
<script type="text/javascript">document.write("also not text")</script>
</body></html>"""


def test_html_keeps_readable_text_only() -> None:
    text = extract(HTML, "text/html")
    assert text == (
        "# Refunds & Returns\n\n"
        "Café owners get a “full” refund within 14 days.\n\n"
        "First item\nSecond\nline\n\n"
        "Plan\nGold\n\n"
        "# Timing\n\n"
        "Cards take 5–10 days."
    )
    for hidden in ("Ignored title", "color", "not text", "Home"):
        assert hidden not in text


def test_html_charset_from_meta_and_unclosed_head() -> None:
    page = '<html><head><meta charset="iso-8859-1"><title>t</title><body><p>Crème brûlée</p>'.encode("latin-1")
    assert extract(page, "text/html") == "Crème brûlée"
    with pytest.raises(ExtractError, match="no text found in text/html"):
        extract(b"<html><head><style>x{}</style></head><body><script>1</script></body></html>", "text/html")


def test_pdf_pages_are_joined_with_blank_lines() -> None:
    data = make_pdf(["Page one says hello.\nSecond line (with parens).", "Page two says goodbye."])
    text = extract(data, "application/pdf")
    assert "Page one says hello." in text and "(with parens)" in text
    one, two = text.split("\n\n")
    assert "Page two says goodbye." in two and "goodbye" not in one


def test_bad_pdfs_raise_extract_error() -> None:
    with pytest.raises(ExtractError, match="not a readable PDF: missing %PDF- header"):
        extract(b"hello", "application/pdf")
    with pytest.raises(ExtractError, match="not a readable PDF"):
        extract(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage", "application/pdf")
    with pytest.raises(ExtractError, match="encrypted"):
        extract(make_pdf(["Secret text."], password="hunter2"), "application/pdf")
    with pytest.raises(ExtractError, match="no text found in application/pdf"):
        extract(make_pdf([""]), "application/pdf")
    full = make_pdf(["Some text here."])
    with pytest.raises(ExtractError) as e:
        extract(full[: len(full) // 2], "application/pdf")
    assert "\n" not in str(e.value)


def test_pdf_with_an_empty_user_password_opens() -> None:
    assert extract(make_pdf(["Readable anyway."], password=""), "application/pdf") == "Readable anyway."


def test_pdf_text_over_many_lines_comes_back_whole() -> None:
    lines = textwrap.wrap(" ".join(f"word{i}" for i in range(60)), 90)
    assert extract(make_pdf(["\n".join(lines)]), "application/pdf").split() == [f"word{i}" for i in range(60)]
