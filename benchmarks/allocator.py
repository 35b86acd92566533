"""The allocator lever alone: full training steps with and without keeping freed memory.

    PYTHONPATH=src python benchmarks/allocator.py 0 gpt2-tiny 4 64 15   # glibc default
    PYTHONPATH=src python benchmarks/allocator.py 1 gpt2-tiny 4 64 15   # keep_freed_memory()
    PYTHONPATH=src python benchmarks/allocator.py 0 gpt2 16 64 3
    PYTHONPATH=src python benchmarks/allocator.py 1 gpt2 16 64 3

Arguments: keep (0/1), model preset (with GPT-2's 50,257-token vocabulary), batch, seq_len, timed
steps. One process per setting, since the allocator setting is process-wide. Same step in both:
forward, backward, clip at 1.0, fused AdamW, fp32.
"""

import sys
import time

import torch

from gptforge import GPT, GPTConfig
from gptforge.config import OptimConfig
from gptforge.memory import keep_freed_memory
from gptforge.optim import build_optimizer

keep, preset, B, T, n = sys.argv[1] == "1", sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if keep:
    assert keep_freed_memory()
torch.manual_seed(0)
model = GPT(GPTConfig.preset(preset, vocab_size=50257))
opt = build_optimizer(model, OptimConfig(), "cpu")
x, y = torch.randint(0, 50257, (B, T)), torch.randint(0, 50257, (B, T))


def step() -> None:
    opt.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


for _ in range(2):
    step()
t0 = time.perf_counter()
for _ in range(n):
    step()
dt = (time.perf_counter() - t0) / n
print(f"keep_freed_memory={int(keep)} {preset} {B}x{T}: {dt * 1000:.1f} ms/step, {B * T / dt:.1f} tok/s")
