"""Export of m3jax parameters to other frameworks (Hugging Face Llama), and import back."""

from m3jax.export.llama import from_hf_llama, hf_llama_config, save_hf_llama, to_hf_llama

__all__ = ["from_hf_llama", "hf_llama_config", "save_hf_llama", "to_hf_llama"]
