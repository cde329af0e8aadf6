"""Retrieval quality on the seeds corpus (five interview Q&A documents nobody here wrote).

The queries are our own paraphrases; judgments name relevant items by structure, (file prefix,
item number), resolved to chunks at test time, so no seed text is copied into the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
if not SEEDS.is_dir():
    SEEDS = Path("/work/shared/seeds")

# query id -> (our paraphrase, relevant items as "file prefix:item number")
EVAL_QUERIES: dict[str, tuple[str, list[str]]] = {
    "rope": ("why does rotating queries and keys by position let a model cope with inputs longer than it saw in training",
             ["000:1", "002:119", "004:152"]),
    "hybrid": ("combining a keyword retriever and an embedding retriever in one retrieval pipeline", ["001:2"]),
    "head_pruning": ("removing redundant attention heads to make a transformer smaller and faster", ["001:3"]),
    "vision_llm": ("turning a text-only language model into one that also understands pictures", ["001:4", "002:71"]),
    "faiss": ("searching millions of vectors is too slow; how does an approximate nearest neighbour library help",
              ["001:10", "004:344"]),
    "soft_prompts": ("trainable continuous prompt vectors versus prefix tuning", ["001:9", "004:91", "004:144"]),
    "forgetting": ("a model loses older skills when trained further on new data; how to prevent it",
                   ["000:8", "002:141", "004:97", "004:170"]),
    "noise_scale": ("how the noisiness of gradient estimates relates to choosing the batch size", ["000:9", "003:66"]),
    "causal_mask": ("the mask that hides future positions from each token in a decoder", ["003:54", "004:8"]),
    "layernorm": ("normalizing each token's features to keep deep transformer training stable", ["002:16", "003:51", "004:5"]),
    "ppo": ("the clipped policy-gradient algorithm used in the reinforcement learning step of alignment",
            ["004:28", "004:72", "004:177"]),
    "reward_hacking": ("the policy games flaws in the learned reward model instead of really improving", ["004:31", "004:175"]),
    "bpe": ("building a subword vocabulary by repeatedly merging the most frequent symbol pairs", ["002:7", "004:14", "004:109"]),
    "paged": ("storing the attention key/value cache in fixed-size memory blocks like virtual memory pages in vLLM", ["004:286"]),
    "grad_clip": ("capping gradient magnitude so updates do not explode", ["004:49", "004:163"]),
    "dropout": ("randomly zeroing units during training to reduce overfitting", ["003:60"]),
    "chunk_overlap": ("splitting documents into pieces for retrieval and letting neighbouring pieces share some text",
                      ["004:219", "004:220", "004:348"]),
    "gan": ("a generator and a discriminator trained against each other", ["002:61"]),
    "quant_tradeoff": ("trade-offs of quantizing the weights compared with quantizing the activations", ["000:2"]),
    "cosine": ("why angle-based similarity between embedding vectors is used to score retrieved passages",
               ["000:7", "004:213", "004:334"]),
}


def item_id(chunk) -> str:
    return f"{Path(chunk.source).name[:3]}:{chunk.metadata['item']}"


@pytest.mark.slow
def test_retrieval_quality_on_seeds(capsys):
    from genforge.rag import EncoderEmbedder, HybridIndex, Retriever, chunk_document, load_documents
    from genforge.rag.evaluate import evaluate_runs, format_table, run_retrieval

    if not SEEDS.is_dir():
        pytest.skip(f"seeds corpus not found at {SEEDS}")
    docs, skipped = load_documents([SEEDS])
    assert not skipped and len(docs) == 5
    chunks = [c for d in docs for c in chunk_document(d, "qa")]
    ids = {item_id(c) for c in chunks}
    qrels = {q: {i: 1 for i in rel} for q, (_, rel) in EVAL_QUERIES.items()}
    assert all(i in ids for rel in qrels.values() for i in rel), "a judgment names an item chunking did not produce"

    embedder = EncoderEmbedder(max_tokens=128)
    retriever = Retriever(HybridIndex.build(chunks, embedder), embedder)
    queries = {q: text for q, (text, _) in EVAL_QUERIES.items()}

    def system(**options):
        return lambda text: [(item_id(h.chunk), h.score) for h in retriever.search(text, k=10, **options)]

    runs = {name: run_retrieval(queries, system(**opts)) for name, opts in {
        "bm25": dict(mode="sparse"),
        "dense": dict(mode="dense"),
        "hybrid_rrf": dict(mode="hybrid", fusion="rrf"),
        "hybrid_weighted": dict(mode="hybrid", fusion="weighted", weights=(0.5, 0.5)),
        "hybrid_rrf_mmr0.7": dict(mode="hybrid", fusion="rrf", mmr_lambda=0.7),
    }.items()}
    table = evaluate_runs(qrels, runs)
    with capsys.disabled():
        print("\n" + format_table(table))
    for fused in ("hybrid_rrf", "hybrid_weighted"):
        assert table[fused]["recall@5"] >= table["bm25"]["recall@5"]
        assert table[fused]["recall@5"] >= table["dense"]["recall@5"]
