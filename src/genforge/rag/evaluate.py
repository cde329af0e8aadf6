"""Retrieval and answer evaluation.

Retrieval: recall@k, MRR (Voorhees 1999, TREC-8 QA) and nDCG@k (Järvelin &
Kekäläinen 2002), computed by `ranx` (Bassani 2022), whose metric definitions are checked
against trec_eval, so genforge's numbers compare with published ones.

Queries and judgments are plain dicts: qrels {query_id: {doc_id: relevance (int > 0)}} and,
per system, a run {query_id: {doc_id: score}}. `load_queries` / `load_qrels` read them from
files (JSON, JSONL, TSV, TREC qrels) for `genforge rag eval`.

Answers: citation precision and a faithfulness proxy (`answer_metrics`), from the support
scores `answer.SupportChecker` gives each answer sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..jsonl import json_objects

DEFAULT_METRICS = ("recall@5", "mrr", "ndcg@10")


def evaluate_runs(
    qrels: Mapping[str, Mapping[str, int]],
    runs: Mapping[str, Mapping[str, Mapping[str, float]]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, dict[str, float]]:
    """{system: {metric: mean over queries}} for every run against the same judgments."""
    try:
        from ranx import Qrels, Run, evaluate
    except ImportError:
        raise ImportError("retrieval evaluation uses ranx: pip install 'genforge[rag-eval]'") from None

    if not qrels:
        raise ValueError("no relevance judgments given; qrels maps query id -> {doc id: relevance > 0}")
    judged = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    if not all(any(r > 0 for r in docs.values()) for docs in judged.values()):
        raise ValueError("every judged query needs at least one relevant document (relevance > 0)")
    table = {}
    for system, run in runs.items():
        missing = judged.keys() - run.keys()
        if missing:
            raise ValueError(
                f"run {system!r} has no results for queries {sorted(missing)[:5]}; give every judged query a (possibly empty) result"
            )
        # A dummy, never-relevant document keeps ranx from rejecting a query that found nothing.
        scored = {q: ({d: float(s) for d, s in run[q].items()} or {"__none__": 0.0}) for q in judged}
        result = evaluate(Qrels(judged), Run(scored, name=system), list(metrics), make_comparable=True)
        table[system] = {m: float(result[m]) for m in metrics} if len(metrics) > 1 else {metrics[0]: float(result)}
    return table


def run_retrieval(
    queries: Mapping[str, str], search: Callable[[str], Sequence[tuple[str, float]]]
) -> dict[str, dict[str, float]]:
    """A run from a search function returning (doc id, score) best first; scores are replaced by
    descending rank scores so that ties and fused scores cannot reorder the list inside ranx."""
    run = {}
    for qid, text in queries.items():
        hits = list(search(text))
        seen: dict[str, float] = {}
        for rank, (doc, _) in enumerate(hits):
            seen.setdefault(doc, float(len(hits) - rank))
        run[qid] = seen
    return run


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table, one row per system."""
    metrics = list(next(iter(table.values())).keys())
    lines = ["| system | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(f"{v[m]:.3f}" for m in metrics) + " |" for s, v in table.items()]
    return "\n".join(lines)


# -- answers ------------------------------------------------------------------------------------


def answer_metrics(answers: Sequence) -> dict[str, float]:
    """Answer-level grounding over `answer.Answer`s (only answers that were given count):

    - citation precision: the share of citations (sentence, cited passage) whose passage
      supports the sentence (support score >= the checker's threshold), as in ALCE
      (Gao et al. 2023), with the support score standing in for their NLI model;
    - faithfulness proxy: the share of answer sentences flagged as supported;
    - answered: the share of questions answered rather than declared not covered.
    """
    answers = list(answers)
    if not answers:
        raise ValueError("no answers to evaluate")
    given = [a for a in answers if a.covered]
    cited = supported_citations = sentences = supported = 0
    for a in given:
        for s in a.sentences:
            sentences += 1
            supported += bool(s.supported)
            for n in s.citations:
                cited += 1
                supported_citations += s.citation_support.get(n, 0.0) >= a.support_threshold
    return {
        "citation_precision": supported_citations / cited if cited else 0.0,
        "faithfulness": supported / sentences if sentences else 0.0,
        "answered": len(given) / len(answers),
    }


# -- files and whole runs -------------------------------------------------------------------------

DOC_ID_KINDS = ("item", "file", "chunk")


def doc_id(chunk, kind: str = "item") -> str:
    """The id a judgment uses for a chunk: "item" is `file name#item` for Q&A items (else
    `file name@start-end`), "file" the file name (document-level judgments), "chunk" the chunk's
    own id (full source path)."""
    from pathlib import Path

    if kind not in DOC_ID_KINDS:
        raise ValueError(f"doc id kind {kind!r} is not supported; accepted: {', '.join(DOC_ID_KINDS)}")
    name = Path(chunk.source).name
    if kind == "file":
        return name
    if kind == "chunk":
        return chunk.chunk_id
    item = chunk.metadata.get("item")
    return f"{name}#{item}" if item is not None else f"{name}@{chunk.start}-{chunk.end}"


def load_queries(path) -> dict[str, str]:
    """Queries from JSON ({id: text}), JSONL ({"id": ..., "text": ...} per line; "query_id"/"query"
    also accepted) or TSV (id<TAB>text)."""
    import json
    from pathlib import Path

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a .json queries file is an object {{query id: text}}")
        queries = {str(k): str(v) for k, v in data.items()}
    elif path.suffix == ".jsonl":
        queries = {}
        for n, row in json_objects(text.splitlines(), str(path)):
            qid, q = row.get("id", row.get("query_id")), row.get("text", row.get("query"))
            if qid is None or q is None:
                raise ValueError(f"{path}:{n}: each line needs 'id' (or 'query_id') and 'text' (or 'query')")
            queries[str(qid)] = str(q)
    elif path.suffix in (".tsv", ".txt"):
        queries = {}
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                qid, sep, q = line.partition("\t")
                if not sep:
                    raise ValueError(f"{path}:{n}: expected 'query id<TAB>query text'")
                queries[qid.strip()] = q.strip()
    else:
        raise ValueError(f"{path}: queries file format {path.suffix!r} is not supported; accepted: .json, .jsonl, .tsv")
    if not queries:
        raise ValueError(f"{path} holds no queries")
    return queries


def load_qrels(path) -> dict[str, dict[str, int]]:
    """Judgments from JSON ({query id: {doc id: relevance}}) or TREC qrels lines
    (`query_id iteration doc_id relevance`; 3 columns without the iteration also accepted)."""
    import json
    from pathlib import Path

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    qrels: dict[str, dict[str, int]] = {}
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{path}: a .json qrels file is {{query id: {{doc id: relevance}}}}")
        qrels = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in data.items()}
    else:
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 4:
                qid, _, doc, rel = parts
            elif len(parts) == 3:
                qid, doc, rel = parts
            else:
                raise ValueError(f"{path}:{n}: expected 'query_id 0 doc_id relevance' (TREC qrels), got {line!r}")
            qrels.setdefault(qid, {})[doc] = int(rel)
    if not qrels:
        raise ValueError(f"{path} holds no judgments")
    return qrels


