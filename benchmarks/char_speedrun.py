"""Wall time and validation loss of `shakespeare-char-speedrun` against the standard
`shakespeare-char` recipe, each run as a whole `gptforge train` process on the same prepared data.

Data preparation is done once, first, and is not timed. Each seed's run is one process; the wall
time is the whole process (interpreter start, imports, training, the final evaluation over the
whole val split, the checkpoint). The val loss is the last one the run wrote to metrics.jsonl.

    PYTHONPATH=src python benchmarks/char_speedrun.py                       # 3 seeds + the standard recipe, ~5 min
    PYTHONPATH=src python benchmarks/char_speedrun.py --seeds 1337 --no-standard
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu  # the CPU line every benchmark prints
from gptforge.data.named import bundled_path

SHAKESPEARE = Path(bundled_path("shakespeare"))  # the copy that ships in the package


def gptforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "gptforge", *args]


def last_val_loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def timed_run(data: Path, run: Path, preset: str, seed: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    subprocess.run(gptforge("train", "--data", str(data), "--out", str(run), "--preset", preset,
                            "--set", f"train.seed={seed}"),
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.perf_counter() - t0, last_val_loss(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=SHAKESPEARE, help="Tiny Shakespeare input.txt")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    p.add_argument("--no-standard", action="store_true", help="skip the standard recipe (~165 s)")
    p.add_argument("--target", type=float, default=1.88)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run(gptforge("prepare", str(args.text), "--out", str(data), "--tokenizer", "char"),
                       check=True, stdout=subprocess.DEVNULL)
        runs = [("shakespeare-char-speedrun", s) for s in args.seeds]
        if not args.no_standard:
            runs.append(("shakespeare-char", args.seeds[0]))
        print(f"{cpu()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
        print("| preset | seed | wall (whole process) | val loss (whole val split) | under target |")
        print("|---|---|---|---|---|")
        for i, (preset, seed) in enumerate(runs):
            wall, val = timed_run(data, Path(tmp) / f"run{i}", preset, seed)
            print(f"| {preset} | {seed} | {wall:.1f} s | {val:.4f} | "
                  f"{'yes' if val < args.target else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
