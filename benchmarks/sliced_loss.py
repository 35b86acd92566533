"""What the sliced head and loss (train.sliced_loss) save and cost, measured with `gptforge bench`.

    PYTHONPATH=src python benchmarks/sliced_loss.py memory   # 124M at 4 x 1024, fp32: the peaks
    PYTHONPATH=src python benchmarks/sliced_loss.py speed    # each preset at bench's CPU shape

Every figure is one `gptforge bench` process (its peak memory is the process's high-water mark,
ru_maxrss, so each configuration gets its own process). ``memory``: GPT-2 124M on 4 x 1024
tokens in fp32 with neither activation checkpointing nor slices, each alone, and both, as ratios
to neither. ``speed``: gpt2-tiny, gpt2-mini and gpt2 (GPT-2's vocabulary) at bench's CPU default
of 16 x 64, --dtype auto, sliced and unsliced in alternating order (ABBA), tokens/s as the ratio
sliced / unsliced of the summed times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def bench(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "gptforge", "bench", "--device", "cpu", "--json", "-",
                          "--peak-seconds", "0.5", *args], capture_output=True, text=True,
                         env=os.environ)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory() -> None:
    shape = ["--preset", "gpt2", "--batch-size", "4", "--seq-len", "1024", "--steps", "1",
             "--warmup", "1", "--dtype", "float32"]
    runs = {
        "neither": bench(*shape, "--no-sliced-loss"),
        "activation checkpointing": bench(*shape, "--no-sliced-loss", "--activation-checkpointing"),
        "sliced loss": bench(*shape),
        "both": bench(*shape, "--activation-checkpointing"),
    }
    base = runs["neither"]
    print("| configuration | peak memory MB | vs neither | step s | vs neither |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['peak_memory_mb']:,.0f} | {r['peak_memory_mb'] / base['peak_memory_mb']:.2f}x "
              f"| {r['step_ms'] / 1000:.1f} | {base['step_ms'] / r['step_ms']:.2f}x speed |")


def speed() -> None:
    print("| preset | tok/s unsliced | tok/s sliced | sliced / unsliced | peak MB unsliced | sliced |")
    print("|---|---|---|---|---|---|")
    for preset in ("gpt2-tiny", "gpt2-mini", "gpt2"):
        shape = ["--preset", preset, "--steps", "5" if preset == "gpt2" else "20", "--warmup", "2"]
        off, on = [], []
        for order in ((off, on), (on, off)):
            for runs in order:
                runs.append(bench(*shape, *([] if runs is on else ["--no-sliced-loss"])))
        t_off = sum(r["step_ms"] for r in off)
        t_on = sum(r["step_ms"] for r in on)
        tps = [r["tokens_per_s"] for r in off], [r["tokens_per_s"] for r in on]
        print(f"| {preset} ({off[0]['precision']}) | {' / '.join(f'{x:,.0f}' for x in tps[0])} "
              f"| {' / '.join(f'{x:,.0f}' for x in tps[1])} | {t_off / t_on:.2f}x "
              f"| {max(r['peak_memory_mb'] for r in off):,.0f} | {max(r['peak_memory_mb'] for r in on):,.0f} |")


if __name__ == "__main__":
    {"memory": memory, "speed": speed}[sys.argv[1]]()
