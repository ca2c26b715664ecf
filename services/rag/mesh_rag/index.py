"""Per-tenant lexical index: overlapping chunks, BM25 scoring, provenance on every hit.

Every chunk carries its document id, the document version (sha256 of the document) and
the chunk's own sha256, so a citation can be checked against the index later.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TOKEN = re.compile(r"[a-z0-9]+")
STOP = frozenset(
    "a an and are as at be by does for from how in is it of on or that the this to what when which "
    "with why also find documentation says about".split()
)


def tokens(text: str) -> list[str]:
    return [t for t in TOKEN.findall(text.lower()) if t not in STOP]


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    version: str
    chunk_id: str
    text: str

    @property
    def chunk_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def chunk_text(text: str, size: int = 80, overlap: int = 1) -> list[str]:
    """Pack whole sentences into chunks of about ``size`` words; consecutive chunks share
    ``overlap`` sentences so a fact split across a boundary is still found whole.
    Headings and paragraphs are never merged into the middle of a sentence."""
    sentences: list[str] = []
    for para in re.split(r"\n\s*\n|\n(?=#)|(?<=\n)(?=#)", text):
        if para.lstrip().startswith("#"):  # a heading is a sentence of its own
            heading, _, rest = para.strip().partition("\n")
            sentences.append(heading.lstrip("# ").strip() + ".")
            para = rest
        para = " ".join(para.split())
        if para:
            sentences += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9#])", para) if s]
    chunks: list[str] = []
    current: list[str] = []
    for sentence in sentences:
        if current and sum(len(s.split()) for s in current) + len(sentence.split()) > size:
            chunks.append(" ".join(current))
            current = current[-overlap:] if overlap else []
        current.append(sentence)
    if current and (not chunks or " ".join(current) not in chunks[-1]):
        chunks.append(" ".join(current))
    return chunks


@dataclass
class TenantIndex:
    chunks: list[Chunk] = field(default_factory=list)
    tf: list[Counter[str]] = field(default_factory=list)
    df: Counter[str] = field(default_factory=Counter)
    version: str = "empty"

    def add_document(self, doc_id: str, text: str) -> int:
        version = hashlib.sha256(text.encode()).hexdigest()[:16]
        keep = [i for i, c in enumerate(self.chunks) if c.doc_id != doc_id]  # re-ingest replaces old chunks
        self.chunks = [self.chunks[i] for i in keep]
        self.tf = [self.tf[i] for i in keep]
        for i, body in enumerate(chunk_text(text)):
            self.chunks.append(Chunk(doc_id, version, str(i), body))
            self.tf.append(Counter(tokens(body)))
        self.df = Counter(t for tf in self.tf for t in tf)
        self.version = hashlib.sha256("".join(c.chunk_hash for c in self.chunks).encode()).hexdigest()[:16]
        return sum(1 for c in self.chunks if c.doc_id == doc_id)

    def search(self, query: str, top_k: int = 3, k1: float = 1.5, b: float = 0.75) -> list[tuple[Chunk, float]]:
        if not self.chunks:
            return []
        n = len(self.chunks)
        avg = sum(sum(tf.values()) for tf in self.tf) / n
        scores = []
        for chunk, tf in zip(self.chunks, self.tf, strict=True):
            length = sum(tf.values()) or 1
            s = 0.0
            for t in set(tokens(query)):
                if t in tf:
                    idf = math.log(1 + (n - self.df[t] + 0.5) / (self.df[t] + 0.5))
                    s += idf * tf[t] * (k1 + 1) / (tf[t] + k1 * (1 - b + b * length / avg))
            if s > 0:
                scores.append((chunk, round(s, 4)))
        scores.sort(key=lambda cs: (-cs[1], cs[0].doc_id, int(cs[0].chunk_id)))
        return scores[:top_k]


def load_directory(index: TenantIndex, directory: Path) -> int:
    count = 0
    for path in sorted(directory.glob("*.md")) + sorted(directory.glob("*.txt")):
        count += index.add_document(path.name, path.read_text())
    return count
