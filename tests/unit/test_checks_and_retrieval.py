"""RAG retrieval with provenance (the checker's properties: test_checker.py)."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from mesh_rag.embed import Embedder
from mesh_rag.index import TenantIndex, build_document, chunk_text, load_directory
from mesh_rag.service import SAMPLE_DOCS

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


@pytest.fixture(scope="module")
def sample_index(embedder) -> TenantIndex:
    idx = TenantIndex()
    assert load_directory(idx, SAMPLE_DOCS, embedder) > 4
    return idx


def test_chunks_are_whole_sentences_and_overlap():
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    chunks = chunk_text(text, size=40, overlap=1)
    assert len(chunks) > 3
    for a, b in itertools.pairwise(chunks):
        assert a.endswith(".") and b.endswith(".")
        assert a.split(". ")[-1] in b, "consecutive chunks share a sentence"


@pytest.mark.parametrize("method", ["hybrid", "vector", "bm25"])
def test_retrieval_ranks_the_relevant_document_and_carries_provenance(sample_index, embedder, method):
    hits = sample_index.search("which identity token do messages carry", top_k=3, method=method, embedder=embedder)
    assert hits[0][0].doc_id == "identity.md"
    chunk = hits[0][0]
    assert chunk.chunk_hash == hashlib.sha256(chunk.text.encode()).hexdigest()
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_reingest_replaces_old_chunks_and_changes_the_index_version(embedder):
    idx = TenantIndex()
    idx.put(build_document("a.md", "Old text about llamas.", embedder))
    v1 = idx.version
    idx.put(build_document("a.md", "New text about alpacas.", embedder))
    assert idx.version != v1
    assert idx.search("llamas", method="bm25") == []
    assert all("llamas" not in c.text for c, _ in idx.search("llamas", embedder=embedder))
    assert idx.search("alpacas", embedder=embedder)[0][0].doc_id == "a.md"


def test_empty_index_and_no_match():
    assert TenantIndex().search("anything") == []
