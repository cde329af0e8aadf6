"""RAG indexing throughput, query latency, and approximate-search recall at scale.

Part 1, the seeds corpus (`../shared/seeds` beside the repository: five interview Q&A files,
read at run time, nothing copied): Q&A chunks, embedded by genforge's all-MiniLM-L6-v2 encoder
(128-token window, as the retrieval-quality test uses).
- indexing throughput in chunks/s: BM25 alone (bm25s), dense alone (embedding + FAISS add),
  the whole hybrid build, and Milvus Lite insertion of the same vectors (its peer);
- query latency p50/p99 for BM25, dense and hybrid (RRF, k=60, top-50 of each fused), with the
  query embedding included and every cache off, one query at a time; dense through FAISS exact
  and through Milvus Lite (FLAT, inner product); and a repeated hybrid query answered by the
  query-result cache.

Part 2, scale: `--scale-n` (default 100,000) synthetic unit vectors of 384 dims in two levels of
noisy clusters (real embeddings cluster, loosely; uniform random vectors would be the worst
case for every approximate index, well-separated blobs the best case for IVF). FAISS exact (IndexFlatIP) against HNSW (M=32) and IVF-Flat
(nlist = sqrt(n)) at several efSearch / nprobe settings: build time, single-query latency
p50/p99 and recall@10 against the exact top-10.

The machine is shared with other jobs while this runs: latencies are noisy, compare within a
run. Prints the machine; writes benchmarks/results/rag.{json,md}.

    python benchmarks/rag.py                       # both parts
    python benchmarks/rag.py --scale-n 20000       # a quicker scale run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe

from genforge.rag.chunking import chunk_document
from genforge.rag.embedders import EncoderEmbedder
from genforge.rag.index import HybridIndex, QueryCache, fit_bm25
from genforge.rag.loaders import load_documents
from genforge.rag.retrieve import reciprocal_rank_fusion
from genforge.rag.stores import FaissStore

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO.parent / "shared" / "seeds"

# Our own questions, phrased independently of the corpus.
QUERIES = [
    "why scale dot products by the square root of the head dimension",
    "what does a key value cache save during generation",
    "difference between encoder only and decoder only models",
    "how is a reward model trained from human preferences",
    "what problem does layer normalization solve",
    "how does low rank adaptation reduce trainable parameters",
    "when should I use beam search instead of sampling",
    "what is perplexity and how is it computed",
    "how to stop a language model from making up facts",
    "what is the purpose of a learning rate warmup",
    "mixture of experts routing and load balancing",
    "quantizing weights to four bits with little accuracy loss",
    "how do rotary embeddings encode position",
    "chunk size and overlap for document retrieval",
    "evaluating retrieval with recall and mean reciprocal rank",
    "what is catastrophic forgetting",
    "direct preference optimization without a reward model",
    "speculative decoding with a small draft model",
    "tokenization with byte pair encoding",
    "why does attention cost grow quadratically with length",
]


def machine() -> dict:
    import faiss

    return {**describe(faiss=faiss.__version__), "faiss_threads": faiss.omp_get_max_threads()}


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "n": len(ms),
    }


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        for q in QUERIES:
            t = time.perf_counter()
            fn(q)
            out.append(time.perf_counter() - t)
    return out


def seeds_part(rounds: int, depth: int, k: int) -> dict:
    documents, skipped = load_documents(sorted(SEEDS.glob("*")))
    if not documents:
        raise SystemExit(
            f"no seeds corpus at {SEEDS}: it is read at run time from ../shared/seeds beside the repository"
        )
    chunks = [c for d in documents for c in chunk_document(d)]
    embedder = EncoderEmbedder(max_tokens=128)
    embedder.embed(["warm up the encoder"])  # first-call allocation is not indexing time
    n = len(chunks)
    result: dict = {"documents": len(documents), "chunks": n, "embedding_model": embedder.name}

    t = time.perf_counter()
    fit_bm25(chunks)
    bm25_s = time.perf_counter() - t
    embed_time = [0.0]
    real_embed = embedder.embed

    def timed_embed(texts):
        t0 = time.perf_counter()
        out = real_embed(texts)
        embed_time[0] += time.perf_counter() - t0
        return out

    embedder.embed = timed_embed
    t = time.perf_counter()
    index = HybridIndex.build(chunks, embedder)  # embeds every chunk (empty cache), FAISS add, BM25
    build_s = time.perf_counter() - t
    embedder.embed = real_embed
    embed_s = embed_time[0]
    t = time.perf_counter()
    FaissStore.create(index.embeddings, index.ids, "flat")
    faiss_add_s = time.perf_counter() - t
    t = time.perf_counter()
    again = HybridIndex.build(chunks, embedder, cache=index.embedding_cache())
    rebuild_s = time.perf_counter() - t
    assert again.last_build_embedded == 0
    result["indexing_chunks_per_s"] = {
        "bm25": round(n / bm25_s, 1),
        "dense (embed + FAISS flat add)": round(n / (embed_s + faiss_add_s), 1),
        "hybrid build": round(n / build_s, 1),
        "hybrid rebuild, all chunks cached": round(n / rebuild_s, 1),
        "FAISS flat add alone": round(n / faiss_add_s, 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        uri = str(Path(tmp) / "bench.db")
        t = time.perf_counter()
        lite = HybridIndex.build(chunks, embedder, backend="milvus", milvus_uri=uri, cache=index.embedding_cache())
        lite_build_s = time.perf_counter() - t
        result["indexing_chunks_per_s"]["hybrid build into Milvus Lite, all chunks cached"] = round(n / lite_build_s, 1)

        # Latency: every cache off, so each query embeds, searches and (for hybrid) fuses. One
        # short query is per-op overhead: a second intra-op thread only adds synchronisation
        # (and on shared cores it waits for them), so queries run on one thread.
        torch.set_num_threads(1)
        index.query_cache = QueryCache(0)
        lite.query_cache = QueryCache(0)

        def dense(q, idx=index):
            return idx.dense_search(embedder.embed([q])[0], k)

        def sparse(q):
            return index.sparse_search(q, k)

        def hybrid(q, idx=index):
            d = idx.dense_search(embedder.embed([q])[0], depth)
            s = idx.sparse_search(q, depth)
            return reciprocal_rank_fusion([[i for i, _ in d], [i for i, _ in s]], k=60)[:k]

        def embed_only(q):
            return embedder.embed([q])

        for fn in (dense, sparse, hybrid):
            fn(QUERIES[0])  # warm-up
        latency = {
            "query embedding alone": percentiles(timed(embed_only, rounds)),
            "BM25": percentiles(timed(sparse, rounds)),
            "dense, FAISS flat": percentiles(timed(dense, rounds)),
            "dense, Milvus Lite FLAT": percentiles(timed(lambda q: dense(q, lite), rounds)),
            "hybrid RRF, FAISS flat": percentiles(timed(hybrid, rounds)),
            "hybrid RRF, Milvus Lite FLAT": percentiles(timed(lambda q: hybrid(q, lite), rounds)),
        }
        same = sum([p for p, _ in dense(q)] == [p for p, _ in dense(q, lite)] for q in QUERIES)
        lite.close()
    # Incremental updates against the same corpus: one edited chunk in one file, then a whole
    # file deleted, each timed (BM25 re-fit included) next to what a full rebuild costs.
    source = chunks[len(chunks) // 2].source
    edited = [c for c in chunks if c.source == source]
    edited[0] = type(edited[0])(**{**edited[0].to_dict(), "text": edited[0].text + " (revised)"})
    t = time.perf_counter()
    counts = index.upsert(edited, embedder)
    upsert_s = time.perf_counter() - t
    t = time.perf_counter()
    removed = index.delete(source)
    delete_s = time.perf_counter() - t
    result["incremental_updates"] = {
        "upsert one file, one chunk edited": {
            "ms": round(upsert_s * 1e3, 1),
            "chunks_in_file": len(edited),
            "embedded": counts["embedded"],
        },
        "delete one file": {"ms": round(delete_s * 1e3, 1), "chunks_removed": removed},
        "full build, for comparison": {"ms": round(build_s * 1e3, 1), "embedded": n},
    }
    cached = HybridIndex.build(chunks, embedder, cache=index.embedding_cache())
    vectors: dict[str, np.ndarray] = {}

    def hybrid_cached(q):
        # What a retriever does with the index's query cache: one key per query and options.
        def compute():
            vec = vectors.setdefault(q, embedder.embed([q])[0])
            d = cached.dense_search(vec, depth)
            s = cached.sparse_search(q, depth)
            return reciprocal_rank_fusion([[i for i, _ in d], [i for i, _ in s]], k=60)[:k]

        return cached.cached(("hybrid", q, k, depth), compute)

    for q in QUERIES:
        hybrid_cached(q)
    latency["hybrid RRF, repeated query (query cache hit)"] = percentiles(timed(hybrid_cached, rounds))
    result["query_latency"] = latency
    result["faiss_vs_milvus_same_top_k"] = f"{same}/{len(QUERIES)}"
    result["settings"] = {"k": k, "hybrid_depth": depth, "rounds": rounds, "queries": len(QUERIES)}
    return result


def clustered_vectors(
    n: int,
    dim: int,
    rng: np.random.Generator,
    topics: int = 40,
    per_cluster: int = 10,
    spread: float = 0.7,
    noise: float = 2.0,
) -> np.ndarray:
    """Unit vectors in two levels of clusters: `topics` broad directions, clusters of about
    `per_cluster` vectors around points near them, and heavy per-vector noise. Calibrated so a
    query's nearest neighbours have cosine 0.3-0.35, as MiniLM queries have against relevant
    chunks, and so that they span several clusters (well-separated blobs would flatter IVF)."""
    clusters = max(1, n // per_cluster)
    broad = rng.standard_normal((topics, dim)).astype(np.float32)
    centres = broad[rng.integers(0, topics, clusters)] + spread * rng.standard_normal((clusters, dim)).astype(
        np.float32
    )
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def scale_part(n: int, dim: int, queries: int, k: int) -> dict:
    rng = np.random.default_rng(0)
    data = clustered_vectors(n + queries, dim, rng)
    base, qs = data[:n], data[n:]
    ids = np.arange(n, dtype=np.int64)
    rows = []

    def measure(name: str, store: FaissStore, build_s: float, truth: np.ndarray | None, **setting):
        found, times = [], []
        for q in qs:
            t = time.perf_counter()
            hits = store.search(q, k)
            times.append(time.perf_counter() - t)
            found.append([i for i, _ in hits])
        found = np.array([f + [-1] * (k - len(f)) for f in found])
        recall = 1.0 if truth is None else float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
        row = {
            "index": name,
            **setting,
            "build_s": round(build_s, 2),
            **percentiles(times),
            "recall@10": round(recall, 4),
        }
        print(f"  {row}", flush=True)
        rows.append(row)
        return found

    t = time.perf_counter()
    flat = FaissStore.create(base, ids, "flat")
    truth = measure("exact (IndexFlatIP)", flat, time.perf_counter() - t, None)
    t = time.perf_counter()
    hnsw = FaissStore.create(base, ids, "hnsw", hnsw_m=32)
    hnsw_s = time.perf_counter() - t
    for ef in (16, 32, 64, 128):
        hnsw.set_search_options(ef_search=ef)
        measure("HNSW M=32", hnsw, hnsw_s, truth, efSearch=ef)
    t = time.perf_counter()
    ivf = FaissStore.create(base, ids, "ivf")
    ivf_s = time.perf_counter() - t
    for nprobe in (1, 4, 8, 16, 32):
        ivf.set_search_options(nprobe=nprobe)
        measure(f"IVF-Flat nlist={ivf.index.nlist}", ivf, ivf_s, truth, nprobe=nprobe)
    exact_p50 = rows[0]["p50_ms"]
    for row in rows:
        row["speedup_vs_exact_p50"] = round(exact_p50 / row["p50_ms"], 2)
    return {
        "n": n,
        "dim": dim,
        "queries": queries,
        "k": k,
        "rows": rows,
        "data": "40 topics, clusters of ~10 around them, noise 2.0 (see clustered_vectors)",
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    out = [
        f"RAG benchmark on {m['cpu']} ({m['cores']} cores shared with other jobs: numbers are noisy), torch threads "
        f"{m['threads']} for indexing and 1 for single queries, FAISS {m['faiss']} with {m['faiss_threads']} threads, Python {m['python']}.",
        "",
    ]
    s = result.get("seeds")
    if s:
        out += [
            f"Seeds corpus: {s['documents']} files, {s['chunks']} Q&A chunks, {s['embedding_model']}.",
            "",
            "| indexing | chunks/s |",
            "|---|---|",
        ]
        out += [f"| {name} | {v} |" for name, v in s["indexing_chunks_per_s"].items()]
        out += [
            "",
            f"Query latency, one query at a time, query embedding included, caches off (except the last row); "
            f"top-{s['settings']['k']}, hybrid fuses the top-{s['settings']['hybrid_depth']} of each; "
            f"{s['settings']['queries']} queries x {s['settings']['rounds']} rounds. FAISS and Milvus Lite returned the same "
            f"dense top-k for {s['faiss_vs_milvus_same_top_k']} queries.",
            "",
            "| query | p50 ms | p99 ms | mean ms |",
            "|---|---|---|---|",
        ]
        out += [
            f"| {name} | {v['p50_ms']} | {v['p99_ms']} | {v['mean_ms']} |" for name, v in s["query_latency"].items()
        ]
    if s:
        out += ["", "| incremental update (seeds index) | ms | detail |", "|---|---|---|"]
        for name, v in s["incremental_updates"].items():
            out.append(f"| {name} | {v['ms']} | {', '.join(f'{k}={x}' for k, x in v.items() if k != 'ms')} |")
    sc = result.get("scale")
    if sc:
        out += [
            "",
            f"Scale: {sc['n']:,} synthetic {sc['dim']}-dim unit vectors ({sc['data']}), "
            f"{sc['queries']} queries one at a time, recall@{sc['k']} against exact search.",
            "",
            "| index | setting | build s | p50 ms | p99 ms | speedup (p50) | recall@10 |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sc["rows"]:
            setting = ", ".join(f"{k}={r[k]}" for k in ("efSearch", "nprobe") if k in r) or "-"
            out.append(
                f"| {r['index']} | {setting} | {r['build_s']} | {r['p50_ms']} | {r['p99_ms']} | "
                f"{r['speedup_vs_exact_p50']}x | {r['recall@10']} |"
            )
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="passes over the query list per latency row")
    parser.add_argument("--scale-n", type=int, default=100_000, help="synthetic vectors in the scale run (0 skips it)")
    parser.add_argument("--scale-queries", type=int, default=300)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="threads for indexing and the scale run (single queries on the seeds use one)",
    )
    parser.add_argument("--skip-seeds", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    result = {"machine": machine()}
    print(f"machine: {result['machine']}", flush=True)
    if not args.skip_seeds:
        result["seeds"] = seeds_part(args.rounds, depth=50, k=10)
        print(json.dumps(result["seeds"], indent=1), flush=True)
    if args.scale_n:
        result["scale"] = scale_part(args.scale_n, args.dim, args.scale_queries, k=10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from genforge.atomic import atomic_write_text

    atomic_write_text(out / "rag.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "rag.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
