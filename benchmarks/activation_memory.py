"""Bytes the autograd graph keeps for the backward pass (unique storages, parameters excluded):
GPT-2 124M, one forward of 8 x 1024 tokens, fp32, CPU, with and without activation checkpointing.

    PYTHONPATH=src python benchmarks/activation_memory.py

The process's peak memory (what `gptforge bench` reports) also holds the weights, gradients,
optimizer state and the loss's buffers; this counts only what checkpointing changes.
"""
import time

import torch

from gptforge import GPT, GPTConfig
from gptforge.distributed import checkpoint_blocks

torch.manual_seed(0)
x = torch.randint(0, 50257, (8, 1024))
for on in (False, True):
    m = GPT(GPTConfig.preset("gpt2"))
    if on:
        checkpoint_blocks(m)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    kept = {}
    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = m(x, x)
    print(f"activation_checkpointing={on}: {sum(kept.values()) / 2**30:.2f} GiB kept for backward "
          f"({len(kept)} tensors), forward {time.perf_counter() - t0:.1f}s")
    del loss, m, kept
