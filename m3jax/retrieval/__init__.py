"""Retrieval for explicit memory: the sentence embedder, the ScaNN index, the leakage filter, and the references
each chunk of the training data reads."""
