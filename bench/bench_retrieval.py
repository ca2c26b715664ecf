"""Retrieval quality and cost of the RAG index on a labelled corpus, beside a raw numpy baseline.

The corpus (bench/data/retrieval) is a fictional company handbook: Markdown, text, HTML and one PDF,
with neighbouring topics as distractors. queries.jsonl labels each query with the phrase its answer
contains (not a chunk id, so re-chunking does not break labels); a hit is relevant if it comes from the
labelled document and contains the phrase. Queries are keyword-style, paraphrases, or mixed.

- quality: recall@5 and MRR@10 for vector, bm25 and hybrid (Reciprocal Rank Fusion), per query kind;
- ingest: chunks/s for the whole path (extract + chunk + embed, one document at a time as the service
  ingests) and for embedding alone (all chunks, batch 32);
- latency: p50/p99 per search over all queries x rounds, query embedding included for vector/hybrid,
  beside the raw baseline of one numpy dot + top-k over the same matrix.

    python bench/bench_retrieval.py [--rounds 10] [--sizes 40,80,120]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

# isort: off
import mesh_rag  # noqa: F401 - first: it sets the service's BLAS threading before numpy loads

# isort: on
import numpy as np

from mesh_rag.embed import Embedder
from mesh_rag.extract import SUPPORTED, extract
from mesh_rag.index import METHODS, Chunk, TenantIndex, build_document, load_directory

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data" / "retrieval"
OUT = ROOT / ".bench" / "retrieval.json"


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def load_queries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def relevant(chunk: Chunk, labels: list[dict[str, str]]) -> list[int]:
    return [
        i for i, r in enumerate(labels) if chunk.doc_id == r["doc_id"] and _norm(r["contains"]) in _norm(chunk.text)
    ]


def quality(index: TenantIndex, queries: list[dict[str, Any]], embedder: Embedder) -> dict[str, dict[str, float]]:
    """recall@5 and MRR@10 per method, overall and per query kind."""
    vectors = embedder.embed([q["query"] for q in queries])
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        per_kind: dict[str, list[tuple[float, float]]] = {}
        for q, qv in zip(queries, vectors, strict=True):
            hits = index.search(q["query"], top_k=10, method=method, query_vector=qv)
            found: set[int] = set()
            rr = 0.0
            for rank, (chunk, _) in enumerate(hits, start=1):
                match = relevant(chunk, q["relevant"])
                if match and rr == 0.0:
                    rr = 1.0 / rank
                if rank <= 5:
                    found.update(match)
            recall = len(found) / len(q["relevant"])
            for kind in ("all", q.get("kind", "other")):
                per_kind.setdefault(kind, []).append((recall, rr))
        for kind, rows in per_kind.items():
            out.setdefault(method, {})[f"recall@5/{kind}"] = statistics.fmean(r for r, _ in rows)
            out[method][f"mrr@10/{kind}"] = statistics.fmean(m for _, m in rows)
    return out


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def latency(index: TenantIndex, queries: list[dict[str, Any]], embedder: Embedder, rounds: int) -> dict[str, Any]:
    texts = [q["query"] for q in queries]
    matrix = np.concatenate([d.vectors for d in (index.get(i) for i in index.documents()) if d is not None])
    qvs = embedder.embed(texts)
    given = ("hybrid_given_vector", "vector_given_vector")
    timings: dict[str, list[float]] = {m: [] for m in (*METHODS, *given, "raw_dot", "embed_query", "embed_plus_dot")}
    index.search("warm up", method="hybrid", embedder=embedder)
    for _ in range(rounds):
        for text, qv in zip(texts, qvs, strict=True):
            t0 = time.perf_counter()
            scores = matrix @ qv
            np.argpartition(-scores, 5)[:5]
            t1 = time.perf_counter()
            v = embedder.embed([text])[0]
            t2 = time.perf_counter()
            scores = matrix @ v
            np.argpartition(-scores, 5)[:5]
            t3 = time.perf_counter()
            timings["raw_dot"].append(t1 - t0)
            timings["embed_query"].append(t2 - t1)
            timings["embed_plus_dot"].append(t3 - t1)
            for method in METHODS:
                t0 = time.perf_counter()
                index.search(text, top_k=5, method=method, embedder=embedder if method != "bm25" else None)
                timings[method].append(time.perf_counter() - t0)
            for method in ("hybrid", "vector"):  # the index's own cost: query vector already known
                t0 = time.perf_counter()
                index.search(text, top_k=5, method=method, query_vector=qv)
                timings[f"{method}_given_vector"].append(time.perf_counter() - t0)
    return {
        name: {"p50_ms": pct(s, 50) * 1e3, "p99_ms": pct(s, 99) * 1e3, "n": len(s)} for name, s in timings.items()
    } | {"matrix_shape": list(matrix.shape)}


def ingest(data: Path, embedder: Embedder) -> tuple[TenantIndex, dict[str, float]]:
    t0 = time.perf_counter()
    index = TenantIndex()
    n = load_directory(index, data, embedder)
    full = time.perf_counter() - t0
    texts = [c.text for d in (index.get(i) for i in index.documents()) if d is not None for c in d.chunks]
    t0 = time.perf_counter()
    embedder.embed(texts, batch_size=32)
    alone = time.perf_counter() - t0
    words = statistics.fmean(len(t.split()) for t in texts)
    return index, {
        "documents": len(index.documents()),
        "chunks": n,
        "mean_chunk_words": words,
        "ingest_s": full,
        "ingest_chunks_per_s": n / full,
        "embed_s": alone,
        "embed_chunks_per_s": n / alone,
    }


def size_sweep(data: Path, queries: list[dict[str, Any]], embedder: Embedder, sizes: list[int]) -> dict[int, Any]:
    files = sorted(p for p in data.iterdir() if p.suffix.lower() in SUPPORTED)
    texts = {p.name: extract(p.read_bytes(), SUPPORTED[p.suffix.lower()]) for p in files}
    results: dict[int, Any] = {}
    for size in sizes:
        index = TenantIndex()
        for name, text in texts.items():
            index.put(build_document(name, text, embedder, size=size))
        results[size] = {"chunks": len(index), **quality(index, queries, embedder)}
    return results


def main(rounds: int, sizes: list[int], data: Path, out: Path) -> None:
    t_load = time.perf_counter()
    embedder = Embedder.load()
    load_s = time.perf_counter() - t_load
    queries = load_queries(data / "queries.jsonl")
    index, ing = ingest(data, embedder)
    q = quality(index, queries, embedder)
    lat = latency(index, queries, embedder, rounds)
    kinds = sorted({k.split("/", 1)[1] for k in q["bm25"] if k.startswith("recall@5/")} - {"all"})
    counts = {k: sum(1 for x in queries if x.get("kind") == k) for k in kinds}

    print(
        f"retrieval bench: {ing['documents']} documents, {ing['chunks']} chunks "
        f"(mean {ing['mean_chunk_words']:.0f} words), {len(queries)} queries "
        f"({', '.join(f'{counts[k]} {k}' for k in kinds)}), {rounds} latency rounds; model load {load_s:.2f}s"
    )
    print()
    header = f"  {'method':<8} {'recall@5':>9} {'MRR@10':>7}  " + "  ".join(f"{'r@5 ' + k:>14}" for k in kinds)
    print(header)
    for m in METHODS:
        row = f"  {m:<8} {q[m]['recall@5/all']:>9.3f} {q[m]['mrr@10/all']:>7.3f}  "
        print(row + "  ".join(f"{q[m][f'recall@5/{k}']:>14.3f}" for k in kinds))
    print()
    print(
        f"  ingest (extract + chunk + embed, per document): {ing['ingest_chunks_per_s']:.1f} chunks/s "
        f"({ing['ingest_s']:.2f}s)"
    )
    print(
        f"  embedding alone (all chunks, batch 32):        {ing['embed_chunks_per_s']:.1f} chunks/s "
        f"({ing['embed_s']:.2f}s); embedding = {ing['embed_s'] / ing['ingest_s']:.0%} of the ingest time"
    )
    print()
    raw = lat["raw_dot"]["p50_ms"]
    emb_dot = lat["embed_plus_dot"]["p50_ms"]
    print(
        f"  latency per search, {lat['raw_dot']['n']} samples each (matrix {lat['matrix_shape'][0]}x{lat['matrix_shape'][1]}):"
    )
    print(f"  {'':<22} {'p50 ms':>8} {'p99 ms':>8}  ratio (p50)")
    print(f"  {'raw numpy dot+top5':<22} {raw:>8.3f} {lat['raw_dot']['p99_ms']:>8.3f}  1.0x")
    print(
        f"  {'embed query':<22} {lat['embed_query']['p50_ms']:>8.3f} {lat['embed_query']['p99_ms']:>8.3f}  "
        f"{lat['embed_query']['p50_ms'] / raw:.1f}x raw dot"
    )
    print(
        f"  {'embed + raw dot':<22} {emb_dot:>8.3f} {lat['embed_plus_dot']['p99_ms']:>8.3f}  "
        f"{emb_dot / raw:.1f}x raw dot"
    )
    for m in METHODS:
        base = f"{lat[m]['p50_ms'] / raw:.1f}x raw dot"
        if m != "bm25":
            base += f", {lat[m]['p50_ms'] / emb_dot:.2f}x embed+raw dot"
        print(f"  {'search ' + m:<22} {lat[m]['p50_ms']:>8.3f} {lat[m]['p99_ms']:>8.3f}  {base}")
    for m in ("hybrid", "vector"):
        row = lat[f"{m}_given_vector"]
        label = f"{m}, vector given"
        print(f"  {label:<22} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f}  {row['p50_ms'] / raw:.1f}x raw dot")

    sweep = size_sweep(data, queries, embedder, sizes) if sizes else {}
    if sweep:
        print()
        print("  chunk size sweep (words; overlap 1 sentence):")
        print(f"  {'size':>6} {'chunks':>7}  " + "  ".join(f"{m + ' r@5/MRR':>18}" for m in METHODS))
        for size, r in sweep.items():
            cells = "  ".join(f"{r[m]['recall@5/all']:>9.3f}/{r[m]['mrr@10/all']:.3f}" for m in METHODS)
            print(f"  {size:>6} {r['chunks']:>7}  {cells}")

    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model_load_s": load_s,
        "rounds": rounds,
        "queries": len(queries),
        "ingest": ing,
        "quality": q,
        "latency": lat,
        "size_sweep": sweep,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n  wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {n}")
    return n


def _sizes(value: str) -> list[int]:
    return [_positive(v) for v in value.split(",") if v.strip()]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=_positive, default=10, help="latency rounds over all queries (default 10)")
    ap.add_argument("--sizes", type=_sizes, default=[], help="also sweep chunk sizes, e.g. 40,80,120 (quality only)")
    ap.add_argument("--data", type=Path, default=DATA, help="corpus directory with queries.jsonl")
    ap.add_argument("--out", type=Path, default=OUT, help="JSON results file (default .bench/retrieval.json)")
    a = ap.parse_args()
    if not (a.data / "queries.jsonl").is_file():
        ap.error(f"no queries.jsonl in {a.data}")
    main(a.rounds, a.sizes, a.data, a.out)
