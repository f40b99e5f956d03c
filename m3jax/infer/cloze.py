"""Cloze evaluation with memory, as `m3jax.evals.cloze` defines it (the training loop scores held-out entities with
it, below this room); its names are importable from here too."""

from m3jax.evals.cloze import (
    ARMS,
    MEMORY_ARMS,
    arm_references,
    complete,
    encode_prompts,
    exact_match,
    first_word,
    generate,
    greedy_generate,
    left_pad,
    no_memory,
    shuffled_references,
    single_slot_memory,
    slot_memory,
    summarize,
)

__all__ = ["ARMS", "MEMORY_ARMS", "arm_references", "complete", "encode_prompts", "exact_match", "first_word",
           "generate", "greedy_generate", "left_pad", "no_memory", "shuffled_references",
           "single_slot_memory", "slot_memory", "summarize"]
