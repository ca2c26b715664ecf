"""Chunking, stored documents and the per-tenant hybrid index (with the real embedding model)."""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from mesh_rag.embed import Embedder
from mesh_rag.index import (
    Chunk,
    Document,
    TenantIndex,
    build_document,
    chunk_text,
    document_version,
    load_directory,
    tokens,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


# --- chunking ------------------------------------------------------------------------------------


def test_tokens_drop_stop_words() -> None:
    assert tokens("What is the X-42 refund, and WHY?") == ["x", "42", "refund"]


def test_chunks_overlap_by_a_sentence_and_respect_the_size() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    chunks = chunk_text(text, size=40, overlap=1)
    assert len(chunks) > 3
    for a, b in itertools.pairwise(chunks):
        assert a.split(". ")[-1] in b, "consecutive chunks share a sentence"
    assert all(len(c.split()) <= 40 for c in chunks)
    no_overlap = chunk_text(text, size=40, overlap=0)
    assert all(no_overlap) and len(no_overlap) < len(chunks)
    numbers = [int(n) for c in no_overlap for n in re.findall(r"number (\d+)", c)]
    assert numbers == list(range(60)), "without overlap every sentence appears exactly once, in order"


def test_headings_are_sentences_and_nothing_is_empty() -> None:
    text = "# Title\n\nFirst para. Second sentence.\n## Sub\nBody text here.\n\n#\n\n   \n"
    chunks = chunk_text(text, size=80)
    assert chunks == ["Title. First para. Second sentence. Sub. Body text here."]
    assert chunk_text("") == [] and chunk_text(" \n\n \t") == []


def test_a_very_long_sentence_is_split_by_words_with_overlap() -> None:
    words = [f"W{i}" for i in range(500)]
    text = "Intro sentence. " + " ".join(words) + ". Closing sentence here."
    chunks = chunk_text(text, size=80, overlap=1)
    assert all(0 < len(c.split()) <= 160 for c in chunks)
    covered = [w.rstrip(".") for c in chunks for w in c.split()]
    assert set(words) <= set(covered), "every word lands in some chunk"
    windows = [c.split() for c in chunks if c.split()[0].startswith("W")]
    assert len(windows) >= 6
    for a, b in itertools.pairwise(windows):
        assert set(a) & set(b), "consecutive windows overlap"
    assert chunks[0] == "Intro sentence." and chunks[-1].endswith("Closing sentence here.")


# --- documents -----------------------------------------------------------------------------------


def _doc(doc_id: str, texts: list[str], dim: int = 4, seed: int = 0) -> Document:
    version = document_version("".join(texts))
    vectors = np.random.default_rng(seed).standard_normal((len(texts), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk(doc_id, version, str(i), t) for i, t in enumerate(texts)]
    return Document(doc_id, version, "Title", "text/markdown", chunks, vectors)


def test_document_round_trips_through_bytes() -> None:
    doc = _doc("a.md", ["First chunk, with ünïcode.", "Second chunk."], dim=384)
    back = Document.from_bytes(doc.to_bytes())
    assert (back.doc_id, back.version, back.title, back.media_type, back.embedder) == (
        doc.doc_id,
        doc.version,
        doc.title,
        doc.media_type,
        doc.embedder,
    )
    assert back.chunks == doc.chunks and back.chunks[0].chunk_hash == doc.chunks[0].chunk_hash
    assert np.array_equal(back.vectors, doc.vectors) and back.vectors.dtype == np.float32
    half = Document.from_bytes(doc.to_bytes("float16"))
    assert len(doc.to_bytes("float16")) < len(doc.to_bytes())
    assert float((half.vectors * doc.vectors).sum(1).min()) > 0.9999
    empty = _doc("e.md", [])
    assert Document.from_bytes(empty.to_bytes()).chunks == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b"",
        lambda b: b"not a document at all",
        lambda b: b"PK" + b[2:],  # bad magic
        lambda b: b[:-1],  # truncated vectors
        lambda b: b[:20],  # truncated header
        lambda b: b[:-3] + bytes([b[-3] ^ 0x40]) + b[-2:],  # a flipped bit in a vector
        lambda b: b.replace(b"First", b"Forst"),  # edited chunk text
        lambda b: b.replace(b'"format":1', b'"format":9'),
    ],
)
def test_corrupt_blobs_raise_value_error(damage) -> None:
    blob = _doc("a.md", ["First chunk.", "Second chunk."]).to_bytes()
    Document.from_bytes(blob)
    with pytest.raises(ValueError):
        Document.from_bytes(damage(blob))


