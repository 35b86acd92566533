"""What each run preset costs here: parameters, tokens per step, and measured seconds per 100 steps.

    python benchmarks/preset_costs.py --out /tmp/costs [--steps 8] [--only PRESET ...]

Each preset trains on Tiny Shakespeare (the copy that ships with gptforge) prepared with the
tokenizer it is meant for, through the real ``gptforge train`` command, for ``--steps`` steps
with nothing else to do (no evaluation, no checkpoint but the last). The time per step is the
median ``dt_ms`` of metrics.jsonl, the first step left out (it pays start-up); x 100 gives the
time per 100 steps. ``gpt2-fineweb`` (524,288 tokens per step) would take many minutes a step on a
CPU and its 64 x 1024 micro-batch does not fit in 24 GB, so a step of 2 micro-batches of 8 x 1024
is timed and multiplied by 32, the number of such micro-batches in its 524,288 tokens (a step's
time is its micro-batches' times: accumulation adds nothing but the optimizer step, once).

Prints a Markdown table and writes it, with the raw figures, to OUT/preset_costs.json. The
figures go into BENCHMARKS.md, with this machine named; ``train --help`` lists only the presets'
sizes (presets.PRESET_SIZES) and points there, and to ``gptforge bench`` for a machine's own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu  # the CPU line every benchmark prints

SRC = Path(__file__).resolve().parents[1] / "src"
# The data each preset is meant for: the tokenizer prepare uses for it.
TOKENIZER = {"gpt2-shakespeare": "gpt2", "shakespeare-char": "char",
             "shakespeare-char-speedrun": "char", "shakespeare-char-quick": "char",
             "gpt2-fineweb": "gpt2", "gpt2-tiny": "char",
             "gpt2-mini": "gpt2"}
EXTRA = {"gpt2-fineweb": ["--set", "train.batch_size=8", "--set", "train.total_batch_tokens=16384"]}
SCALE = {"gpt2-fineweb": 32}  # micro-batches of 8 x 1024 in the preset's step / in the timed one
STEPS = {"gpt2-fineweb": 3, "gpt2-shakespeare": 4}


def gptforge(*args: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC), **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"gptforge {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def measure(preset: str, data: Path, out: Path, steps: int) -> dict:
    run = out / f"run-{preset}"
    log = gptforge("train", "--data", str(data), "--out", str(run), "--preset", preset,
                   "--set", f"train.max_steps={steps}", "--set", "train.log_interval=1",
                   "--set", "train.eval_interval=0", "--set", "train.save_interval=0",
                   "--set", "train.hellaswag_interval=0", "--set", "train.target_loss=0",
                   *EXTRA.get(preset, []))
    params = int(re.search(r"model: ([\d,]+) parameters", log).group(1).replace(",", ""))
    tokens = int(re.search(r"= ([\d,]+) tokens per step", log).group(1).replace(",", ""))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    dts = [r["dt_ms"] for r in records if "dt_ms" in r][1:]
    scale = SCALE.get(preset, 1)
    per_step, tokens = statistics.median(dts) / 1000 * scale, tokens * scale
    return {"preset": preset, "tokenizer": TOKENIZER[preset], "params": params,
            "tokens_per_step": tokens, "steps_timed": len(dts), "s_per_step": per_step,
            "s_per_100_steps": per_step * 100, "tok_per_s": tokens / per_step,
            "options": EXTRA.get(preset, []), "scaled_by": scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=8, help="steps per preset (the first is not timed)")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = {}
    for tok in sorted(set(TOKENIZER.values())):
        data[tok] = args.out / f"shakespeare-{tok}"
        gptforge("prepare", "shakespeare", "--out", str(data[tok]), "--tokenizer", tok)
    rows = []
    for preset in args.only or list(TOKENIZER):
        t0 = time.time()
        row = measure(preset, data[TOKENIZER[preset]], args.out, STEPS.get(preset, args.steps))
        row["wall_s"] = time.time() - t0
        rows.append(row)
        print(f"{preset}: {row['s_per_100_steps']:.1f} s / 100 steps", flush=True)
    machine = cpu()
    when = time.strftime("%Y-%m-%d")
    table = ["| preset | data | parameters | tokens per step | s per 100 steps | tok/s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        note = (f" (timed as {r['tokens_per_step'] // r['scaled_by']:,} tokens per step, x"
                f"{r['scaled_by']})" if r["scaled_by"] > 1 else "")
        table.append(f"| {r['preset']}{note} | Tiny Shakespeare, {r['tokenizer']} | {r['params']:,} | "
                     f"{r['tokens_per_step']:,} | {r['s_per_100_steps']:,.1f} | {r['tok_per_s']:,.0f} |")
    text = f"Measured {when} on {machine}, torch {torch_version()}:\n\n" + "\n".join(table)
    print(text)
    (args.out / "preset_costs.json").write_text(json.dumps({"machine": machine, "date": when,
                                                            "rows": rows}, indent=2) + "\n")
    (args.out / "preset_costs.md").write_text(text + "\n")


def torch_version() -> str:
    return subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
