"""Multi-vector (ColBERT-style) first-stage retrieval against dense and hybrid on the seeds
corpus, and a third hybrid signal tested on held-out queries.

The seeds corpus (`../shared/seeds` beside the repository, read at run time, nothing copied) is
chunked into Q&A items and indexed with genforge's all-MiniLM-L6-v2 (128-token window, as the
retrieval-quality test uses), with every chunk's token vectors kept for MaxSim
(`HybridIndex.build(..., multivector=True)`). The queries and judgments are the project's own
(`tests/test_rag_evaluate.py`: 27 paraphrase queries, 1-6 relevant items each).

Part 1, multi-vector retrieval:
- index size: the token-vector index (centroids, codes, residuals) against the dense index's
  float32 vectors, for residual compression at 1 and 2 bits per dimension and for float16
  vectors without compression;
- quality: recall@5, recall@10 and MRR of BM25, dense, hybrid (the CLI's weighted default) and
  MaxSim with PLAID pruning, exhaustively, and over uncompressed vectors;
- pruning against brute force: the share of the exhaustive top 10 that the pruned search
  returns, at several (nprobe, candidates) settings, over the 27 evaluation queries and the 20
  queries of benchmarks/rag.py;
- latency p50/p99, one query at a time on one thread, query encoding included, caches off.

Part 2, a third signal for hybrid, each tuned by 2-fold cross-validation (queries split by
alternating id order; a setting is chosen on one half and measured on the other, so every
query's number comes from a setting chosen without it):
- MaxSim over token vectors fused into weighted hybrid with weight w (dense and BM25 at 0.5);
- BM25 field weighting: a Q&A item's question counted r extra times in its BM25 text (the
  question is the item's title field; repeating a field is BM25F with integer field weights
  when the length normalisation is shared, Robertson, Zaragoza & Taylor 2004).
The `wordllama` static embeddings were not measured (not installed here).

    python benchmarks/rag_multivector.py            # writes benchmarks/results/rag_multivector.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from rag import QUERIES as LATENCY_QUERIES  # noqa: E402
from test_rag_evaluate import EVAL_QUERIES, SEEDS, item_id  # noqa: E402

from genforge.rag import EncoderEmbedder, HybridIndex, Retriever, chunk_document, load_documents  # noqa: E402
from genforge.rag.index import QueryCache, fit_bm25  # noqa: E402
from genforge.rag.multivector import DEFAULT_CANDIDATES, DEFAULT_NPROBE, MultiVectorIndex  # noqa: E402

MULTIVECTOR_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
QUESTION_REPEATS = (0, 1, 2, 3)
PRUNING = ((1, 32), (1, 64), (2, 64), (2, 128), (4, 128), (4, 256), (8, 256))


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "n": len(ms),
    }


def per_query(retriever: Retriever, k: int = 10, **options) -> dict[str, list[str]]:
    """Each evaluation query's top-k item ids (duplicates of one item kept once)."""
    out = {}
    for qid, (text, _) in EVAL_QUERIES.items():
        items = [item_id(h.chunk) for h in retriever.search(text, k=k, **options)]
        out[qid] = list(dict.fromkeys(items))
    return out


def metrics(ranked: dict[str, list[str]], qids=None) -> dict[str, float]:
    qids = list(EVAL_QUERIES) if qids is None else list(qids)
    r5, r10, rr = [], [], []
    for q in qids:
        relevant = set(EVAL_QUERIES[q][1])
        top = ranked[q]
        r5.append(len(relevant & set(top[:5])) / len(relevant))
        r10.append(len(relevant & set(top[:10])) / len(relevant))
        rr.append(next((1.0 / (n + 1) for n, i in enumerate(top) if i in relevant), 0.0))
    return {
        "recall@5": round(float(np.mean(r5)), 3),
        "recall@10": round(float(np.mean(r10)), 3),
        "mrr": round(float(np.mean(rr)), 3),
    }


def open_index(cache: Path | None, chunks, embedder) -> tuple[HybridIndex, float | None]:
    if cache is not None and (cache / "manifest.json").is_file():
        return HybridIndex.load(cache, embedder), None
    t = time.perf_counter()
    index = HybridIndex.build(chunks, embedder, multivector=True)
    build_s = time.perf_counter() - t
    if cache is not None:
        index.save(cache)
    return index, build_s


