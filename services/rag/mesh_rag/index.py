"""Per-tenant hybrid index: overlapping chunks, BM25 + embedding search fused by rank, provenance on every hit.

Why both: BM25 finds exact identifiers, error codes and rare words that a small embedding model blurs;
embeddings find paraphrases that share no word with the document. Reciprocal Rank Fusion combines the
two rankings without calibrating their incomparable scores against each other. Neither wins everywhere
(bench/bench_retrieval.py measures all three on a labelled set), so the method is chosen per query.

Every chunk carries its document id, the document version (sha256 of the document text) and the chunk's
own sha256, so a citation can be checked against the index later. A :class:`Document` (chunks plus
their vectors) is the unit of ingest, replacement and storage: ``to_bytes`` is its durable form, so a
restart reloads documents without re-embedding them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mesh_rag.embed import MODEL_NAME
from mesh_rag.extract import SUPPORTED, ExtractError, extract

if TYPE_CHECKING:
    from mesh_rag.embed import Embedder

log = logging.getLogger("mesh.rag")

TOKEN = re.compile(r"[a-z0-9]+")
STOP = frozenset(
    "a an and are as at be by does for from how in is it of on or that the this to what when which "
    "with why also find documentation says about".split()
)
Method = Literal["hybrid", "vector", "bm25"]
METHODS: tuple[str, ...] = ("hybrid", "vector", "bm25")
K1, B = 1.5, 0.75  # BM25 term-frequency saturation and length normalisation
MIN_SIMILARITY = 0.2
"""Cosine below which a chunk is not a vector candidate. For all-MiniLM-L6-v2 on the labelled set
(bench/data/retrieval) the best relevant chunk's cosine has p5 0.27 and median 0.48; questions the
documents do not cover ("What is 2 + 2?", "capital of France") score 0.00-0.13."""
RRF_K = 60  # Reciprocal Rank Fusion constant (Cormack et al. 2009): 1 / (60 + rank)


def tokens(text: str) -> list[str]:
    """BM25 terms: lowercase alphanumeric runs, minus stop words."""
    return [t for t in TOKEN.findall(text.lower()) if t not in STOP]


# --- chunking ------------------------------------------------------------------------------------


def _sentences(text: str) -> list[str]:
    sentences: list[str] = []
    for para in re.split(r"\n\s*\n|\n(?=#)|(?<=\n)(?=#)", text):
        if para.lstrip().startswith("#"):  # a heading is a sentence of its own
            heading, _, rest = para.strip().partition("\n")
            if title := heading.lstrip("# ").strip():
                sentences.append(title + ".")
            para = rest
        para = " ".join(para.split())
        if para:
            sentences += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9#])", para) if s]
    return sentences


def _word_windows(words: list[str], size: int, overlap: int) -> list[str]:
    """A sentence too long to pack, cut into windows of ``size`` words sharing ``overlap`` words."""
    step = max(size - overlap, 1)
    return [" ".join(words[start : start + size]) for start in range(0, max(len(words) - overlap, 1), step)]


def chunk_text(text: str, size: int = 80, overlap: int = 1) -> list[str]:
    """Pack whole sentences into chunks of about ``size`` words; consecutive chunks share
    ``overlap`` sentences so a fact split across a boundary is still found whole.
    Headings and paragraphs are never merged into the middle of a sentence.

    A sentence longer than ``size`` words (a table flattened to one line, a run-on list) cannot be
    packed: it is cut into word windows of ``size`` words that overlap by a fifth, each its own chunk,
    so no chunk exceeds about ``2 * size`` words (which keeps it inside the model's 256-token window)."""
    size = max(size, 1)
    chunks: list[str] = []
    current: list[str] = []

    def words_in(parts: list[str]) -> int:
        return sum(len(s.split()) for s in parts)

    for sentence in _sentences(text):
        words = sentence.split()
        if len(words) > size:
            if current and not (chunks and " ".join(current) in chunks[-1]):
                chunks.append(" ".join(current))
            chunks += _word_windows(words, size, size // 5 if overlap else 0)
            current = []
            continue
        if current and words_in(current) + len(words) > size:
            chunks.append(" ".join(current))
            current = current[-overlap:] if overlap else []
        current.append(sentence)
    if current and (not chunks or " ".join(current) not in chunks[-1]):
        chunks.append(" ".join(current))
    return chunks


# --- documents -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    version: str
    chunk_id: str
    text: str

    @property
    def chunk_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


_MAGIC = b"MESHDOC\x00"
_FORMAT = 1
_VECTOR_DTYPES: dict[str, np.dtype[np.floating[Any]]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


@dataclass(eq=False)  # numpy arrays have no truth value, so field-wise == would raise
class Document:
    """One version of one document: its chunks and one unit vector per chunk."""

    doc_id: str
    version: str
    title: str
    media_type: str
    chunks: list[Chunk]
    vectors: np.ndarray  # (len(chunks), dim) float32
    embedder: str = MODEL_NAME

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.chunks):
            raise ValueError(f"{self.doc_id}: {len(self.chunks)} chunks but vectors of shape {self.vectors.shape}")
        if any(c.doc_id != self.doc_id or c.version != self.version for c in self.chunks):
            raise ValueError(f"{self.doc_id}: every chunk must carry the document's id and version")

    def to_bytes(self, vector_dtype: Literal["float32", "float16"] = "float32") -> bytes:
        """``MESHDOC\\0``, a 4-byte little-endian header length, a JSON header (metadata and chunk
        texts), then the vectors as raw little-endian floats. float16 halves the blob at a cosine cost
        of about 1e-4; float32 round-trips exactly."""
        raw = self.vectors.astype(_VECTOR_DTYPES[vector_dtype]).tobytes()
        chunks = [[c.chunk_id, c.text] for c in self.chunks]
        header = {
            "format": _FORMAT,
            "doc_id": self.doc_id,
            "version": self.version,
            "title": self.title,
            "media_type": self.media_type,
            "embedder": self.embedder,
            "dim": int(self.vectors.shape[1]),
            "dtype": vector_dtype,
            "chunks": chunks,
            "sha256": _digest(chunks, raw),
        }
        body = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        return _MAGIC + struct.pack("<I", len(body)) + body + raw

    @classmethod
    def from_bytes(cls, data: bytes) -> Document:
        """Inverse of :meth:`to_bytes`; ``ValueError`` for anything else or any corruption."""
        if len(data) < 12 or data[:8] != _MAGIC:
            raise ValueError("not a stored document (bad magic)")
        (length,) = struct.unpack_from("<I", data, 8)
        if 12 + length > len(data):
            raise ValueError("stored document is truncated (header)")
        try:
            h = json.loads(data[12 : 12 + length])
            if h["format"] != _FORMAT:
                raise ValueError(f"unknown stored document format {h['format']!r}")
            dtype = _VECTOR_DTYPES[h["dtype"]]
            dim, chunks = int(h["dim"]), [(str(cid), str(text)) for cid, text in h["chunks"]]
            doc_id, version = str(h["doc_id"]), str(h["version"])
            meta = (str(h["title"]), str(h["media_type"]), str(h["embedder"]), str(h["sha256"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"stored document has a corrupt header: {e}") from e
        raw = data[12 + length :]
        if dim <= 0 or len(raw) != len(chunks) * dim * dtype.itemsize:
            raise ValueError(f"stored document is corrupt: {len(raw)} vector bytes for {len(chunks)}x{dim}")
        if _digest([list(c) for c in chunks], raw) != meta[3]:
            raise ValueError("stored document is corrupt: checksum mismatch")
        vectors = np.frombuffer(raw, dtype=dtype).reshape(len(chunks), dim).astype(np.float32)
        return cls(
            doc_id=doc_id,
            version=version,
            title=meta[0],
            media_type=meta[1],
            chunks=[Chunk(doc_id, version, cid, text) for cid, text in chunks],
            vectors=vectors,
            embedder=meta[2],
        )


def _digest(chunks: list[list[str]], raw: bytes) -> str:
    h = hashlib.sha256(json.dumps(chunks, ensure_ascii=False).encode())
    h.update(raw)
    return h.hexdigest()


def document_version(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_document(
    doc_id: str,
    text: str,
    embedder: Embedder,
    *,
    media_type: str = "text/plain",
    title: str = "",
    size: int = 80,
    overlap: int = 1,
) -> Document:
    """Chunk ``text`` and embed every chunk (the slow part of ingest: do it off the event loop)."""
    version = document_version(text)
    bodies = chunk_text(text, size=size, overlap=overlap)
    return Document(
        doc_id=doc_id,
        version=version,
        title=title,
        media_type=media_type,
        chunks=[Chunk(doc_id, version, str(i), body) for i, body in enumerate(bodies)],
        vectors=embedder.embed(bodies).reshape(len(bodies), embedder.dim),
        embedder=embedder.name,
    )


# --- the index -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Terms:
    """One document's BM25 statistics, computed once at ``put``: (term id, chunk, frequency) triples."""

    term_ids: np.ndarray  # int64
    rows: np.ndarray  # int64, chunk position within the document
    tfs: np.ndarray  # float64
    lengths: np.ndarray  # float64, number of terms of each chunk


@dataclass(frozen=True)
class _Snapshot:
    """Everything a query reads, rebuilt after put/remove; immutable so searches need no lock."""

    chunks: list[Chunk]  # ordered by (doc_id, position in document): the tie-break order
    matrix: np.ndarray  # (n, dim) float32, one row per chunk
    vocab: dict[str, int]  # term -> id (shared with the index; only ever grows)
    indptr: np.ndarray  # postings of term id t are post_rows/post_tfs[indptr[t]:indptr[t + 1]]
    post_rows: np.ndarray
    post_tfs: np.ndarray
    lengths: np.ndarray  # BM25 length of every chunk
    avg_length: float


class TenantIndex:
    """One tenant's documents. ``put``/``remove`` are cheap (a document's terms are counted once, at
    ``put``); the search structures are rebuilt lazily, with numpy, on the first search after a change."""

    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}
        self._terms: dict[str, _Terms] = {}
        self._vocab: dict[str, int] = {}
        self._dim: int | None = None  # vector dim shared by every document with chunks
        self._with_chunks = 0  # how many documents have chunks (and so vectors)
        self._snapshot: _Snapshot | None = None
        self._lock = threading.Lock()

    def put(self, doc: Document) -> None:
        """Add ``doc``, or replace every chunk of an earlier version of the same ``doc_id``."""
        counts = [Counter(tokens(c.text)) for c in doc.chunks]
        with self._lock:
            old = self._docs.get(doc.doc_id)
            others = self._with_chunks - (1 if old is not None and old.chunks else 0)
            if doc.chunks and others and doc.vectors.shape[1] != self._dim:
                raise ValueError(
                    f"{doc.doc_id}: vectors of dim {doc.vectors.shape[1]}, the index holds dim {self._dim}"
                )
            term_ids: list[int] = []
            rows: list[int] = []
            tfs: list[int] = []
            for row, counter in enumerate(counts):
                for term, tf in counter.items():
                    term_ids.append(self._vocab.setdefault(term, len(self._vocab)))
                    rows.append(row)
                    tfs.append(tf)
            self._terms[doc.doc_id] = _Terms(
                np.array(term_ids, dtype=np.int64),
                np.array(rows, dtype=np.int64),
                np.array(tfs, dtype=np.float64),
                np.array([max(c.total(), 1) for c in counts], dtype=np.float64),
            )
            self._docs[doc.doc_id] = doc
            self._with_chunks = others + (1 if doc.chunks else 0)
            if doc.chunks:
                self._dim = doc.vectors.shape[1]
            self._snapshot = None

    def remove(self, doc_id: str) -> bool:
        with self._lock:
            self._terms.pop(doc_id, None)
            old = self._docs.pop(doc_id, None)
            if old is not None and old.chunks:
                self._with_chunks -= 1
            self._snapshot = None
        return old is not None

    def get(self, doc_id: str) -> Document | None:
        return self._docs.get(doc_id)

    def documents(self) -> dict[str, str]:
        """doc_id -> version, sorted by doc_id."""
        return {doc_id: self._docs[doc_id].version for doc_id in sorted(self._docs)}

    @property
    def version(self) -> str:
        """Digest of the (doc_id, version) pairs: equal indexes have equal versions."""
        if not self._docs:
            return "empty"
        pairs = "\n".join(f"{doc_id}\0{version}" for doc_id, version in self.documents().items())
        return hashlib.sha256(pairs.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return sum(len(d.chunks) for d in self._docs.values())

    def _snap(self) -> _Snapshot:
        snap = self._snapshot
        if snap is not None:
            return snap
        with self._lock:
            if self._snapshot is None:
                self._snapshot = self._build()
            return self._snapshot

    def _build(self) -> _Snapshot:
        ids = sorted(self._docs)
        docs = [self._docs[i] for i in ids]
        terms = [self._terms[i] for i in ids]
        chunks = [c for d in docs for c in d.chunks]
        blocks = [d.vectors for d in docs if d.chunks]
        matrix = np.concatenate(blocks) if blocks else np.zeros((0, self._dim or 0), np.float32)
        offsets = np.cumsum([0] + [len(d.chunks) for d in docs])
        term_ids = np.concatenate([np.zeros(0, np.int64)] + [t.term_ids for t in terms])
        rows = np.concatenate([np.zeros(0, np.int64)] + [t.rows + off for t, off in zip(terms, offsets, strict=False)])
        tfs = np.concatenate([np.zeros(0)] + [t.tfs for t in terms])
        order = np.argsort(term_ids, kind="stable")  # group by term; rows stay ascending within a term
        indptr = np.searchsorted(term_ids[order], np.arange(len(self._vocab) + 1))
        lengths = np.concatenate([np.zeros(0)] + [t.lengths for t in terms])
        avg = float(lengths.mean()) if len(lengths) else 1.0
        return _Snapshot(chunks, matrix, self._vocab, indptr, rows[order], tfs[order], lengths, avg)

    def search(
        self,
        query: str,
        top_k: int = 3,
        *,
        method: Method = "hybrid",
        query_vector: np.ndarray | None = None,
        embedder: Embedder | None = None,
        min_similarity: float = MIN_SIMILARITY,
        scope: tuple[str, ...] = (),
    ) -> list[tuple[Chunk, float]]:
        """The ``top_k`` best chunks with their scores, best first; ties ordered by (doc_id, chunk).

        ``bm25``: Okapi BM25 (only chunks sharing a term with the query). ``vector``: cosine
        similarity to ``query_vector`` (or to ``embedder``'s embedding of ``query``). ``hybrid``:
        Reciprocal Rank Fusion, sum of 1/(60 + rank) over the top max(50, 5*top_k) of both lists.
        A chunk whose cosine similarity is below ``min_similarity`` is no vector candidate: nearest
        is not the same as relevant, and a question the documents cannot answer gets no hits.
        ``scope``: only documents whose id starts with one of these (an agent profile's); empty: all."""
        if method not in METHODS:
            raise ValueError(f"unknown search method {method!r} (use one of {', '.join(METHODS)})")
        snap = self._snap()
        if top_k <= 0 or not snap.chunks:
            return []
        inside = _inside(snap, scope)
        if method == "bm25":
            return _top(snap, _bm25(snap, query) * inside, top_k, positive_only=True)
        qv = _query_vector(query, query_vector, embedder, snap.matrix.shape[1])
        cosine = snap.matrix @ qv
        cosine = np.where((cosine >= min_similarity) & (inside > 0), cosine, 0.0)
        if method == "vector":
            return _top(snap, cosine, top_k, positive_only=True)
        depth = max(50, 5 * top_k)
        fused = np.zeros(len(snap.chunks), dtype=np.float64)
        for ranked in (
            _ranking(cosine, depth, positive_only=True),
            _ranking(_bm25(snap, query) * inside, depth, positive_only=True),
        ):
            fused[ranked] += 1.0 / (RRF_K + np.arange(1, len(ranked) + 1))
        return _top(snap, fused, top_k, positive_only=True)


def _inside(snap: _Snapshot, scope: tuple[str, ...]) -> np.ndarray:
    """1.0 for each chunk of a document in ``scope`` (doc id prefixes; empty: all), else 0.0."""
    if not scope:
        return np.ones(len(snap.chunks), dtype=np.float64)
    return np.array([1.0 if c.doc_id.startswith(scope) else 0.0 for c in snap.chunks], dtype=np.float64)


def _query_vector(query: str, query_vector: np.ndarray | None, embedder: Embedder | None, dim: int) -> np.ndarray:
    if query_vector is None:
        if embedder is None:
            raise ValueError("vector and hybrid search need query_vector= or embedder=")
        query_vector = embedder.embed([query])[0]
    qv = np.asarray(query_vector, dtype=np.float32).reshape(-1)
    if qv.shape[0] != dim:
        raise ValueError(f"query vector has dim {qv.shape[0]}, the index holds dim {dim}")
    norm = float(np.linalg.norm(qv))
    return qv / norm if norm > 0 else qv


def _bm25(snap: _Snapshot, query: str) -> np.ndarray:
    n = len(snap.chunks)
    scores = np.zeros(n, dtype=np.float64)
    norm = K1 * (1 - B + B * snap.lengths / snap.avg_length)
    for term in sorted(set(tokens(query))):  # fixed order: float sums do not depend on hashing
        tid = snap.vocab.get(term)
        if tid is None or tid + 1 >= len(snap.indptr):  # unknown, or new since this snapshot
            continue
        start, end = int(snap.indptr[tid]), int(snap.indptr[tid + 1])
        if start == end:
            continue
        rows, tf = snap.post_rows[start:end], snap.post_tfs[start:end]
        idf = math.log(1 + (n - (end - start) + 0.5) / (end - start + 0.5))
        scores[rows] += idf * tf * (K1 + 1) / (tf + norm[rows])
    return scores


def _ranking(scores: np.ndarray, depth: int, positive_only: bool = False) -> np.ndarray:
    """Row numbers of the ``depth`` best scores, best first, ties in row (= doc_id, chunk) order."""
    rounded = np.round(scores, 6)
    if len(rounded) > depth:
        cut = -np.partition(-rounded, depth - 1)[depth - 1]
        candidates = np.flatnonzero(rounded >= cut)
    else:
        candidates = np.arange(len(rounded))
    if positive_only:
        candidates = candidates[rounded[candidates] > 0]
    order = candidates[np.argsort(-rounded[candidates], kind="stable")]
    return order[:depth]


def _top(snap: _Snapshot, scores: np.ndarray, top_k: int, positive_only: bool = False) -> list[tuple[Chunk, float]]:
    return [(snap.chunks[i], round(float(scores[i]), 6)) for i in _ranking(scores, top_k, positive_only)]


def load_directory(index: TenantIndex, directory: Path, embedder: Embedder) -> int:
    """Ingest every supported file of ``directory`` (doc_id = file name); returns the number of chunks.
    A file that cannot be read as text is logged and skipped, so one bad upload cannot stop a start."""
    count = 0
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED):
        media_type = SUPPORTED[path.suffix.lower()]
        try:
            text = extract(path.read_bytes(), media_type)
        except ExtractError as e:
            log.warning("skipping %s: %s", path.name, e)
            continue
        heading = next((line[2:].strip() for line in text.split("\n") if line.startswith("# ")), "")
        doc = build_document(path.name, text, embedder, media_type=media_type, title=heading or path.stem)
        index.put(doc)
        count += len(doc.chunks)
    return count
