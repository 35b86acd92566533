"""`gptforge prepare` of many short JSON lines documents against single-threaded tiktoken.

    PYTHONPATH=src python benchmarks/prepare_short_docs.py [--mb 124] [--repeats 3] [--src OTHER/src]

The case of a web corpus: about 124 MB of JSON lines holding about 146,000 documents of ~850
bytes of text each (lengths drawn from a log-normal distribution; the text is contiguous runs of
Tiny Shakespeare lines, the copy that ships in the package), each line with FineWeb's metadata fields beside "text".

Each repeat runs, one after the other:
- the baseline: one process reads the file line by line, parses each line with ``json.loads``
  and encodes its text with GPT-2's tiktoken ``encode_ordinary`` (the encoder built before the
  clock starts; nothing written); its encode time alone is reported as well;
- ``python -m gptforge prepare FILE --out OUT`` at its default (one worker per core) and with
  ``--workers 1``, whole processes timed from start to exit;
- with ``--src``, the same two prepares with another gptforge's src/ (e.g. a worktree of an older
  commit), to compare two versions in one run; their shards are compared byte for byte;
- with ``--bpe-vocab N``, ``prepare --tokenizer TOKENIZER.JSON`` at its default workers, reusing a
  byte-level BPE of N tokens trained once before the repeats (``prepare --tokenizer bpe`` on
  the first 20 MB of the corpus): the trained tokenizer's whole-process rate on the same text.

Prints the median of each over the repeats and its ratio to the baseline, as Markdown.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu  # the CPU line every benchmark prints
from gptforge.data.named import bundled_path

SHAKESPEARE = Path(bundled_path("shakespeare"))  # the copy that ships in the package
SRC = Path(__file__).resolve().parents[1] / "src"


def generate(path: Path, mb: float, seed: int = 0) -> dict[str, int]:
    """JSON lines of short documents (~850 characters on average) with FineWeb-like fields."""
    lines = SHAKESPEARE.read_text(encoding="utf-8").split("\n")
    rng = random.Random(seed)
    target = int(mb * 1e6)
    size = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            want = min(int(rng.lognormvariate(6.2, 0.8)), 20_000)
            i = rng.randrange(len(lines))
            parts, n = [], 0
            while n < want:
                parts.append(lines[i % len(lines)])
                n += len(parts[-1]) + 1
                i += 1
            record = {"text": "\n".join(parts), "id": f"<urn:uuid:{docs:08d}>",
                      "dump": "CC-MAIN-2024-10", "url": f"https://example.org/page/{docs}",
                      "date": "2024-02-21T10:00:00Z", "language": "en",
                      "language_score": 0.95, "token_count": n // 4}
            line = json.dumps(record, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            docs += 1
    return {"bytes": size, "docs": docs}


def baseline(path: Path) -> dict[str, float]:
    """Single-threaded tiktoken: read, json.loads, encode_ordinary; the encoder built first."""
    sys.path.insert(0, str(SRC))  # gptforge's own GPT-2 build of tiktoken: the same BPE
    from gptforge.tokenizer import get_tokenizer

    enc = get_tokenizer("gpt2")._enc  # its tiktoken.Encoding
    t0 = time.perf_counter()
    encode = tokens = 0.0
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            t = time.perf_counter()
            tokens += len(enc.encode_ordinary(text))
            encode += time.perf_counter() - t
    return {"wall": time.perf_counter() - t0, "encode": encode, "tokens": tokens}


def prepare(path: Path, out: Path, src: Path, workers: int | None, *extra: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gptforge", "prepare", str(path), "--out", str(out), *extra]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def same_shards(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*.bin"))
    return files == sorted(p.relative_to(b) for p in b.rglob("*.bin")) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/gptforge-bench-short", help="where the corpus goes")
    p.add_argument("--mb", type=float, default=124.0, help="corpus size in MB (default: 124)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each (default: 3)")
    p.add_argument("--src", help="src/ of another gptforge, measured in the same run")
    p.add_argument("--bpe-vocab", type=int, help="also a trained byte-level BPE of this size")
    a = p.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    corpus = d / "short.jsonl"
    info = generate(corpus, a.mb)
    print(f"corpus: {info['bytes'] / 1e6:.1f} MB, {info['docs']:,} documents", flush=True)
    bpe: list[str] = []
    if a.bpe_vocab:
        sample = d / "sample.jsonl"
        with open(corpus, "rb") as f, open(sample, "wb") as g:
            g.writelines(f.readlines(20_000_000))
        seconds = prepare(sample, d / "bpe-trained", SRC, None, "--tokenizer", "bpe",
                          "--vocab-size", str(a.bpe_vocab))
        print(f"trained a {a.bpe_vocab:,}-token BPE on 20 MB: {seconds:.1f} s", flush=True)
        bpe = ["--tokenizer", str(d / "bpe-trained" / "tokenizer.json")]
    rows: dict[str, list[float]] = {}
    trees = [("this gptforge", SRC)] + ([("--src gptforge", Path(a.src))] if a.src else [])
    tokens = 0.0
    for r in range(a.repeats):
        b = baseline(corpus)
        tokens = b["tokens"]
        rows.setdefault("single-threaded tiktoken (read, json.loads, encode_ordinary)", []).append(b["wall"])
        rows.setdefault("the same, encode_ordinary time only", []).append(b["encode"])
        for name, src in trees:
            for workers in (None, 1):
                label = f"{name}: prepare " + ("(default workers)" if workers is None else "--workers 1")
                rows.setdefault(label, []).append(prepare(corpus, d / f"out-{name[:4]}-{workers}", src, workers))
        if bpe:
            rows.setdefault(f"trained BPE {a.bpe_vocab:,}: prepare (default workers)", []).append(
                prepare(corpus, d / "out-bpe", SRC, None, *bpe))
        print(f"repeat {r + 1}: " + ", ".join(f"{v[-1]:.2f}" for v in rows.values()), flush=True)
    if a.src:
        print("shards identical to --src:", same_shards(d / "out-this-None", d / "out---sr-None"))
    base = statistics.median(next(iter(rows.values())))
    print(f"\n{time.strftime('%Y-%m-%d')}; {cpu()}; Python {platform.python_version()}; "
          f"{info['bytes'] / 1e6:.1f} MB, {info['docs']:,} documents, {tokens:,.0f} tokens; "
          f"median of {a.repeats}\n")
    print("| what | wall s (median) | runs | MB/s | vs single-threaded tiktoken |")
    print("|---|---|---|---|---|")
    for label, v in rows.items():
        m = statistics.median(v)
        print(f"| {label} | {m:.2f} | {', '.join(f'{x:.2f}' for x in v)} | "
              f"{info['bytes'] / 1e6 / m:.1f} | {base / m:.2f}x |")


if __name__ == "__main__":
    main()
