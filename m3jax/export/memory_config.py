"""The memory configuration an exported Memory3 model needs beside its Llama weights (`memory_config.json`).

Written by tools/export_pytorch.py for a model with memory heads, read by `m3jax.export.torch_memory.Memory3Llama`;
torch-free, so that the export needs no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from etils import epath

from m3jax.model.config import ModelConfig

MEMORY_CONFIG_FILE = "memory_config.json"
_KEYS = ("memory_layers", "memory_kv_heads", "chunk_size", "ref_len", "k", "sink_tokens", "vocab_size")


def memory_config(cfg: ModelConfig, sink_tokens: Sequence[int]) -> dict[str, Any]:
    """What `Memory3Llama` needs beside the Llama weights (JSON-ready): the memory geometry, the sink and the real
    vocabulary (the exported head keeps its padding rows)."""
    if not cfg.has_memory:
        raise ValueError("the model has no memory heads (config.memory.heads=False): there is no memory to export")
    return {"memory_layers": list(cfg.memory_layers), "memory_kv_heads": list(cfg.memory_kv_heads),
            "chunk_size": cfg.memory_chunk_size, "ref_len": cfg.memory_ref_len, "k": cfg.memory_k,
            "sink_tokens": [int(t) for t in sink_tokens], "vocab_size": cfg.vocab_size}


def write_memory_config(out_dir: str | os.PathLike, cfg: ModelConfig, sink_tokens: Sequence[int]) -> epath.Path:
    """Writes `out_dir/memory_config.json` (a local directory or a `gs://` URL); returns its path."""
    path = epath.Path(out_dir) / MEMORY_CONFIG_FILE
    path.write_text(json.dumps(memory_config(cfg, sink_tokens), indent=2) + "\n", encoding="utf-8")
    return path


def read_memory_config(path: str | os.PathLike) -> dict[str, Any]:
    """A `memory_config.json` (or the directory holding it), checked for every key `Memory3Llama` needs."""
    path = Path(path)
    if path.is_dir():
        path = path / MEMORY_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no memory configuration (tools/export_pytorch.py writes it for a model "
                                "with memory heads)") from e
    except ValueError as e:
        raise ValueError(f"{path}: not JSON: {e}") from e
    missing = [k for k in _KEYS if k not in config]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    return config
