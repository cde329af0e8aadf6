"""Retrieval-augmented generation: documents -> chunks -> BM25 + dense indexes -> hybrid retrieval.

See docs/rag.md for the pipeline, the retrieval options and their measured quality.
"""

from .chunking import Chunk, chunk_document, fixed_token_chunks, markdown_chunks, qa_chunks, recursive_chunks, sentence_chunks
from .loaders import Document, load_documents
from .index import EmbeddingCache, EncoderEmbedder, HybridIndex, RagIndexError
from .retrieve import Retriever, mmr, reciprocal_rank_fusion, weighted_score_fusion

__all__ = [
    "Chunk", "Document", "EmbeddingCache", "EncoderEmbedder", "HybridIndex", "RagIndexError", "Retriever",
    "chunk_document", "fixed_token_chunks", "load_documents", "markdown_chunks", "mmr", "qa_chunks",
    "reciprocal_rank_fusion", "recursive_chunks", "sentence_chunks", "weighted_score_fusion",
]