def cross_validate(evaluate, settings) -> dict:
    """2-fold cross-validation of one signal: `evaluate(setting)` gives per-query top-10 lists."""
    qids = sorted(EVAL_QUERIES)
    folds = [qids[0::2], qids[1::2]]
    runs = {s: evaluate(s) for s in settings}
    held_out: dict[str, list[str]] = {}
    chosen = []
    for n, test in enumerate(folds):
        train = folds[1 - n]
        # Best recall@5 on the training half; ties go to the setting listed first (closest to off).
        best = max(settings, key=lambda s: (metrics(runs[s], train)["recall@5"], -settings.index(s)))
        chosen.append(
            {"tuned_on_fold": 1 - n, "setting": best, "train_recall@5": metrics(runs[best], train)["recall@5"]}
        )
        held_out.update({q: runs[best][q] for q in test})
    baseline = runs[settings[0]]
    return {
        "in_sample": {str(s): metrics(runs[s]) for s in settings},
        "folds": chosen,
        "held_out": metrics(held_out),
        "held_out_baseline": metrics(baseline),
        "per_fold_held_out": [
            {"fold": n, "tuned": metrics(runs[c["setting"]], f), "baseline": metrics(baseline, f)}
            for n, (c, f) in enumerate(zip(chosen, folds))
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the queries per latency row")
    parser.add_argument("--index-cache", default=None, help="reuse (or write) the built index here")
    parser.add_argument("--threads", type=int, default=2, help="threads for indexing (queries use one)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    result: dict = {"machine": describe(faiss=faiss.__version__)}
    print(f"machine: {result['machine']}", flush=True)
    documents, _ = load_documents([SEEDS])
    if not documents:
        raise SystemExit(f"no seeds corpus at {SEEDS}")
    chunks = [c for d in documents for c in chunk_document(d, "qa")]
    embedder = EncoderEmbedder(max_tokens=128)
    index, build_s = open_index(Path(args.index_cache) if args.index_cache else None, chunks, embedder)
    mv = index.multivector
    retriever = Retriever(index, embedder)
    tokens = index.tokens_for(embedder)
    docs = tokens.documents([c.embedding_text for c in index.chunks])  # float16-cached token vectors
    dense_bytes = int(index.embeddings.nbytes)
    variants = {"residual 2 bits (default)": mv}
    for name, options in {"residual 1 bit": dict(bits=1), "none (float16 vectors)": dict(compression="none")}.items():
        variants[name] = MultiVectorIndex.from_token_vectors(docs, index.ids, max_tokens=mv.max_tokens, **options)
    result["corpus"] = {
        "chunks": len(index.chunks),
        "tokens": mv.tokens,
        "tokens_per_chunk": round(mv.tokens / len(index.chunks), 1),
        "nlist": len(mv.centroids),
        "embedding_model": embedder.name,
        "build_s_with_token_vectors": None if build_s is None else round(build_s, 1),
    }
    result["size"] = {
        "dense float32 vectors bytes": dense_bytes,
        **{
            name: {
                "bytes": v.nbytes(),
                "ratio_to_dense": round(v.nbytes() / dense_bytes, 2),
                "bytes_per_token": round(v.nbytes() / v.tokens, 1),
            }
            for name, v in variants.items()
        },
    }
    print(json.dumps(result["size"], indent=1), flush=True)

    # -- quality -------------------------------------------------------------------------------
    systems = {
        "BM25 (word forms)": dict(mode="sparse"),
        "dense": dict(mode="dense"),
        "hybrid weighted 0.5/0.5 (CLI default)": dict(mode="hybrid", fusion="weighted", multivector_weight=0.0),
        f"multivector, PLAID pruning (nprobe {DEFAULT_NPROBE}, {DEFAULT_CANDIDATES} candidates)": dict(
            mode="multivector"
        ),
    }
    quality = {name: metrics(per_query(retriever, **opts)) for name, opts in systems.items()}
    for name, variant in variants.items():
        index.multivector = variant
        index.version += 1
        # mode="multivector" searches with pruning; exhaustive goes through the index directly.
        ranked = {}
        for qid, (text, _) in EVAL_QUERIES.items():
            hits = index.multivector_search(retriever.query_tokens(text), 50, exhaustive=True)
            ranked[qid] = list(dict.fromkeys(item_id(index.chunks[p]) for p, _ in hits))
        quality[f"multivector exhaustive, {name}"] = metrics(ranked)
    index.multivector = mv
    index.version += 1
    result["quality"] = quality
    print(json.dumps(quality, indent=1), flush=True)

    # -- pruning against brute force -------------------------------------------------------------
    texts = [t for t, _ in EVAL_QUERIES.values()] + LATENCY_QUERIES
    qtokens = [tokens.encode([t])[0] for t in texts]
    exact = [{i for i, _ in mv.search(q, 10, exhaustive=True)} for q in qtokens]
    pruning = []
    for nprobe, candidates in PRUNING:
        overlap = [
            len(e & {i for i, _ in mv.search(q, 10, nprobe=nprobe, candidates=candidates)}) / 10
            for q, e in zip(qtokens, exact)
        ]
        pruning.append(
            {
                "nprobe": nprobe,
                "candidates": candidates,
                "recall@10_vs_exhaustive": round(float(np.mean(overlap)), 3),
                "queries": len(texts),
            }
        )
    result["pruning"] = pruning
    print(json.dumps(pruning, indent=1), flush=True)

    # -- latency -------------------------------------------------------------------------------
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    index.query_cache = QueryCache(0)

    def fresh(fn):
        def run(q):
            retriever._query_vectors.clear()
            retriever._query_tokens.clear()
            return fn(q)

        return run

    rows = {
        "dense": lambda q: retriever.search(q, k=10, mode="dense"),
        "hybrid weighted (dense + BM25)": lambda q: retriever.search(
            q, k=10, mode="hybrid", fusion="weighted", multivector_weight=0.0
        ),
        f"multivector, pruned (nprobe {DEFAULT_NPROBE}, {DEFAULT_CANDIDATES} candidates)": lambda q: retriever.search(
            q, k=10, mode="multivector"
        ),
        "multivector, exhaustive": lambda q: index.multivector_search(retriever.query_tokens(q), 10, exhaustive=True),
        "hybrid weighted + multivector": lambda q: retriever.search(
            q, k=10, mode="hybrid", fusion="weighted", multivector_weight=0.5
        ),
    }
    latency = {}
    for name, fn in rows.items():
        fn = fresh(fn)
        fn(LATENCY_QUERIES[0])
        samples = []
        for _ in range(args.rounds):
            for q in LATENCY_QUERIES:
                t = time.perf_counter()
                fn(q)
                samples.append(time.perf_counter() - t)
        latency[name] = percentiles(samples)
    result["latency"] = latency
    print(json.dumps(latency, indent=1), flush=True)
    torch.set_num_threads(args.threads)
    index.query_cache = QueryCache()

    # -- a third signal, held out ----------------------------------------------------------------
    hybrid = dict(mode="hybrid", fusion="weighted")
    signals = {
        "multivector MaxSim fused into hybrid (weight w)": cross_validate(
            lambda w: per_query(retriever, multivector_weight=w, **hybrid), list(MULTIVECTOR_WEIGHTS)
        )
    }
    original_bm25 = index.bm25

    def with_question_repeats(r: int):
        weighted = [
            type(c)(**{**c.to_dict(), "text": c.text + (" " + str(c.metadata.get("question", ""))) * r})
            for c in index.chunks
        ]
        index.bm25 = fit_bm25(weighted) if r else original_bm25
        index.version += 1  # drops cached BM25 results and word forms
        return per_query(retriever, multivector_weight=0.0, **hybrid)

    signals["BM25 question field counted r extra times"] = cross_validate(with_question_repeats, list(QUESTION_REPEATS))
    index.bm25 = original_bm25
    index.version += 1
    result["third_signal"] = signals
    print(json.dumps(signals, indent=1), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from genforge.atomic import atomic_write_text

    atomic_write_text(out / "rag_multivector.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "rag_multivector.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    m, c = result["machine"], result["corpus"]
    out = [
        f"Multi-vector retrieval on {m['cpu']} ({m['cores']} cores shared with other jobs: latencies are noisy), "
        f"FAISS {m['faiss']}, torch {m['torch']}, Python {m['python']}.",
        "",
        f"Seeds corpus: {c['chunks']} Q&A chunks, {c['tokens']:,} token vectors ({c['tokens_per_chunk']} per chunk), "
        f"{c['nlist']} centroids, {c['embedding_model']}.",
        "",
        "| token index | bytes | x dense float32 | bytes/token |",
        "|---|---|---|---|",
        f"| dense float32 vectors (reference) | {result['size']['dense float32 vectors bytes']:,} | 1.0 | - |",
    ]
    for name, v in result["size"].items():
        if isinstance(v, dict):
            out.append(f"| {name} | {v['bytes']:,} | {v['ratio_to_dense']} | {v['bytes_per_token']} |")
    out += ["", "| system (27 queries) | recall@5 | recall@10 | MRR |", "|---|---|---|---|"]
    out += [f"| {n} | {v['recall@5']} | {v['recall@10']} | {v['mrr']} |" for n, v in result["quality"].items()]
    out += ["", "| pruning (nprobe, candidates) | top-10 recall vs exhaustive |", "|---|---|"]
    out += [f"| {p['nprobe']}, {p['candidates']} | {p['recall@10_vs_exhaustive']} |" for p in result["pruning"]]
    out += [
        "",
        f"Latency, top 10, one query at a time on one thread, query encoding included, caches off "
        f"({next(iter(result['latency'].values()))['n']} queries):",
        "",
        "| retriever | p50 ms | p99 ms |",
        "|---|---|---|",
    ]
    out += [f"| {n} | {v['p50_ms']} | {v['p99_ms']} |" for n, v in result["latency"].items()]
    out += ["", "Third signal, 2-fold cross-validated (recall@5 / MRR on held-out queries):", ""]
    out += ["| signal | baseline (hybrid) | held out, tuned | settings chosen per fold |", "|---|---|---|---|"]
    for name, s in result["third_signal"].items():
        b, h = s["held_out_baseline"], s["held_out"]
        chosen = ", ".join(str(f["setting"]) for f in s["folds"])
        out.append(f"| {name} | {b['recall@5']} / {b['mrr']} | {h['recall@5']} / {h['mrr']} | {chosen} |")
    for name, s in result["third_signal"].items():
        out += [
            "",
            f"{name}, all 27 queries (in-sample, for the shape of the curve):",
            "",
            "| setting | recall@5 | recall@10 | MRR |",
            "|---|---|---|---|",
        ]
        out += [f"| {k} | {v['recall@5']} | {v['recall@10']} | {v['mrr']} |" for k, v in s["in_sample"].items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
