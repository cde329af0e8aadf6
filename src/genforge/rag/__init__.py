"""Retrieval-augmented generation: documents -> chunks -> BM25 + dense indexes -> hybrid retrieval
(expanded, re-ranked) -> grounded answers with checked citations, in conversations.

See docs/rag.md for the pipeline, the retrieval options and their measured quality.
"""

from .answer import (
    NOT_COVERED,
    UNSUPPORTED_POLICIES,
    Answer,
    AnswerConfig,
    Answerer,
    Citation,
    SupportChecker,
)
from .answer_quality import (
    AnswerEvaluator,
    JudgeClaimChecker,
    SupportClaimChecker,
    answer_relevance,
    faithfulness,
    split_claims,
)
from .chunking import (
    Chunk,
    chunk_document,
    fixed_token_chunks,
    markdown_chunks,
    qa_chunks,
    recursive_chunks,
    sentence_chunks,
)
from .embedders import EmbeddingCache, EncoderEmbedder
from .expand import Generator, GenforgeGenerator, OpenAIGenerator
from .index import HybridIndex
from .loaders import Document, load_documents
from .memory import LongTermMemory, MemoryConfig, remember_session, summarize_session
from .multivector import MultiVectorIndex
from .rerank import CrossEncoderReranker, LateInteractionReranker, TokenEmbedder, maxsim
from .retrieve import (
    Hit,
    Retriever,
    adaptive_cutoff,
    default_docs_index,
    index_documents,
    mmr,
    open_retriever,
    reciprocal_rank_fusion,
    weighted_score_fusion,
)
from .sessions import SessionStore, ask_in_session, forget_user, rewrite_followup
from .stores import RagIndexError

__all__ = [
    "MultiVectorIndex",
    "forget_user",
    "summarize_session",
    "remember_session",
    "MemoryConfig",
    "LongTermMemory",
    "split_claims",
    "faithfulness",
    "answer_relevance",
    "SupportClaimChecker",
    "JudgeClaimChecker",
    "AnswerEvaluator",
    "UNSUPPORTED_POLICIES",
    "NOT_COVERED",
    "Answer",
    "AnswerConfig",
    "Answerer",
    "Chunk",
    "Citation",
    "CrossEncoderReranker",
    "Document",
    "EmbeddingCache",
    "EncoderEmbedder",
    "Generator",
    "GenforgeGenerator",
    "Hit",
    "HybridIndex",
    "LateInteractionReranker",
    "OpenAIGenerator",
    "RagIndexError",
    "Retriever",
    "SessionStore",
    "SupportChecker",
    "TokenEmbedder",
    "adaptive_cutoff",
    "ask_in_session",
    "chunk_document",
    "default_docs_index",
    "fixed_token_chunks",
    "index_documents",
    "load_documents",
    "markdown_chunks",
    "maxsim",
    "mmr",
    "open_retriever",
    "qa_chunks",
    "reciprocal_rank_fusion",
    "recursive_chunks",
    "rewrite_followup",
    "sentence_chunks",
    "weighted_score_fusion",
]
