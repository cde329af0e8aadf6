"""Retrieval evaluation: recall@k, MRR (Voorhees 1999, TREC-8 QA) and nDCG@k (Järvelin &
Kekäläinen 2002), computed by `ranx` (Bassani 2022), whose metric definitions are checked
against trec_eval, so genforge's numbers compare with published ones.

Queries and judgments are plain dicts: qrels {query_id: {doc_id: relevance (int > 0)}} and,
per system, a run {query_id: {doc_id: score}}.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

DEFAULT_METRICS = ("recall@5", "mrr", "ndcg@10")


def evaluate_runs(qrels: Mapping[str, Mapping[str, int]], runs: Mapping[str, Mapping[str, Mapping[str, float]]],
                  metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, dict[str, float]]:
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
            raise ValueError(f"run {system!r} has no results for queries {sorted(missing)[:5]}; give every judged query a (possibly empty) result")
        # A dummy, never-relevant document keeps ranx from rejecting a query that found nothing.
        scored = {q: ({d: float(s) for d, s in run[q].items()} or {"__none__": 0.0}) for q in judged}
        result = evaluate(Qrels(judged), Run(scored, name=system), list(metrics), make_comparable=True)
        table[system] = {m: float(result[m]) for m in metrics} if len(metrics) > 1 else {metrics[0]: float(result)}
    return table


def run_retrieval(queries: Mapping[str, str], search: Callable[[str], Sequence[tuple[str, float]]]) -> dict[str, dict[str, float]]:
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
