"""Inference with explicit memory: greedy generation and the evaluations built on it (cloze)."""