STANDARD_SYSTEMS = {
    "bm25": dict(mode="sparse"),
    "dense": dict(mode="dense"),
    "hybrid": dict(mode="hybrid", fusion="weighted"),
    "hybrid+rerank": dict(mode="hybrid", fusion="weighted", rerank=True),
    "hybrid+prf+rerank": dict(mode="hybrid", fusion="weighted", expansion="prf", rerank=True),
}


def evaluate_retriever(
    retriever,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    systems: Mapping[str, dict] | None = None,
    doc_id_kind: str = "item",
    k: int = 10,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, dict[str, float]]:
    """{system: {metric: value}} for `Retriever.search` option sets (default: BM25, dense, hybrid,
    and hybrid + re-ranking when the retriever has a re-ranker) on the judged queries."""
    if systems is None:
        systems = {n: o for n, o in STANDARD_SYSTEMS.items() if not o.get("rerank") or retriever.reranker is not None}
    missing = set(qrels) - set(queries)
    if missing:
        raise ValueError(f"judged queries {sorted(missing)[:5]} have no query text")
    judged = {q: t for q, t in queries.items() if q in qrels}

    def searcher(options):
        def search(text):
            ids = [doc_id(h.chunk, doc_id_kind) for h in retriever.search(text, k=k, **options)]
            return [(d, 0.0) for d in dict.fromkeys(ids)]  # file-level ids: a file counts once, at its best rank

        return search

    runs = {name: run_retrieval(judged, searcher(options)) for name, options in systems.items()}
    return evaluate_runs(qrels, runs, metrics)
