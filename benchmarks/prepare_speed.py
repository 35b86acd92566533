"""Data preparation: `gptforge prepare` (the whole process, start to exit) against single-process
tiktoken on the same documents in the same run, and peak memory on a generated corpus of >= 2 GB.

    PYTHONPATH=src python benchmarks/prepare_speed.py --baseline-src /tmp/gptforge-base/src

1. Generate a corpus in --dir: JSON lines files of documents (contiguous runs of Tiny Shakespeare
   lines, 200 to 8,000 characters), --gb in all, split into files of about 256 MB. The first
   --compare-mb are also written as Parquet (FineWeb-Edu's columns, 1,000 rows per row group)
   and as one plain text file.
2. Speed on that subset (all on the same documents):
   - single-process tiktoken: for each line, json.loads and GPT-2 encode_ordinary; tokens counted,
     nothing written. Its pure encode time is reported too (the strictest baseline);
   - gptforge prepare --workers 1, and at its default (all cores), on the JSON lines;
   - gptforge prepare at its default on the Parquet copy.
3. One text file (one document): gptforge prepare now, and the gptforge at --baseline-src (an
   older checkout, e.g. `git worktree add /tmp/gptforge-base adcc4d6`), same file; their tokens
   are compared.
4. The whole corpus at default settings: wall time, MB/s, tokens/s, and the peak RSS of the main
   process, of the largest worker, and the peak total PSS of all of them (RSS counts the pages
   workers share with the parent once per process; PSS divides them).

Every prepare is a separate `python -m gptforge prepare` process, timed from start to exit.
Printed as Markdown; the corpus and outputs are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from machine import cpu  # the CPU line every benchmark prints
from gptforge.data.named import bundled_path

SHAKESPEARE = Path(bundled_path("shakespeare"))  # the copy that ships in the package
SRC = Path(__file__).resolve().parents[1] / "src"
FILE_BYTES = 256 * 1024 * 1024


def make_docs(lines: list[str], rng: random.Random):
    """Documents forever: a contiguous run of lines of about 200 to 8,000 characters."""
    while True:
        start = rng.randrange(len(lines))
        want = rng.randint(200, 8000)
        out, n = [], 0
        i = start
        while n < want:
            out.append(lines[i % len(lines)])
            n += len(out[-1]) + 1
            i += 1
        yield "\n".join(out)


def generate(d: Path, gb: float, compare_mb: int) -> dict[str, object]:
    """JSON lines files of about FILE_BYTES each; the first compare_mb also as Parquet and text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    lines = SHAKESPEARE.read_text(encoding="utf-8").split("\n")
    docs = make_docs(lines, random.Random(0))
    target = int(gb * 1e9)
    written, k = 0, 0
    subset_docs: list[str] = []
    while written < target:
        path = d / "jsonl" / f"part-{k:04d}.jsonl"
        path.parent.mkdir(exist_ok=True)
        size = 0
        with open(path, "w", encoding="utf-8") as f:
            while size < FILE_BYTES and written + size < target:
                doc = next(docs)
                line = json.dumps({"text": doc, "id": f"doc-{k}-{size}"}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                if written + size <= compare_mb * 1e6:
                    subset_docs.append(doc)
        written += size
        k += 1
    # The comparison subset as one JSONL file, as Parquet and as one text file.
    with open(d / "subset.jsonl", "w", encoding="utf-8") as f:
        for doc in subset_docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    n = len(subset_docs)
    table = pa.table({
        "text": subset_docs, "id": [f"<urn:uuid:{i}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.org/{i}" for i in range(n)],
        "file_path": ["s3://bucket/file.warc.gz"] * n, "language": ["en"] * n,
        "language_score": [0.95] * n, "token_count": [len(t) // 4 for t in subset_docs],
        "score": [3.1] * n, "int_score": [3] * n,
    })
    pq.write_table(table, d / "subset.parquet", row_group_size=1000)
    with open(d / "subset.txt", "w", encoding="utf-8") as f:
        f.write("\n\n".join(subset_docs))
    return {"bytes": written, "files": k, "subset_docs": n}


class Peaks:
    """Samples a process tree: the main process's and the largest child's peak RSS (VmHWM), and
    the peak of the tree's total PSS."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.main_hwm = self.child_hwm = self.total_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        kids = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    with open(f"/proc/{p}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.pid:
                            kids.append(int(p))
                except (OSError, ValueError, IndexError):
                    pass
        return kids

    @staticmethod
    def _field(path: str, name: str) -> int:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(name + ":"):
                        return int(line.split()[1])  # kB
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            kids = self._tree()
            self.main_hwm = max(self.main_hwm, self._field(f"/proc/{self.pid}/status", "VmHWM"))
            for k in kids:
                self.child_hwm = max(self.child_hwm, self._field(f"/proc/{k}/status", "VmHWM"))
            pss = sum(self._field(f"/proc/{p}/smaps_rollup", "Pss") for p in [self.pid, *kids])
            self.total_pss = max(self.total_pss, pss)
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_prepare(inputs: list[str], out: Path, extra: list[str], src: Path = SRC) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gptforge", "prepare", *inputs, "--out", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(src)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = Peaks(proc.pid)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    peaks.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {stderr}")
    meta = json.loads((out / "meta.json").read_text())
    return {"wall_s": wall, "tokens": meta["train_tokens"] + meta["val_tokens"],
            "bytes": sum(os.path.getsize(i) for i in _files(inputs)),
            "main_rss_mb": peaks.main_hwm / 1024, "worker_rss_mb": peaks.child_hwm / 1024,
            "total_pss_mb": peaks.total_pss / 1024, "out": out}


def _files(inputs: list[str]) -> list[str]:
    found = []
    for i in inputs:
        if os.path.isdir(i):
            found += [os.path.join(r, f) for r, _, fs in os.walk(i) for f in fs]
        else:
            found.append(i)
    return found


def tiktoken_baseline(path: Path) -> dict:
    """One process: read each line, json.loads, encode_ordinary; count tokens, write nothing."""
    sys.path.insert(0, str(SRC))
    from gptforge.tokenizer import _gpt2_encoding

    enc = _gpt2_encoding()  # built before timing: ~1 s, the same cost gptforge pays
    tokens, encode_s = 0, 0.0
    start = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            t = time.perf_counter()
            tokens += len(enc.encode_ordinary(text)) + 1  # + the separator prepare adds
            encode_s += time.perf_counter() - t
    return {"wall_s": time.perf_counter() - start, "encode_s": encode_s, "tokens": tokens - 1,
            "bytes": os.path.getsize(path)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/gptforge-bench-prepare", help="where the corpus goes")
    p.add_argument("--gb", type=float, default=2.1, help="corpus size in GB (default: 2.1)")
    p.add_argument("--compare-mb", type=int, default=400,
                   help="size of the subset the speed comparison uses (default: 400)")
    p.add_argument("--baseline-src", help="src/ of an older gptforge for the text-file row")
    p.add_argument("--keep", action="store_true", help="keep the corpus and the outputs")
    args = p.parse_args()
    d = Path(args.dir)
    import pyarrow
    import tiktoken

    print(f"machine: {cpu()}; Python {platform.python_version()}, tiktoken "
          f"{tiktoken.__version__}, pyarrow {pyarrow.__version__}\n")
    try:
        t = time.perf_counter()
        corpus = generate(d, args.gb, args.compare_mb)
        print(f"generated {corpus['bytes'] / 1e9:.2f} GB in {corpus['files']} JSON lines files "
              f"({time.perf_counter() - t:.0f} s); subset: {corpus['subset_docs']:,} documents\n")

        rows = []
        base = tiktoken_baseline(d / "subset.jsonl")
        rows.append(("single-process tiktoken (read, json.loads, encode_ordinary)", base))
        rows.append(("single-process tiktoken, encode_ordinary time only",
                     {**base, "wall_s": base["encode_s"]}))
        for name, inputs, extra in [
            ("gptforge prepare --workers 1, JSON lines", [str(d / "subset.jsonl")], ["--workers", "1"]),
            ("gptforge prepare (default workers), JSON lines", [str(d / "subset.jsonl")], []),
            ("gptforge prepare (default workers), Parquet", [str(d / "subset.parquet")], []),
        ]:
            r = run_prepare(inputs, d / "out-subset", extra)
            # the same tokens, less one <|endoftext|>: train and val each start without one
            assert r["tokens"] == base["tokens"] - 1, (r["tokens"], base["tokens"])
            rows.append((name, r))
        print(f"### Speed, {base['bytes'] / 1e6:,.0f} MB subset ({base['tokens']:,} tokens)\n")
        print("| what | wall s | MB/s | M tokens/s | vs single-process tiktoken | peak RSS main / worker MB |")
        print("|---|---|---|---|---|---|")
        for name, r in rows:
            mbs = r["bytes"] / r["wall_s"] / 1e6
            rss = (f"{r['main_rss_mb']:.0f} / {r['worker_rss_mb']:.0f}" if "main_rss_mb" in r
                   else "-")
            print(f"| {name} | {r['wall_s']:.1f} | {mbs:.1f} | {r['tokens'] / r['wall_s'] / 1e6:.2f} "
                  f"| {base['wall_s'] / r['wall_s']:.2f}x | {rss} |")

        print("\n### One text file (one document), the same file for both\n")
        print("| gptforge | wall s | MB/s | peak RSS MB | tokens |")
        print("|---|---|---|---|---|")
        text = [str(d / "subset.txt")]
        new = run_prepare(text, d / "out-text-new", [])
        print(f"| this version | {new['wall_s']:.1f} | {new['bytes'] / new['wall_s'] / 1e6:.1f} | "
              f"{new['main_rss_mb']:.0f} | {new['tokens']:,} |")
        if args.baseline_src:
            old = run_prepare(text, d / "out-text-old", [], src=Path(args.baseline_src))
            print(f"| {args.baseline_src} | {old['wall_s']:.1f} | "
                  f"{old['bytes'] / old['wall_s'] / 1e6:.1f} | {old['main_rss_mb']:.0f} | "
                  f"{old['tokens']:,} |")
            import numpy as np

            def tokens(out: Path, names: list[str]) -> np.ndarray:
                return np.concatenate([np.fromfile(out / n, dtype="<u2")[32:] for n in names])

            same = np.array_equal(
                tokens(new["out"], sorted(f for f in os.listdir(new["out"]) if f.startswith("train"))
                       + sorted(f for f in os.listdir(new["out"]) if f.startswith("val"))),
                tokens(old["out"], ["train.bin", "val.bin"]))
            print(f"\nsame tokens from both: {same}")

        print("\n### The whole corpus, default settings\n")
        whole = run_prepare([str(d / "jsonl")], d / "out-all", [])
        shards = sum(os.path.getsize(whole["out"] / f) for f in os.listdir(whole["out"]))
        print("| input | wall s | MB/s | M tokens/s | tokens | peak RSS main MB | peak RSS "
              "largest worker MB | peak total PSS MB | output on disk |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {whole['bytes'] / 1e9:.2f} GB JSON lines | {whole['wall_s']:.1f} | "
              f"{whole['bytes'] / whole['wall_s'] / 1e6:.1f} | "
              f"{whole['tokens'] / whole['wall_s'] / 1e6:.2f} | {whole['tokens']:,} | "
              f"{whole['main_rss_mb']:.0f} | {whole['worker_rss_mb']:.0f} | "
              f"{whole['total_pss_mb']:.0f} | {shards / 1e9:.2f} GB |")
        pq_size = os.path.getsize(d / "subset.parquet")
        print(f"\nParquet subset: {pq_size / 1e6:.0f} MB for {base['tokens']:,} tokens "
              f"({pq_size / base['tokens'] * 1e9 / 1e9:.2f} GB per billion tokens of this text)")
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
