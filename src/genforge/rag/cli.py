"""`genforge rag index|search|ask|eval`, registered by `genforge.cli`.

A view over `genforge.rag`: each command parses its flags, calls the library and prints.
Without --index, search and ask use the embedded index over genforge's own docs, built into
the user cache on first use.
"""

from __future__ import annotations

import argparse
import json
import os

from ..console import console


def _generator(args):
    if getattr(args, "model", None) and getattr(args, "openai_model", None):
        raise ValueError("use either --model DIR (a genforge model) or --openai-model NAME (an endpoint), not both")
    from .expand import GenforgeGenerator, OpenAIGenerator

    if getattr(args, "model", None):
        return GenforgeGenerator(args.model)
    if getattr(args, "openai_model", None):
        return OpenAIGenerator(
            args.openai_model, base_url=args.openai_base_url, api_key=os.environ.get(args.api_key_env) or None
        )
    return None


def _retriever(args, generator=None):
    from .retrieve import open_retriever

    spec = getattr(args, "rerank", None)
    if spec is not None and spec != "late" and not os.path.isdir(spec):  # fail before any model loads
        raise ValueError(f"--rerank {spec!r} is neither 'late' (MaxSim late interaction) nor a cross-encoder directory")
    with console.status("opening the index" if args.index else "opening genforge's docs index (built on first use)"):
        return open_retriever(args.index, args.encoder, generator=generator, reranker=spec)


def _save_reranker_cache(retriever) -> None:
    save = getattr(retriever.reranker, "save_cache", None)
    if save is not None:
        save()


def _search_options(args) -> dict:
    options = dict(mode=args.mode, fusion=args.fusion, expansion=args.expansion, min_score_ratio=args.min_score_ratio)
    if getattr(args, "rerank", None):
        options["rerank"] = True
    if getattr(args, "filter", None):
        filters = {}
        for item in args.filter:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--filter takes KEY=VALUE, got {item!r}")
            filters.setdefault(key, []).append(value)
        options["filters"] = filters
    return options


def cmd_index(args) -> int:
    from .index import EncoderEmbedder
    from .retrieve import index_documents

    if args.backend == "milvus" and not args.milvus_uri:
        raise ValueError("--backend milvus needs --milvus-uri: a local .db file (Milvus Lite) or http://host:19530")
    if args.backend == "qdrant" and not args.qdrant_location:
        raise ValueError("--backend qdrant needs --qdrant-location: a local directory (embedded) or http://host:6333")
    embedder = EncoderEmbedder(args.encoder, max_tokens=args.max_tokens)
    build = {"dense": args.dense}
    if args.multivector:
        build.update(multivector=True, multivector_options={"bits": args.multivector_bits})
    if args.backend == "milvus":
        build.update(backend="milvus", milvus_uri=args.milvus_uri)
    elif args.backend == "qdrant":
        build.update(backend="qdrant", qdrant_location=args.qdrant_location)
    with console.status(f"indexing {', '.join(args.paths)}"):
        index, skipped = index_documents(args.paths, embedder, args.strategy, **build)
        index.save(args.index)
    for path, reason in skipped:
        console.print(f"[yellow]skipped[/yellow] {path}: {reason}")
    console.print(
        f"indexed {len(index.chunks)} chunks from {len({c.source for c in index.chunks})} files "
        f"into {args.index} ({index.last_build_embedded} embedded)"
    )
    return 0


def cmd_search(args) -> int:
    options = _search_options(args)
    retriever = _retriever(args, _generator(args))
    if args.hops > 1:
        hits, queries = retriever.multi_hop(args.query, hops=args.hops, k=args.k, **options)
        if not args.json:
            console.print(f"[dim]queries: {' → '.join(queries)}[/dim]")
    else:
        hits = retriever.search(args.query, k=args.k, **options)
    _save_reranker_cache(retriever)
    for rank, h in enumerate(hits, 1):
        row = {
            "rank": rank,
            "score": round(h.score, 6),
            "source": h.chunk.source,
            "start": h.chunk.start,
            "end": h.chunk.end,
            "title": h.chunk.title,
            "heading_path": h.chunk.heading_path,
        }
        if args.json:
            print(json.dumps({**row, "text": h.chunk.text}, ensure_ascii=False))
        else:
            print(f"{rank}. {h.score:.4f}  {h.chunk.source}:{h.chunk.start}-{h.chunk.end}  {h.chunk.title}")
    return 0


