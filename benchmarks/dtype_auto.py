"""fp32, bf16 autocast and ``--dtype auto`` side by side, on the machine at hand: is ``auto``
within 5% of the faster of the two?

    python benchmarks/dtype_auto.py                       # gpt2-mini (two vocabularies) and 124M
    python benchmarks/dtype_auto.py --isa AVX512_CORE_BF16  # a stand-in: oneDNN held below AMX
    python benchmarks/dtype_auto.py --isa AVX2              # a stand-in: oneDNN and ATen at AVX2

Each figure is ``gptforge bench`` (full training steps: forward, backward, clipping, AdamW; one
micro-batch per step) in a process of its own, tokens per second over ``--steps`` timed steps
after two untimed ones. ``auto`` runs with an empty cache directory the first time, so it pays
for its measurement as a user's first run does (the probe's own time is reported beside it), and
then once more with the answer cached. The three dtypes alternate, ``--repeats`` rounds; the best
round of each counts.

Models, at their presets' micro-batches: gpt2-mini (4 x 128 wide) with an 8,192-token trained
BPE (the quick start's) and with GPT-2's 50,257 tokens, and GPT-2 124M at the recipe's 16 x 64.

``--isa`` holds oneDNN (``ONEDNN_MAX_CPU_ISA``) and, for AVX2, ATen too (``ATEN_CPU_CAPABILITY``)
to fewer instructions than this CPU has: a stand-in for a CPU without them, labelled as such,
never the same as measuring one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu  # the CPU line every benchmark prints

from gptforge.data.named import bundled_path

SRC = Path(__file__).resolve().parents[1] / "src"
MODELS = [  # (label, bench preset, batch, seq_len, vocabulary: "bpe8192" or "gpt2")
    ("gpt2-mini, BPE 8,192", "gpt2-mini", 16, 128, "bpe8192"),
    ("gpt2-mini, GPT-2 vocab", "gpt2-mini", 16, 128, "gpt2"),
    ("GPT-2 124M", "gpt2", 16, 64, "gpt2"),
]


def isa_env(isa: str | None) -> dict[str, str]:
    if not isa:
        return {}
    env = {"ONEDNN_MAX_CPU_ISA": isa}
    if isa.startswith("AVX2"):
        env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    return env


def bench(preset: str, batch: int, seq: int, dtype: str, steps: int, data: Path | None,
          env: dict[str, str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "gptforge", "bench", "--preset", preset, "--batch-size", str(batch),
               "--seq-len", str(seq), "--steps", str(steps), "--warmup", "2", "--device", "cpu",
               "--dtype", dtype, "--peak-seconds", "0.1", "--json", out.name]
        if data is not None:
            cmd += ["--data", str(data)]
        res = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(SRC), **env})
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
        return next(r for r in json.loads(Path(out.name).read_text()) if not r["plain"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per figure (default: 4)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the three dtypes (default: 2)")
    p.add_argument("--isa", default=None, help="hold oneDNN to this ISA (a stand-in; see above)")
    p.add_argument("--only", default=None, help="only the models whose label contains this")
    p.add_argument("--no-bf16", action="store_true",
                   help="measure fp32 and auto only (where bf16 is emulated, a 124M step takes minutes)")
    args = p.parse_args()
    env = isa_env(args.isa)
    stand_in = f", STAND-IN: {' '.join(f'{k}={v}' for k, v in env.items())}" if env else ""
    print(f"machine: {cpu()}{stand_in}")
    print(f"torch threads: default; {args.steps} timed steps, best of {args.repeats} rounds\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bpe = Path(tmp) / "bpe8192"
        subprocess.run([sys.executable, "-m", "gptforge", "prepare", bundled_path("shakespeare"),
                        "--out", str(bpe), "--tokenizer", "bpe", "--vocab-size", "8192"],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(SRC)})
        for label, preset, batch, seq, vocab in MODELS:
            if args.only and args.only not in label:
                continue
            data = bpe if vocab == "bpe8192" else None
            cache = Path(tmp) / f"cache-{preset}-{vocab}"
            run_env = {**env, "GPTFORGE_CACHE": str(cache)}
            best: dict[str, float] = {}
            first_auto = None
            for _ in range(args.repeats):
                for dtype in ("float32", "auto") if args.no_bf16 else ("float32", "bfloat16", "auto"):
                    r = bench(preset, batch, seq, dtype, args.steps, data, run_env)
                    if dtype == "auto" and first_auto is None:
                        first_auto = r
                    best[dtype] = max(best.get(dtype, 0.0), r["tokens_per_s"])
            best.setdefault("bfloat16", 0.0)  # --no-bf16: not measured
            fastest = max(best["float32"], best["bfloat16"])
            chose = "bfloat16" if first_auto["precision"].startswith("bfloat16") else "float32"
            # auto runs the dtype it chose: that dtype's figure is auto's speed; auto's own figure
            # (the same step, measured apart) shows the noise between two measurements of it
            rows.append((label, f"{batch}x{seq}", best["float32"], best["bfloat16"], best["auto"],
                         chose, best[chose] / fastest, first_auto["dtype_auto"]))
            print(f"{label}: fp32 {best['float32']:,.0f} tok/s, bf16 autocast {best['bfloat16']:,.0f}, "
                  f"auto {best['auto']:,.0f} (chose {chose}: {best[chose] / fastest:.2f}x the faster)\n"
                  f"  {first_auto['dtype_auto']}", flush=True)
    print("\n| model | micro-batch | fp32 tok/s | bf16 autocast tok/s | auto's run tok/s | auto chose | chosen / faster |")
    print("|---|---|---|---|---|---|---|")
    for label, shape, f32, b16, auto, chose, ratio, _ in rows:
        print(f"| {label} | {shape} | {f32:,.0f} | {b16:,.0f} ({b16 / f32:.2f}x) | {auto:,.0f} | "
              f"{chose} | {ratio:.2f} |")
    bad = [r[0] for r in rows if r[6] < 0.95]
    print("\nauto within 5% of the faster everywhere" if not bad else f"\nauto NOT within 5%: {bad}")


if __name__ == "__main__":
    main()
