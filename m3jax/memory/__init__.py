"""Writing and storing explicit memory: reference encoding, the TensorStore memory bank and its codecs.

`bank.MemoryBank` stores one sparse key/value memory per reference (`[refs, mem_layers, 2, kv_heads, k,
head_dim]`) with the model identity that wrote it; `codecs` says how a memory is stored (bf16, int8).
"""
