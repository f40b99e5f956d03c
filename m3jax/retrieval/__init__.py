"""Retrieval for explicit memory: the sentence embedder that indexes references and queries."""
