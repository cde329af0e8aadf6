"""Serving: a continuous-batching engine over a paged KV cache, and the OpenAI-compatible API."""