def cmd_ask(args) -> int:
    from .answer import AnswerConfig, Answerer
    from .retrieve import cache_dir
    from .sessions import SessionStore, ask_in_session

    generator = _generator(args)
    config = AnswerConfig(
        k=args.k,
        mode="generative" if generator is not None else "extractive",
        max_sentences=args.max_sentences,
        search=_search_options(args),
        unsupported=args.unsupported,
        max_tokens=args.max_new_tokens,
        **({"min_confidence": args.min_confidence} if args.min_confidence is not None else {}),
    )
    answerer = Answerer(_retriever(args, generator), generator, config)
    if args.session:
        with SessionStore(args.sessions_db or cache_dir() / "rag" / "sessions.sqlite") as store:
            answer = ask_in_session(store, args.session, args.question, answerer, generator)
    else:
        answer = answerer.ask(args.question)
    _save_reranker_cache(answerer.retriever)
    if args.json:
        print(json.dumps(answer.to_dict(), ensure_ascii=False))
    else:
        if answer.query != answer.question:
            console.print(f"[dim]searched for: {answer.query}[/dim]")
        print(answer.render())
        if answer.unsupported:
            console.print(f"[yellow]{len(answer.unsupported)} sentence(s) not supported by their citations[/yellow]")
        if answer.unsupported_action == "dropped":
            console.print(f"[yellow]dropped {len(answer.removed)} unsupported sentence(s)[/yellow]")
        elif answer.unsupported_action == "extractive_fallback":
            console.print(
                f"[yellow]the generated answer had unsupported sentences ({len(answer.removed)} replaced): "
                "answered extractively from the best-supported passages[/yellow]"
            )
    return 0


def cmd_eval(args) -> int:
    from .evaluate import (
        answer_metrics,
        evaluate_retriever,
        format_table,
        load_qrels,
        load_queries,
    )

    queries, qrels = load_queries(args.queries), load_qrels(args.qrels)  # checked before any model loads
    retriever = _retriever(args)
    table = evaluate_retriever(retriever, queries, qrels, doc_id_kind=args.doc_id, k=args.k)
    _save_reranker_cache(retriever)
    print(format_table(table))
    result = {"retrieval": table}
    if args.answers:
        from .answer import Answerer
        from .answer_quality import AnswerEvaluator

        answerer = Answerer(retriever)
        answers = [answerer.ask(queries[q]) for q in qrels]
        metrics = answer_metrics(answers)
        if any(a.covered for a in answers):
            # Embedding-only relevance and support-checked claims: no model needed.
            chunks = {c.chunk_id: c for c in retriever.index.chunks}
            metrics.update(AnswerEvaluator(retriever.embedder).evaluate_answers(answers, chunks))
        print("\n" + format_table({"extractive answers": metrics}))
        result["answers"] = metrics
    if args.out:
        from ..atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


def _index_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--index",
        required=required,
        default=None,
        help="index directory" + ("" if required else " (default: the embedded index over genforge's docs)"),
    )
    parser.add_argument("--encoder", default=None, help="encoder directory (default: the offline all-MiniLM-L6-v2)")


def _retrieval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-k", type=int, default=5, help="passages to return (default 5)")
    parser.add_argument(
        "--mode",
        choices=("hybrid", "dense", "sparse", "multivector"),
        default="hybrid",
        help="multivector: MaxSim over token vectors (an index built with --multivector)",
    )
    parser.add_argument(
        "--fusion",
        choices=("weighted", "rrf"),
        default="weighted",
        help="how hybrid combines BM25 and dense (default weighted: best on the seeds evaluation)",
    )
    parser.add_argument(
        "--expansion",
        choices=("prf", "hyde", "multi_query"),
        default=None,
        help="query expansion; hyde and multi_query need --model or --openai-model",
    )
    parser.add_argument(
        "--rerank",
        default=None,
        metavar="late|DIR",
        help="re-rank the top 20: 'late' (MaxSim over MiniLM token vectors) or a cross-encoder directory",
    )
    parser.add_argument(
        "--min-score-ratio",
        type=float,
        default=None,
        help="adaptive k: drop hits scoring under this fraction of the best",
    )
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only chunks whose metadata (or source, title) matches (repeatable)",
    )


