"""Training-step throughput of gptforge's default path against a plain fp32 eager step, measured
in the same run (`gptforge bench --compare`), for the shapes BENCHMARKS.md reports.

    PYTHONPATH=src python benchmarks/train_step.py            # ~2.5 minutes on 2 cores
"""

import subprocess
import sys

SHAPES = [
    # (preset, batch, seq_len, steps): the original recipe's micro-batch on 124M, and a small
    # model with GPT-2's vocabulary where memory traffic rather than matmuls dominates
    ("gpt2", 16, 64, 3),
    ("gpt2-tiny", 8, 32, 20),
]

for preset, batch, seq, steps in SHAPES:
    cmd = [sys.executable, "-m", "gptforge", "bench", "--preset", preset, "--batch-size", str(batch),
           "--seq-len", str(seq), "--steps", str(steps), "--warmup", "1", "--compare"]
    print("$ gptforge " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    print(flush=True)
