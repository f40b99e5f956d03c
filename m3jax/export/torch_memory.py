"""Memory3 in PyTorch: an exported `LlamaForCausalLM` whose memory heads read explicit memory.

    model = Memory3Llama.from_pretrained("runs/demo/hf")          # tools/export_pytorch.py's directory
    logits = model(tokens, positions, segment_ids, memory_group, memory)
    tokens = model.generate(prompts, max_new_tokens, source)      # swaps memories every 64 tokens

The exported weights are a plain Hugging Face Llama; `memory_config.json` beside them (written by
`tools/export_pytorch.py`, `memory_config()`) says which layers and KV heads read memory, the chunk size, the
reference length, the tokens kept per memory and the sink. The math is the JAX model's (m3jax/model/memory.py and
docs/memory.md), written out plainly here rather than through transformers' attention:

- the sink (`<s>Reference:`) is put before the context at positions [0, p); it is its own segment, sees only itself,
  and every context token sees it;
- the context starts at position p + ref_len, causal within its segments (0 = padding);
- in a memory layer, the query heads of a memory KV head also see the valid keys of their token's group's memory
  slots (stored after RoPE at their in-reference positions, so they are used as they are), in the same softmax
  as the context; other heads, and tokens of group -1, see the context only.

The module reads the same memories as the JAX model: `MemoryInputs` are the arrays of `m3jax.model.memory.Memory`
(keys/values [Lm, b, M, mkv, kk, d], index [b, G, S], valid [b, M, kk]), and `generate` takes any memory source
with `retrieve`, `memories` and `sink` (`m3jax.infer.generate.BankMemories` reads a written bank through TensorStore
and its ScaNN index). torch is imported by this module only: nothing in training needs it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from m3jax.export.memory_config import read_memory_config

NEG_INF = -1e30  # as the JAX model: finite, so a fully masked row gives zeros instead of NaNs


@dataclasses.dataclass
class MemoryInputs:
    """The memories a batch reads, in the layout of `m3jax.model.memory.Memory` (torch tensors): keys, values
    [Lm, b, M, mkv, kk, d] (keys after RoPE), index [b, G, S] (-1 = empty slot), valid [b, M, kk]."""

    keys: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_rows(cls, rows, index, valid) -> MemoryInputs:
        """From the bank's row layout: rows [b, M, Lm, 2, mkv, kk, d] (numpy, jax or torch), index, valid."""
        kv = torch.from_numpy(np.array(rows, np.float32)).movedim(2, 0)  # [Lm, b, M, 2, mkv, kk, d]
        return cls(keys=kv[:, :, :, 0], values=kv[:, :, :, 1], index=torch.as_tensor(np.asarray(index, np.int64)),
                   valid=torch.as_tensor(np.asarray(valid, bool)))


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x [b, t, heads, d] rotated by rotate-half RoPE at integer positions [b, t], in float32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cos(angles) + rotated * torch.sin(angles)


