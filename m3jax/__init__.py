"""m3jax: Memory3 language models (explicit memory) in JAX/Flax."""
