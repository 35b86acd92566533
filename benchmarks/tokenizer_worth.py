"""Is a trained vocabulary worth it? gpt2-mini trained with GPT-2's BPE and with a trained 8,192.

    PYTHONPATH=src python benchmarks/tokenizer_worth.py --corpus shakespeare --steps 400
    PYTHONPATH=src python benchmarks/tokenizer_worth.py --corpus /work/corpora/quantangshi.jsonl --steps 400

For one corpus (``shakespeare``: Tiny Shakespeare as it ships in the package, one text file, so the held-out
part is the last 10% of each tokenizer's tokens; or a JSON lines file, whose held-out part is
the same 10% of documents for both, by prepare's seeded hash), this script:

1. prepares it twice with ``python -m gptforge prepare``: GPT-2's BPE, and ``--tokenizer bpe
   --vocab-size 8192`` (trained on the whole corpus, held-out part included, as a user would);
2. reports bytes per token on the held-out split (its tokens' UTF-8 bytes over their number);
3. trains the ``gpt2-mini`` preset for ``--steps`` steps on each, as whole ``python -m gptforge
   train`` processes on the CPU, with the schedule's decay ending at ``--steps`` and one
   validation over the whole held-out split at the end (the same settings for both), and
   reports the final validation loss, bits per byte, wall time and seconds per 100 steps.

The Quan Tang Shi file used in BENCHMARKS.md is built from github.com/chinese-poetry/
chinese-poetry at commit 99ebbef: the files 全唐诗/poet.tang.{0,1000,2000,...}.json in numeric
order, each poem as {"text": title + "\\n" + author + "\\n" + its lines joined by "\\n"}, until
the text passes 4 MB (18,008 poems, 4.2 MB). Nothing is downloaded here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
from gptforge.data.named import bundled_path  # noqa: E402 (after src is on the path)

SHAKESPEARE = Path(bundled_path("shakespeare"))  # the copy that ships in the package


def gptforge(*args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "gptforge", *args], check=True, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    return time.perf_counter() - t0, out.stdout


def held_out_bytes_per_token(data: Path) -> tuple[float, int]:
    from gptforge.data import load_split
    from gptforge.tokenizer import get_tokenizer
    from gptforge.tokenizer.bpe import load_bpe

    meta = json.loads((data / "meta.json").read_text())
    tok = load_bpe(data) if meta["tokenizer"]["name"] == "bpe" else get_tokenizer("gpt2")
    ids = load_split(data, "val")[:]
    return float(tok.token_bytes()[ids].sum()) / len(ids), len(ids)


def train(data: Path, run: Path, steps: int) -> dict[str, float]:
    shutil.rmtree(run, ignore_errors=True)
    seconds, log = gptforge(
        "train", "--data", str(data), "--out", str(run), "--preset", "gpt2-mini",
        "--set", f"train.max_steps={steps}", "--set", f"optim.decay_steps={steps}",
        "--set", f"train.eval_interval={steps}", "--set", f"train.log_interval={steps // 4}",
        "--set", "train.eval_max_batches=0")
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in last if "val_loss" in r][-1]
    return {"seconds": seconds, "val_loss": val["val_loss"], "val_bpb": val["val_bpb"],
            "params": int(log.split("model: ")[1].split()[0].replace(",", ""))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="shakespeare", help="'shakespeare' or a JSON lines file")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--dir", default="/tmp/gptforge-worth")
    a = p.parse_args()
    source = SHAKESPEARE if a.corpus == "shakespeare" else Path(a.corpus)
    d = Path(a.dir) / source.stem
    rows = []
    for name, extra in (("GPT-2 BPE (50,257)", []),
                        ("trained BPE 8,192", ["--tokenizer", "bpe", "--vocab-size", "8192"])):
        data = d / ("gpt2" if not extra else "bpe8192")
        prep, _ = gptforge("prepare", str(source), "--out", str(data), "--force", *extra)
        bpt, val_tokens = held_out_bytes_per_token(data)
        r = train(data, d / f"run-{data.name}", a.steps)
        rows.append((name, prep, bpt, val_tokens, r))
        print(f"{name}: prepare {prep:.1f} s, {bpt:.2f} bytes/token held out, {r}", flush=True)
    print(f"\n{source.name}, gpt2-mini, {a.steps} steps of 16 x 128 tokens\n")
    print("| tokenizer | parameters | held-out bytes/token | val tokens | val loss | val bpb | "
          "train wall s | s per 100 steps | prepare s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, prep, bpt, n, r in rows:
        print(f"| {name} | {r['params']:,} | {bpt:.2f} | {n:,} | {r['val_loss']:.4f} | "
              f"{r['val_bpb']:.4f} | {r['seconds']:.1f} | {100 * r['seconds'] / a.steps:.1f} | "
              f"{prep:.1f} |")


if __name__ == "__main__":
    main()