def test_document_rejects_mismatched_vectors() -> None:
    doc = _doc("a.md", ["one", "two"])
    with pytest.raises(ValueError, match="2 chunks"):
        Document("a.md", doc.version, "", "text/plain", doc.chunks, doc.vectors[:1])


# --- the index -----------------------------------------------------------------------------------


def test_put_replaces_every_old_chunk_and_changes_the_version(embedder: Embedder) -> None:
    idx = TenantIndex()
    assert idx.version == "empty" and len(idx) == 0
    idx.put(build_document("a.md", "Old text about llamas. " * 30, embedder, size=20))
    old = idx.version
    assert len(idx) > 1
    idx.put(build_document("a.md", "New text about alpacas.", embedder))
    assert idx.version != old and len(idx) == 1
    assert idx.documents() == {"a.md": document_version("New text about alpacas.")}
    assert idx.search("llamas", method="bm25") == []
    for method in ("hybrid", "vector", "bm25"):
        hits = idx.search("alpacas", method=method, embedder=embedder)
        assert [(c.doc_id, c.text) for c, _ in hits] == [("a.md", "New text about alpacas.")]


def test_remove_and_version_are_deterministic(embedder: Embedder) -> None:
    a, b = TenantIndex(), TenantIndex()
    da = build_document("a.md", "Alpha document.", embedder)
    db = build_document("b.md", "Beta document.", embedder)
    a.put(da)
    a.put(db)
    b.put(db)
    b.put(da)
    assert a.version == b.version != "empty"
    assert a.remove("a.md") and not a.remove("a.md")
    assert a.documents() == {"b.md": db.version} and len(a) == 1
    assert a.remove("b.md") and a.version == "empty" and a.search("anything") == []


def test_tenant_indexes_are_independent(embedder: Embedder) -> None:
    acme, globex = TenantIndex(), TenantIndex()
    acme.put(build_document("secret.md", "Acme's launch code is orange.", embedder))
    assert globex.search("launch code", embedder=embedder) == []
    assert globex.documents() == {} and len(globex) == 0
    assert acme.search("launch code", embedder=embedder)[0][0].doc_id == "secret.md"


CORPUS = {
    "notes.md": "Notes from the March all-hands. The cafeteria menu changes on Monday and parking permits renew in "
    "April. Build 7731b of the badge reader firmware is out. The summer party moves to Thursday.",
    "firmware.md": "Badge reader firmware updates are installed by facilities every quarter.",
    "travel.md": "If a strike or a storm disrupts your journey, book new accommodation; the company reimburses it.",
    "flights.md": "Book every flight through the portal. Economy class is the rule for a flight of any length.",
    "hotels.md": "Hotel rooms are capped at 180 euros per night. Pay for the hotel with the company card.",
    "faults.md": "Report every fault code from the coffee machine to facilities. Codes starting with E are urgent.",
    "security.md": "Lost laptops must be reported to the IT helpdesk within one hour.",
}


@pytest.fixture(scope="module")
def corpus(embedder: Embedder) -> TenantIndex:
    idx = TenantIndex()
    for doc_id, text in CORPUS.items():
        idx.put(build_document(doc_id, text, embedder))
    return idx


