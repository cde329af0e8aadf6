"""Qdrant beside FAISS (and Milvus Lite, the other database backend) on the seeds corpus.

The seeds corpus (`../shared/seeds` beside the repository, read at run time, nothing copied) is
cut into Q&A chunks and embedded once by genforge's all-MiniLM-L6-v2 encoder (128-token window);
every store then gets the same vectors. For each store: insertion throughput (chunks/s, the
embeddings cached, so only the store's work is timed), dense top-10 latency p50/p99 on the
query vectors of `rag.py`'s twenty questions (embedded beforehand, so only the search is
timed; the query cache is off), the same with a source filter, and how many queries return
FAISS exact's top-10 (same scores in the same order, ties aside).

The machine is shared with other jobs: compare within a run. Writes
benchmarks/results/rag_qdrant.{json,md}.

    python benchmarks/rag_qdrant.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import torch
from machine import describe
from rag import QUERIES, SEEDS, percentiles

from genforge.rag.chunking import chunk_document
from genforge.rag.embedders import EncoderEmbedder
from genforge.rag.index import HybridIndex, QueryCache
from genforge.rag.loaders import load_documents

ROUNDS = 5
K = 10


def same_top_k(a, b, places=4) -> bool:
    if [round(s, places) for _, s in a] != [round(s, places) for _, s in b]:
        return False
    scores = [round(s, places) for _, s in a]
    tied = {s for s in scores if scores.count(s) > 1} | set(scores[-1:])
    return [p for p, s in a if round(s, places) not in tied] == [p for p, s in b if round(s, places) not in tied]


def search_latency(index, vectors, filters=None) -> dict:
    samples = []
    for _ in range(ROUNDS):
        for q in vectors:
            t = time.perf_counter()
            index.dense_search(q, K, filters=filters)
            samples.append(time.perf_counter() - t)
    return percentiles(samples)


def main() -> int:
    if not SEEDS.is_dir():
        print(f"seeds corpus not found at {SEEDS}", file=sys.stderr)
        return 1
    documents, _ = load_documents(sorted(SEEDS.glob("*.txt")))
    chunks = [c for d in documents for c in chunk_document(d, "qa")]
    embedder = EncoderEmbedder(max_tokens=128)
    faiss_index = HybridIndex.build(chunks, embedder)
    cache = faiss_index.embedding_cache()
    query_vectors = embedder.embed(QUERIES)
    # Single queries over 640 vectors gain nothing from threads, and threads on a shared
    # machine add waits (rag.py times its seeds queries on one thread too).
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    one_source = {"source": documents[1].source}
    result = {"machine": describe(), "chunks": len(chunks), "queries": len(QUERIES), "rounds": ROUNDS, "stores": {}}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {
            "FAISS exact (IndexFlatIP)": {},
            "Qdrant embedded, in memory": {"backend": "qdrant", "qdrant_location": ":memory:"},
            "Qdrant embedded, directory": {"backend": "qdrant", "qdrant_location": f"{tmp}/qdrant"},
            "Milvus Lite FLAT": {"backend": "milvus", "milvus_uri": f"{tmp}/milvus.db"},
        }
        for name, options in stores.items():
            t = time.perf_counter()
            index = HybridIndex.build(chunks, embedder, cache=cache, **options)
            build_s = time.perf_counter() - t
            index.query_cache = QueryCache(0)
            try:
                index.dense_search(query_vectors[0], K)  # warm up: first-call setup is not the search
                agree = sum(same_top_k(index.dense_search(q, K), faiss_index.dense_search(q, K)) for q in query_vectors)
                result["stores"][name] = {
                    "build_chunks_per_s": round(len(chunks) / build_s, 1),
                    "dense_top10": search_latency(index, query_vectors),
                    "dense_top10_one_source": search_latency(index, query_vectors, one_source),
                    "same_top10_as_faiss_exact": f"{agree}/{len(QUERIES)}",
                }
            finally:
                index.close()
            print(name, json.dumps(result["stores"][name]), flush=True)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "rag_qdrant.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Qdrant beside FAISS and Milvus Lite: seeds corpus, {len(chunks)} chunks, MiniLM vectors",
        "",
        f"Machine: {result['machine']}; one thread. Top-10 dense search, {len(QUERIES)} queries x {ROUNDS} rounds, query "
        "vectors embedded beforehand. Hybrid build = BM25 + store insertion, embeddings cached.",
        "",
        "| store | build chunks/s | p50 ms | p99 ms | p50 ms, one source | same top-10 as FAISS exact |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["stores"].items():
        lines.append(
            f"| {name} | {r['build_chunks_per_s']} | {r['dense_top10']['p50_ms']} | {r['dense_top10']['p99_ms']} | "
            f"{r['dense_top10_one_source']['p50_ms']} | {r['same_top10_as_faiss_exact']} |"
        )
    (out / "rag_qdrant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
