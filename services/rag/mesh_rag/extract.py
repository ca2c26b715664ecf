"""Document bytes -> plain text for chunking, for the few formats tenants actually upload.

Markdown and plain text pass through (decoded, newlines normalised); HTML is reduced to its readable
text with the standard library's parser (headings become ``# `` lines so the chunker keeps them as
section titles; scripts, styles, navigation and the head are dropped); PDF text comes from pypdf,
page by page. Every failure is an :class:`ExtractError` with a one-line reason that can be shown to
the uploader as is.
"""

from __future__ import annotations

import codecs
import io
import re
from html.parser import HTMLParser
from pathlib import PurePath

from mesh_contracts.v1 import DOCUMENT_TYPES
from mesh_rag.errors import RagError

SUPPORTED: dict[str, str] = DOCUMENT_TYPES  # suffix -> media type, as the ingest contract declares
_SUFFIXES = " ".join(SUPPORTED)
_CHARSET = re.compile(rb"""charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


class ExtractError(ValueError, RagError):
    """The document cannot be turned into text; ``str(e)`` is a one-line reason."""


def media_type_for(name: str) -> str:
    """The media type for a file name, by its suffix."""
    suffix = PurePath(name).suffix.lower()
    if suffix not in SUPPORTED:
        raise ExtractError(f"unsupported document type '{suffix or name}' (supported: {_SUFFIXES})")
    return SUPPORTED[suffix]


def extract(data: bytes, media_type: str) -> str:
    """The document's text. ``media_type`` may carry parameters (``text/html; charset=latin-1``)."""
    kind, _, params = media_type.partition(";")
    kind = kind.strip().lower()
    charset = _charset(params.encode())
    if kind in ("text/markdown", "text/plain"):
        text = _decode(data, charset, kind)
    elif kind == "text/html":
        text = html_to_text(_decode(data, charset or _charset(data[:2048]), kind))
    elif kind == "application/pdf":
        text = pdf_to_text(data)
    else:
        raise ExtractError(f"unsupported media type '{kind}' (supported: {' '.join(sorted(set(SUPPORTED.values())))})")
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.split("\n"))).strip()
    if not text:
        raise ExtractError(f"no text found in {kind} document")
    return text


def _charset(raw: bytes) -> str | None:
    m = _CHARSET.search(raw)
    if not m:
        return None
    name = m.group(1).decode("ascii", "replace")
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def _decode(data: bytes, charset: str | None, kind: str) -> str:
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):  # Windows tools still write UTF-16
        charset = "utf-16"
    if b"\x00" in data[:8192] and charset not in ("utf-16", "utf-16-le", "utf-16-be", "utf-32"):
        raise ExtractError(f"binary data (NUL bytes) is not a {kind} document")
    text = data.decode(charset or "utf-8", errors="replace")
    if (bad := text.count("\ufffd")) > max(16, len(text) // 100):
        raise ExtractError(
            f"not {charset or 'utf-8'} text: {bad} of {len(text)} characters cannot be decoded "
            f"(declare the document's charset, or its real media type)"
        )
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


# --- HTML ----------------------------------------------------------------------------------------

_SKIP = frozenset({"script", "style", "nav", "head", "noscript", "template", "svg", "iframe"})
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_PARAGRAPHS = frozenset(
    {"p", "div", "section", "article", "main", "header", "footer", "aside", "blockquote", "pre", "ul", "ol", "dl"}
    | {"table", "figure", "figcaption", "form", "fieldset", "address", "details", "summary", "hr", "body"}
)
_LINES = frozenset({"li", "dt", "dd", "tr", "td", "th", "caption", "br", "option", "label"})


class _TextParser(HTMLParser):
    """Collects visible text as blocks: each heading, paragraph, list item and table cell on its own line."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities (&amp; &eacute; &#8217;) arrive unescaped
        self.lines: list[str] = []
        self.current: list[str] = []
        self.skipping: list[str] = []
        self.heading = False
        self.pre = 0

    def _flush(self, blank: bool) -> None:
        text = "".join(self.current)
        self.current = []
        text = text.strip("\n") if self.pre else " ".join(text.split())
        if text:
            self.lines.append(f"# {text}" if self.heading else text)
        if blank and self.lines and self.lines[-1] != "":
            self.lines.append("")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body" and "head" in self.skipping:  # an unclosed <head> ends where the body starts
            self.skipping = [t for t in self.skipping if t != "head"]
        if tag in _SKIP:
            self.skipping.append(tag)
        elif not self.skipping:
            if tag in _HEADINGS:
                self._flush(blank=True)
                self.heading = True
            elif tag in _PARAGRAPHS or tag in _LINES:
                self._flush(blank=tag in _PARAGRAPHS)
            if tag == "pre":
                self.pre += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self.skipping and (tag in _LINES or tag in _PARAGRAPHS):
            self._flush(blank=tag in _PARAGRAPHS)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            if tag in self.skipping:
                while self.skipping and self.skipping.pop() != tag:
                    pass
            return
        if self.skipping:
            return
        if tag in _HEADINGS:
            self._flush(blank=True)
            self.heading = False
        elif tag in _PARAGRAPHS or tag in _LINES:
            self._flush(blank=tag in _PARAGRAPHS)
        if tag == "pre" and self.pre:
            self.pre -= 1

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.current.append(data)

    def text(self) -> str:
        self.heading = False
        self._flush(blank=False)
        return "\n".join(self.lines)


def html_to_text(html: str) -> str:
    """Readable text of an HTML page (see the module docstring)."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    return parser.text()


# --- PDF -----------------------------------------------------------------------------------------


def pdf_to_text(data: bytes) -> str:
    """Text of every page, pages separated by a blank line."""
    from pypdf import PdfReader  # imported here: only PDF uploads pay for it
    from pypdf.errors import PdfReadError

    if not data.lstrip()[:5] == b"%PDF-":
        raise ExtractError("not a readable PDF: missing %PDF- header")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractError("not a readable PDF: it is encrypted with a password")
        pages = [page.extract_text() or "" for page in reader.pages]
    except ExtractError:
        raise
    except PdfReadError as e:
        raise ExtractError(f"not a readable PDF: {_one_line(e)}") from e
    except Exception as e:  # a corrupt file can fail anywhere inside pypdf
        raise ExtractError(f"not a readable PDF: {type(e).__name__}: {_one_line(e)}") from e
    return "\n\n".join(p.strip() for p in pages if p.strip())


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