def test_hybrid_finds_a_keyword_only_and_a_paraphrase_only_target(corpus: TenantIndex, embedder: Embedder) -> None:
    # a build number buried in an unrelated note: the embedding of the whole chunk barely reflects it
    keyword = "7731b"
    by_vector = corpus.search(keyword, 1, method="vector", embedder=embedder)
    assert not by_vector or by_vector[0][0].doc_id != "notes.md"
    assert corpus.search(keyword, 1, method="bm25")[0][0].doc_id == "notes.md"
    assert corpus.search(keyword, 1, embedder=embedder)[0][0].doc_id == "notes.md"

    # a question that shares no word with its answer, while two other documents share several
    paraphrase = "my flight got cancelled, who pays for the hotel?"
    assert "travel.md" not in {c.doc_id for c, _ in corpus.search(paraphrase, 6, method="bm25")}, "no shared words"
    assert corpus.search(paraphrase, 1, method="vector", embedder=embedder)[0][0].doc_id == "travel.md"
    assert "travel.md" in {c.doc_id for c, _ in corpus.search(paraphrase, 3, embedder=embedder)}


def test_scores_are_ordered_and_query_vector_equals_embedder(corpus: TenantIndex, embedder: Embedder) -> None:
    query = "who pays for a hotel when a storm cancels my trip"
    qv = embedder.embed([query])[0]
    for method in ("hybrid", "vector"):
        by_vector = corpus.search(query, 5, method=method, query_vector=qv, min_similarity=-1.0)
        assert by_vector == corpus.search(query, 5, method=method, embedder=embedder, min_similarity=-1.0)
        scores = [s for _, s in by_vector]
        assert scores == sorted(scores, reverse=True) and len(by_vector) == 5
    assert corpus.search(query, 0, embedder=embedder) == []


def test_ties_are_broken_by_doc_id_then_chunk(embedder: Embedder) -> None:
    idx = TenantIndex()
    text = "Identical refund text. " * 12
    for doc_id in ("b.md", "a.md", "c.md"):
        idx.put(build_document(doc_id, text, embedder, size=10))
    for method in ("hybrid", "vector", "bm25"):
        hits = idx.search("refund text", top_k=30, method=method, embedder=embedder)
        keys = [(-s, c.doc_id, int(c.chunk_id)) for c, s in hits]
        assert keys == sorted(keys), method
        assert hits == idx.search("refund text", top_k=30, method=method, embedder=embedder)


def test_bad_arguments_raise(corpus: TenantIndex) -> None:
    with pytest.raises(ValueError, match="query_vector= or embedder="):
        corpus.search("anything")
    with pytest.raises(ValueError, match="dim 3"):
        corpus.search("anything", query_vector=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="unknown search method"):
        corpus.search("anything", method="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dim"):
        corpus.put(_doc("small.md", ["tiny vectors"], dim=4))


def test_load_directory_reads_every_format(tmp_path: Path, embedder: Embedder, caplog) -> None:
    (tmp_path / "a.md").write_text("# Alpha\n\nAlpha body text.")
    (tmp_path / "b.txt").write_text("Beta plain text.")
    (tmp_path / "c.html").write_text("<h1>Gamma</h1><p>Gamma &amp; friends.</p><script>x()</script>")
    (tmp_path / "d.pdf").write_bytes(b"%PDF-1.7 broken")  # unreadable: logged and skipped
    (tmp_path / "e.docx").write_bytes(b"PK\x03\x04")  # unsupported: ignored
    idx = TenantIndex()
    with caplog.at_level(logging.WARNING, logger="mesh.rag"):
        assert load_directory(idx, tmp_path, embedder) == 3
    assert set(idx.documents()) == {"a.md", "b.txt", "c.html"}
    assert "d.pdf" in caplog.text and "not a readable PDF" in caplog.text
    assert idx.search("gamma friends", 1, embedder=embedder)[0][0].text == "Gamma. Gamma & friends."