def _generator_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "generator", "a language model for generative answers, HyDE, multi-query and rewrites"
    )
    group.add_argument("--model", default=None, help="a genforge / Hugging Face causal model directory")
    group.add_argument("--openai-model", default=None, help="model name at an OpenAI-compatible endpoint")
    group.add_argument("--openai-base-url", default=None, help="endpoint URL (default: the client's, OPENAI_BASE_URL)")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge rag ...` to the top-level parser."""
    rag = sub.add_parser(
        "rag",
        help="retrieval-augmented generation: index, search, ask, eval",
        description="Index documents, search them, answer questions with citations, and measure "
        "retrieval quality (see docs/rag.md).",
    )
    rag_sub = rag.add_subparsers(dest="rag_command", required=True)

    index = rag_sub.add_parser(
        "index",
        help="index files and folders",
        description="Load .txt/.md/.html/.pdf/.docx files, chunk them and build BM25 + dense "
        "indexes; unreadable files are reported and skipped.",
    )
    index.add_argument("paths", nargs="+", help="files or folders")
    index.add_argument("--index", required=True, help="output index directory (written atomically)")
    index.add_argument(
        "--backend", choices=("faiss", "milvus", "qdrant"), default="faiss", help="vector store (default faiss)"
    )
    index.add_argument("--milvus-uri", default=None, help="Milvus Lite .db file or server URI, for --backend milvus")
    index.add_argument(
        "--qdrant-location",
        default=None,
        help="a directory (Qdrant embedded mode) or server URL, for --backend qdrant; a secured server's key is "
        "read from QDRANT_API_KEY",
    )
    index.add_argument(
        "--dense", choices=("flat", "hnsw", "ivf"), default="flat", help="dense index kind (default flat, exact)"
    )
    index.add_argument(
        "--strategy",
        choices=("auto", "fixed", "sentence", "recursive", "markdown", "qa"),
        default="auto",
        help="chunking (default auto: Q&A items, else Markdown sections, else recursive)",
    )
    index.add_argument("--max-tokens", type=int, default=None, help="embedding window in tokens (default: the model's)")
    index.add_argument("--encoder", default=None, help="encoder directory (default: the offline all-MiniLM-L6-v2)")
    index.add_argument(
        "--multivector",
        action="store_true",
        help="also index every chunk's token vectors (compressed) for ColBERT-style MaxSim search (--mode multivector)",
    )
    index.add_argument(
        "--multivector-bits",
        type=int,
        choices=(1, 2, 4, 8),
        default=2,
        help="bits per dimension of each token's residual (default 2: about 6x the dense index on the seeds)",
    )
    index.set_defaults(func=cmd_index)

    search = rag_sub.add_parser("search", help="ranked passages for a query")
    search.add_argument("query")
    _index_flags(search)
    _retrieval_flags(search)
    search.add_argument(
        "--hops", type=int, default=1, help="multi-hop retrieval: rounds of search and rewrite (default 1)"
    )
    search.add_argument("--json", action="store_true", help="one JSON object per hit")
    _generator_flags(search)
    search.set_defaults(func=cmd_search)

    ask = rag_sub.add_parser(
        "ask",
        help="answer a question with numbered citations",
        description="Extractive answer with citations (no model needed), or generative with "
        "--model/--openai-model; every sentence is checked against what it cites.",
    )
    ask.add_argument("question")
    _index_flags(ask)
    _retrieval_flags(ask)
    ask.add_argument("--max-sentences", type=int, default=3, help="sentences in an extractive answer (default 3)")
    ask.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help="best question-passage cosine under which the answer is 'not covered'",
    )
    ask.add_argument(
        "--unsupported",
        choices=("flag", "drop", "extractive"),
        default="flag",
        help="unsupported generated sentences: flag them (default), drop them, or fall back to an "
        "extractive answer from the best-supported passages",
    )
    ask.add_argument(
        "--max-new-tokens", type=int, default=256, help="longest generated answer, in tokens (default 256)"
    )
    ask.add_argument("--session", default=None, help="conversation name: follow-ups are rewritten from its history")
    ask.add_argument("--sessions-db", default=None, help="SQLite file of sessions (default: in the user cache)")
    ask.add_argument("--json", action="store_true", help="print the answer, sentences, support and citations as JSON")
    _generator_flags(ask)
    ask.set_defaults(func=cmd_ask)

    ev = rag_sub.add_parser(
        "eval",
        help="recall@k, MRR, nDCG@10 (ranx) for BM25, dense, hybrid, re-ranked",
        description="Evaluate retrieval on queries with relevance judgments.",
    )
    ev.add_argument("--queries", required=True, help="queries: .json {id: text}, .jsonl or .tsv")
    ev.add_argument("--qrels", required=True, help="judgments: TREC qrels lines or .json {query: {doc: rel}}")
    _index_flags(ev)
    ev.add_argument(
        "--doc-id",
        choices=("item", "file", "chunk"),
        default="item",
        help="how judgments name documents: file#item (default), file name, or chunk id",
    )
    ev.add_argument("-k", type=int, default=10, help="hits per query (default 10)")
    ev.add_argument("--rerank", default=None, metavar="late|DIR", help="also report hybrid + this re-ranker")
    ev.add_argument(
        "--answers",
        action="store_true",
        help="also answer each query: citation precision, faithfulness, answer relevance, claim faithfulness",
    )
    ev.add_argument("--out", default=None, help="write the results as JSON")
    ev.set_defaults(func=cmd_eval)