class Memory3Llama(torch.nn.Module):
    """A `transformers.LlamaForCausalLM` (its weights and modules) run as a Memory3 model."""

    def __init__(self, llama, memory: dict[str, Any]):
        super().__init__()
        self.llama = llama
        c = llama.config
        self.num_heads, self.num_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        self.rope_base = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {rope['rope_type']!r}: only the default RoPE is Memory3's layout here")
        self.memory_layers = tuple(int(x) for x in memory["memory_layers"])
        self.memory_kv_heads = tuple(int(x) for x in memory["memory_kv_heads"])
        self.chunk_size, self.ref_len, self.k = int(memory["chunk_size"]), int(memory["ref_len"]), int(memory["k"])
        self.vocab_size = int(memory["vocab_size"])
        self.register_buffer("sink_tokens", torch.as_tensor(memory["sink_tokens"], dtype=torch.long),
                             persistent=False)
        bad_layers = [i for i in self.memory_layers if not 0 <= i < c.num_hidden_layers]
        bad_heads = [h for h in self.memory_kv_heads if not 0 <= h < self.num_kv_heads]
        if bad_layers or bad_heads:
            raise ValueError(f"memory layers {bad_layers} / KV heads {bad_heads} are not in a model of "
                             f"{c.num_hidden_layers} layers and {self.num_kv_heads} KV heads")
        # query head h is a memory head iff its KV head h // group is; memory KV head j is KV head memory_kv_heads[j]
        group = self.num_heads // self.num_kv_heads
        slot = torch.full((self.num_kv_heads,), -1, dtype=torch.long)
        slot[list(self.memory_kv_heads)] = torch.arange(len(self.memory_kv_heads))
        self.register_buffer("head_slot", slot.repeat_interleave(group), persistent=False)  # [h], -1 = not memory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Memory3Llama:
        """tools/export_pytorch.py's directory: the Llama weights and memory_config.json."""
        import transformers

        memory = read_memory_config(path)
        llama = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=dtype)
        return cls(llama.eval(), memory)

    @property
    def sink_len(self) -> int:
        return int(self.sink_tokens.shape[0])

    def context_start(self) -> int:
        """The first context position: after the sink [0, p) and the memory keys [p, p + ref_len)."""
        return self.sink_len + self.ref_len

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, segment_ids: torch.Tensor,
                memory_group: torch.Tensor | None = None, memory: MemoryInputs | None = None) -> torch.Tensor:
        """tokens, positions, segment_ids, memory_group: [b, t] integer -> logits [b, t, padded vocab] float32,
        the rows past the real vocabulary at -1e30. Without `memory`: the plain model (no sink)."""
        b, t = tokens.shape
        seg = segment_ids.to(torch.long)
        if memory is None:
            x = self._layers(tokens, positions, seg, None, None)
            return self._logits(x)
        p = self.sink_len
        if memory_group is None:
            memory_group = torch.full((b, t), -1, dtype=torch.long)
        tokens = torch.cat([self.sink_tokens.expand(b, p), tokens.to(torch.long)], dim=1)
        positions = torch.cat([torch.arange(p).expand(b, p), positions.to(torch.long)], dim=1)
        seg = torch.cat([torch.full((b, p), -1, dtype=torch.long), seg], dim=1)
        group = torch.cat([torch.full((b, p), -1, dtype=torch.long), memory_group.to(torch.long)], dim=1)
        x = self._layers(tokens, positions, seg, group, memory)
        return self._logits(x[:, p:])

    def _layers(self, tokens, positions, seg, group, memory):
        model = self.llama.model
        t = tokens.shape[1]
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
        visible = causal & ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == -1))  # [b, t, t]
        x = model.embed_tokens(tokens)
        for i, layer in enumerate(model.layers):
            mem = None
            if memory is not None and i in self.memory_layers:
                j = self.memory_layers.index(i)
                mem = self._group_memory(memory.keys[j], memory.values[j], memory.index, memory.valid, group)
            h = layer.input_layernorm(x)
            x = x + self._attention(layer.self_attn, h, positions, visible, mem)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.norm(x)

    def _group_memory(self, keys, values, index, valid, group):
        """Each token's view of its group's slots: keys/values [b, t, S·kk, mkv, d], visible [b, t, S·kk]."""
        b, t = group.shape
        s, kk = index.shape[-1], keys.shape[3]
        rows = torch.arange(b)[:, None, None]
        slots = index[rows, group.clamp(min=0)[:, :, None], torch.arange(s)]  # [b, t, S]
        mem = slots.clamp(min=0)
        k = keys[rows, mem].permute(0, 1, 2, 4, 3, 5)  # [b, t, S, kk, mkv, d]
        v = values[rows, mem].permute(0, 1, 2, 4, 3, 5)
        ok = (slots >= 0)[..., None] & valid[rows, mem] & (group >= 0)[:, :, None, None]  # [b, t, S, kk]
        return k.reshape(b, t, s * kk, *k.shape[-2:]), v.reshape(b, t, s * kk, *v.shape[-2:]), ok.reshape(b, t, -1)

    def _attention(self, attn, h, positions, visible, mem):
        b, t, _ = h.shape
        hd, nh, nkv = self.head_dim, self.num_heads, self.num_kv_heads
        q = _rope(attn.q_proj(h).view(b, t, nh, hd).float(), positions, self.rope_base)
        k = _rope(attn.k_proj(h).view(b, t, nkv, hd).float(), positions, self.rope_base)
        v = attn.v_proj(h).view(b, t, nkv, hd).float()
        group = nh // nkv
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)  # query head h reads h // group
        scale = 1.0 / math.sqrt(hd)
        logits = torch.einsum("bthd,bshd->bhts", q, k) * scale
        logits = logits.masked_fill(~visible[:, None], NEG_INF)
        if mem is None:
            probs = torch.softmax(logits, dim=-1)
            out = torch.einsum("bhts,bshd->bthd", probs, v)
        else:
            mk, mv, ok = mem  # [b, t, n, mkv, d], [b, t, n]
            is_mem = self.head_slot >= 0
            which = self.head_slot.clamp(min=0)
            mk, mv = mk[:, :, :, which].float(), mv[:, :, :, which].float()  # [b, t, n, h, d]
            mlogits = torch.einsum("bthd,btnhd->bhtn", q, mk) * scale
            mlogits = mlogits.masked_fill(~(ok[:, None] & is_mem[None, :, None, None]), NEG_INF)
            probs = torch.softmax(torch.cat([logits, mlogits], dim=-1), dim=-1)
            out = (torch.einsum("bhts,bshd->bthd", probs[..., :t], v)
                   + torch.einsum("bhtn,btnhd->bthd", probs[..., t:], mv))
        return attn.o_proj(out.reshape(b, t, nh * hd).to(h.dtype))

    def _logits(self, x):
        logits = self.llama.lm_head(x).float()
        if logits.shape[-1] > self.vocab_size:
            logits[..., self.vocab_size:] = NEG_INF
        return logits

    # ------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, source, *, slots: int = 5,
                 memory: bool = True) -> list[list[int]]:
        """Greedy continuations of `prompts` (token lists, bos included), as m3jax's `generate(mode="memory3")`:
        the prompt's chunk g (its tokens [64g, 64g + 64)) reads the `slots` memories its own text retrieves
        (filtered against the whole prompt); generated tokens continue with the last prompt chunk's memories, and
        every 64 generated tokens the last 64 tokens retrieve `slots` new ones (filtered against themselves).
        `source`: `retrieve(queries, against) -> ids [q, slots]` and `memories(ids, dtype) -> (rows [*ids.shape,
        Lm, 2, mkv, kk, d], positions [*ids.shape, Lm, mkv, kk])`, as `m3jax.infer.generate.BankMemories`.
        Each step recomputes the whole sequence (no KV cache): a reference implementation, not a server.
        `memory=False`: the plain model."""
        return [self._generate_one([int(x) for x in p], max_new_tokens, source, slots, memory) for p in prompts]

    def _generate_one(self, prompt, max_new_tokens, source, slots, memory):
        c = self.chunk_size
        if not memory:
            seq = list(prompt)
            for _ in range(max_new_tokens):
                n = len(seq)
                logits = self(torch.as_tensor([seq]), torch.arange(n)[None], torch.ones(1, n, dtype=torch.long))
                seq.append(int(logits[0, -1, :self.vocab_size].argmax()))
            return seq[len(prompt):]
        chunks = [prompt[g * c:(g + 1) * c] for g in range(-(-len(prompt) // c))]
        ids = [np.asarray(r[:slots]) for r in source.retrieve(chunks, against=[prompt] * len(chunks))]
        seq, start = list(prompt), self.context_start()
        groups = [g for g in range(len(chunks)) for _ in chunks[g]]  # each prompt token's group
        for j in range(max_new_tokens):
            if j and j % c == 0:  # the last 64 tokens retrieve the next segment's memories
                query = seq[-c:]
                ids.append(np.asarray(source.retrieve([query], against=[query])[0, :slots]))
            n = len(seq)
            group = groups + [len(chunks) - 1 + m // c for m in range(n - len(prompt))]
            if j == 0 or j % c == 0:
                inputs = self._memory_inputs(ids, source)
            logits = self(torch.as_tensor([seq]), (start + torch.arange(n))[None], torch.ones(1, n, dtype=torch.long),
                          torch.as_tensor([group]), inputs)
            seq.append(int(logits[0, -1, :self.vocab_size].argmax()))
        return seq[len(prompt):]

    def _memory_inputs(self, ids: list[np.ndarray], source) -> MemoryInputs:
        """Groups' reference ids (one array of `slots` per group, -1 = none) -> one row's MemoryInputs."""
        slots = max(len(r) for r in ids)
        table = np.full((len(ids), slots), -1, np.int64)
        for g, r in enumerate(ids):
            table[g, :len(r)] = r
        rows, positions = source.memories(table.reshape(1, -1), np.float32)
        valid = np.asarray(positions)[..., 0, 0, :] >= 0  # [1, M, kk]: padding is the same in every layer and head
        index = np.where(table >= 0, np.arange(table.size).reshape(table.shape), -1)[None]
        return MemoryInputs.from_rows(np.asarray(rows, np.float32), index, valid)