def test_a_question_the_documents_do_not_cover_gets_no_vector_hits(corpus: TenantIndex, embedder: Embedder) -> None:
    """Nearest is not relevant: below the similarity floor a chunk is no candidate, so an
    unanswerable question gets nothing to cite (and the checker can say so)."""
    for query in ("What is 2 + 2?", "recipe for banana bread"):
        assert corpus.search(query, 3, method="vector", embedder=embedder) == []
    assert corpus.search("recipe for banana bread", 3, method="vector", embedder=embedder, min_similarity=-1.0)


async def test_a_tenant_index_over_its_quota_refuses_the_ingest_and_keeps_what_it_had():
    """The rag bucket holds every tenant's index: a tenant at its quota (``MESH_RAG_INDEX_*``) gets
    ``ok: false`` with the reason; its index and every other tenant's are as they were, and the
    parts written for the refused document are gone (nothing the manifest does not name stays)."""
    from mesh_rag.embed import Embedder
    from mesh_rag.service import Rag
    from mesh_rag.store import IndexFull, IndexQuota, Store
    from mesh_testing.memkv import MemoryKV

    kv = MemoryKV()
    quota = {"acme": IndexQuota(bytes=0, docs=2), "globex": IndexQuota()}
    rag = Rag(None, embedder=Embedder.load(), index_quota=quota.__getitem__)  # type: ignore[arg-type]
    rag.store = Store(kv)
    text = b"# Refunds\n\nRefunds are paid within thirty days of a written request."
    for doc in ("a.md", "b.md"):
        assert (await rag.ingest("acme", doc, text + doc.encode(), "text/markdown"))["ok"]

    def live() -> set[str]:
        return {k for k, e in kv.data.items() if e.value is not None}

    kept = live()
    manifest, _ = await rag.store.manifest("acme")
    with pytest.raises(IndexFull, match="holds 2 documents, its limit of 2"):
        await rag.ingest("acme", "c.md", text + b"c", "text/markdown")
    assert live() == kept
    assert (await rag.store.manifest("acme"))[0].docs.keys() == manifest.docs.keys()
    assert (await rag.ingest("acme", "a.md", text + b"a, revised", "text/markdown"))["ok"], "a replacement fits"
    assert (await rag.ingest("globex", "c.md", text, "text/markdown"))["ok"], "another tenant is untouched"
    quota["acme"] = IndexQuota(bytes=1)
    with pytest.raises(IndexFull, match="would pass its limit"):
        await rag.ingest("acme", "a.md", text + b"a, again", "text/markdown")


def test_a_scope_keeps_every_method_to_the_documents_it_names(embedder: Embedder) -> None:
    """An agent profile's ``documents``: retrieval sees only ids with one of its prefixes, whatever
    ranks higher outside them, and a scope that matches nothing finds nothing."""
    idx = TenantIndex()
    idx.put(build_document("finance/q3.md", "Refunds rose in the third quarter: 412 refunds.", embedder))
    idx.put(build_document("hr/leave.md", "Refunds of leave days: unused leave is refunded in March.", embedder))
    idx.put(build_document("finance/q4.md", "The fourth quarter closed with fewer refunds.", embedder))
    for method in ("hybrid", "vector", "bm25"):
        everything = {c.doc_id for c, _ in idx.search("refunds", 5, method=method, embedder=embedder)}
        assert "hr/leave.md" in everything, method
        scoped = [c.doc_id for c, _ in idx.search("refunds", 5, method=method, embedder=embedder, scope=("finance/",))]
        assert scoped and all(d.startswith("finance/") for d in scoped), (method, scoped)
        both = {c.doc_id for c, _ in idx.search("refunds", 5, method=method, embedder=embedder,
                                                scope=("finance/q3", "hr/"))}  # fmt: skip
        assert both <= {"finance/q3.md", "hr/leave.md"} and "finance/q4.md" not in both, (method, both)
        assert idx.search("refunds", 5, method=method, embedder=embedder, scope=("legal/",)) == []
