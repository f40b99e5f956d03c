"""How a memory is stored in the bank: codecs that encode on the host (or device) and decode on the device.

A memory is `[mem_layers, 2, kv_heads, k, head_dim]` (its *row shape*); a codec stores it as one or more named
arrays per reference, each with its own per-row shape and zarr data type. Decoding is plain jnp, so it runs on
the accelerator inside a jitted step: what crosses host → device is the stored form.

- `bf16`: the memory itself in bfloat16. A bf16 input round-trips bit for bit.
- `int8`: per-vector absmax quantisation over head_dim. The codes `q = round(x / ŝ)` are int8 in [−127, 127];
  `ŝ = bf16(absmax / 127)` is one bfloat16 scale per vector; decoding is `q · ŝ`, exact in float32 (7 × 8
  significant bits). Bytes: 1 per element + 2 per head_dim vector (1.95× fewer than bf16 at head_dim 80).
  Error bound, per vector with absmax a (a/127 a normal number): ŝ is within a relative 2⁻⁸ + 2⁻²³ of a/127 (bf16
  rounding of a float32 quotient), so |x/ŝ| < 127.5 and no code is clipped; rounding to the nearest code costs
  at most ŝ/2 (plus the float32 division's 2⁻²⁴ relative), hence |x − x̂| ≤ (a/254)·(1 + 2⁻⁸)·(1 + 2⁻¹⁵).

A product quantiser (the paper's OPQ + residual PQ, ≈ 11.4× on top of sparsity, decoded on the CPU there) fits
this interface but is not built. Its `arrays` would be uint8 codes `[*row_shape[:-1], subspaces]`; unlike the
codecs here it carries state, codebooks trained on a sample of memories before the bank is written, which the
bank would store as one more array and hand to the codec when it opens; `decode` is a jnp gather from the
codebooks, on device. It is deliberately absent from `CODECS`: asking for it fails with the codecs that exist.
"""

from __future__ import annotations

import abc
import math

import jax
import jax.numpy as jnp
import numpy as np

RowShape = tuple[int, ...]  # [mem_layers, 2, kv_heads, k, head_dim]


class Codec(abc.ABC):
    """Encodes a batch of memories `[n, *row_shape]` into named arrays `[n, *shape]` and decodes them back."""

    name: str

    @abc.abstractmethod
    def arrays(self, row_shape: RowShape) -> dict[str, tuple[RowShape, str]]:
        """The stored arrays of one memory: name -> (per-row shape, zarr data type). "memory" is always one."""

    @abc.abstractmethod
    def encode(self, kv) -> dict:
        """kv: [n, *row_shape] float (numpy or jax) -> {name: [n, *shape]} of the same kind (numpy or jax)."""

    @abc.abstractmethod
    def decode(self, codes: dict, dtype=jnp.bfloat16) -> jax.Array:
        """{name: [n, *shape]} -> [n, *row_shape] in `dtype`, with jnp (on device; jittable)."""

    def bytes_per_memory(self, row_shape: RowShape) -> int:
        return sum(math.prod(shape) * np.dtype(numpy_dtype(dt)).itemsize
                   for shape, dt in self.arrays(row_shape).values())


def numpy_dtype(zarr_type: str) -> np.dtype:
    """The numpy dtype of a zarr data type name ("bfloat16" is ml_dtypes' bfloat16, as jnp's)."""
    return np.dtype(jnp.bfloat16) if zarr_type == "bfloat16" else np.dtype(zarr_type)


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


class BF16(Codec):
    name = "bf16"

    def arrays(self, row_shape):
        return {"memory": (tuple(row_shape), "bfloat16")}

    def encode(self, kv):
        return {"memory": _xp(kv).asarray(kv).astype(jnp.bfloat16)}

    def decode(self, codes, dtype=jnp.bfloat16):
        return jnp.asarray(codes["memory"]).astype(dtype)


class Int8(Codec):
    name = "int8"

    def arrays(self, row_shape):
        return {"memory": (tuple(row_shape), "int8"), "scale": (tuple(row_shape[:-1]), "bfloat16")}

    def encode(self, kv):
        xp = _xp(kv)
        x = xp.asarray(kv).astype(np.float32)
        scale = (xp.max(xp.abs(x), axis=-1) / 127).astype(jnp.bfloat16)
        s = scale.astype(np.float32)[..., None]
        q = xp.round(x / xp.where(s > 0, s, 1))  # an all-zero vector has scale 0 and codes 0
        return {"memory": xp.clip(q, -127, 127).astype(np.int8), "scale": scale}

    def decode(self, codes, dtype=jnp.bfloat16):
        q = jnp.asarray(codes["memory"]).astype(jnp.float32)
        s = jnp.asarray(codes["scale"]).astype(jnp.float32)
        return (q * s[..., None]).astype(dtype)


CODECS: dict[str, Codec] = {c.name: c for c in (BF16(), Int8())}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown memory codec {name!r}; known: {', '.join(CODECS)}") from None
