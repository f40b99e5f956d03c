"""Evaluations built on generation: cloze completion with memory and the held-out entities scored in training."""
