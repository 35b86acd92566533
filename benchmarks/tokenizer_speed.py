"""The trained byte-level BPE: training time and peak memory on ~100 MB, encoding throughput
against GPT-2's tiktoken on the same text, and bytes per token on held-out text.

    PYTHONPATH=src python benchmarks/tokenizer_speed.py --chinese DIR_OF_poet.tang.JSON

1. A corpus of about --mb MB (default 100), written once as JSON lines in --dir, from real text:
   every poem of the Quan Tang Shi (--chinese: the poet.tang.*.json files of
   github.com/chinese-poetry/chinese-poetry, title, author and lines, one poem a document), Tiny
   Shakespeare (one paragraph a document), then the Python sources of the running interpreter's
   site-packages in sorted path order (one file a document) up to the size asked.
2. Training on it at each --vocab (default 8192 and 32768), each in a fresh process: wall time
   and peak RSS (ru_maxrss), beside the RSS of the same process after its imports. Documents
   are streamed from the file, so the text itself is never all in memory.
3. Encoding every --encode-every'th document of the corpus (default every 5th, ~20 MB) with the
   trained 8,192 vocabulary and with GPT-2's: one thread (a loop over documents, as a prepare
   worker runs) and all cores (tiktoken's encode_ordinary_batch threads; the tokenizers
   library's encode_batch on its Rust pool). Also, as an experiment, tiktoken on the trained
   BPE's vocabulary (ranks = ids): its speed, and on how many documents its ids differ.
4. Bytes per token on held-out text, trained vocabularies against GPT-2's: the Quan Tang Shi
   (every 10th poem held out, the rest trained on) and Tiny Shakespeare (last 10% held out).
5. The largest vocabulary (MAX_VOCAB_SIZE) trained on a generated corpus that has enough
   distinct pairs for it (random 8-letter words, each twice), and round-tripped.

Printed as Markdown.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from machine import cpu  # the CPU line every benchmark prints
from gptforge.data.named import bundled_path

SHAKESPEARE = Path(bundled_path("shakespeare"))  # the copy that ships in the package
SRC = Path(__file__).resolve().parents[1] / "src"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -----------------------------------------------------------------------------
# the texts


def poems(chinese: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(chinese, "poet.tang.*.json")),
                   key=lambda p: int(re.search(r"\.(\d+)\.json$", p).group(1)))
    if not files:
        sys.exit(f"no poet.tang.*.json in {chinese}")
    out = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for poem in json.load(f):
                out.append("\n".join([poem["title"], poem["author"], *poem["paragraphs"]]))
    return out


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p]


def python_sources() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["purelib"])
    for path in sorted(root.rglob("*.py")):
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def build_corpus(path: Path, chinese: str, mb: float) -> dict[str, float]:
    """Write the corpus as JSON lines (one document a line); its make-up in MB."""
    parts = {"Quan Tang Shi": poems(chinese),
             "Tiny Shakespeare": paragraphs(SHAKESPEARE.read_text(encoding="utf-8"))}
    made: dict[str, float] = {}
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for name, docs in parts.items():
            size = sum(len(d.encode()) for d in docs)
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
            made[name] = size / 1e6
            total += size
        size = 0
        for d in python_sources():
            if total + size >= mb * 1e6:
                break
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            size += len(d.encode())
        made["Python sources (site-packages)"] = size / 1e6
    return made


def read_docs(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


# -----------------------------------------------------------------------------
# training, one process each


def train_child(corpus: str, vocab: int, out: str | None) -> None:
    from gptforge.tokenizer import train_bpe

    before = rss_mb()
    t = time.perf_counter()
    tok = train_bpe(read_docs(Path(corpus)), vocab)
    seconds = time.perf_counter() - t
    if out:
        Path(out).write_bytes(tok.file_bytes())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak,
                      "vocab": tok.vocab_size, "sha256": tok.sha256}))


def train_in_child(corpus: Path, vocab: int, out: Path | None) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--train-child", str(corpus), str(vocab)]
    if out:
        cmd.append(str(out))
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    if done.returncode:
        sys.exit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# encoding


def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t, result


def tiktoken_on(bpe) -> object:
    """tiktoken with the trained vocabulary: rank = id, GPT-2's pattern (an experiment)."""
    import tiktoken

    from gptforge.tokenizer import GPT2_SPLIT_PATTERN

    lengths = bpe.token_bytes()
    # each id's bytes (private: only this experiment needs them)
    ranks = {bpe._pieces[i]: i for i in range(bpe.vocab_size) if lengths[i] > 0}
    return tiktoken.Encoding(name="trained", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": bpe.eot_id})


def encode_rows(docs: list[str], bpe, gpt2) -> list[str]:
    mb = sum(len(d.encode()) for d in docs) / 1e6
    enc = gpt2._enc
    rows = []

    def row(name: str, seconds: float, tokens: int, base: float | None) -> None:
        ratio = f"{base / seconds:.2f}x" if base else "1.00x (baseline)"
        rows.append(f"| {name} | {seconds:.2f} | {mb / seconds:.2f} | {tokens:,} | {ratio} |")

    s1, ids = timed(lambda: [enc.encode_ordinary(d) for d in docs])
    row("GPT-2, tiktoken, 1 thread (loop)", s1, sum(map(len, ids)), None)
    sn, ids = timed(lambda: enc.encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1))
    row(f"GPT-2, tiktoken, {os.cpu_count()} threads (encode_ordinary_batch)", sn,
        sum(map(len, ids)), s1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read at each call: serial
    s, ours = timed(lambda: [bpe.encode(d) for d in docs])
    v = f"{bpe.vocab_size:,}"
    row(f"trained BPE {v}, tokenizers, 1 thread (loop)", s, sum(map(len, ours)), s1)
    del os.environ["TOKENIZERS_PARALLELISM"]
    s, ids = timed(lambda: [x for i in range(0, len(docs), 1000)
                            for x in bpe.encode_batch(docs[i:i + 1000])])
    row(f"trained BPE {v}, tokenizers, {os.cpu_count()} threads (encode_batch)", s,
        sum(map(len, ids)), s1)
    assert ids == ours
    tik = tiktoken_on(bpe)
    s, ids = timed(lambda: [tik.encode_ordinary(d) for d in docs])
    row(f"trained BPE {v} in tiktoken (experiment), 1 thread", s, sum(map(len, ids)), s1)
    differ = sum(a != b for a, b in zip(ids, ours))
    rows.append(f"\ntiktoken on the trained vocabulary gives other ids than the trained BPE on "
                f"{differ:,} of {len(docs):,} documents ({mb:.1f} MB).")
    return rows


# -----------------------------------------------------------------------------
# bytes per token


def bytes_per_token(tok, docs: list[str]) -> float:
    return sum(len(d.encode()) for d in docs) / sum(len(tok.encode(d)) for d in docs)


def held_out_rows(name: str, train: list[str], held: list[str], vocabs: list[int], gpt2) -> list[str]:
    from gptforge.errors import GptforgeError
    from gptforge.tokenizer import train_bpe

    mb = sum(len(d.encode()) for d in train) / 1e6
    held_mb = sum(len(d.encode()) for d in held) / 1e6
    base = bytes_per_token(gpt2, held)
    rows = [f"| {name} | GPT-2 (50,257) | {base:.2f} | 1.00x |"]
    for v in vocabs:
        try:
            tok = train_bpe(train, v)
        except GptforgeError as e:
            reached = re.search(r"stopped at ([\d,]*\d)", str(e))
            rows.append(f"| {name} | trained {v:,} | too little text (training stopped at "
                        f"{reached.group(1) if reached else '?'}) | |")
            continue
        bpt = bytes_per_token(tok, held)
        rows.append(f"| {name} | trained {v:,} | {bpt:.2f} | {bpt / base:.2f}x |")
    rows.append(f"| | ({mb:.2f} MB trained on, {held_mb:.2f} MB held out) | | |")
    return rows


# -----------------------------------------------------------------------------
# the largest vocabulary


def largest_rows() -> list[str]:
    from gptforge.tokenizer import MAX_VOCAB_SIZE, train_bpe

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))
             for _ in range(80_000)]
    docs = [" ".join(words[i:i + 100]) for i in range(0, len(words), 100)] * 2
    mb = sum(len(d) for d in docs) / 1e6
    s, tok = timed(train_bpe, docs, MAX_VOCAB_SIZE)
    ids = [x for d in docs[:50] for x in tok.encode(d)]
    ok = all(tok.decode(tok.encode(d)) == d for d in docs[:200])
    return [f"| {MAX_VOCAB_SIZE:,} | {mb:.1f} MB of random 8-letter words, each twice | {s:.1f} s "
            f"| largest id seen: {max(ids):,}; round trips: {'all exact' if ok else 'FAILED'} |"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--train-child":
        train_child(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
        return
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chinese", required=True, help="directory of poet.tang.*.json files")
    p.add_argument("--dir", default="/tmp/gptforge-bench-tokenizer", help="where files go")
    p.add_argument("--mb", type=float, default=100, help="corpus size in MB (default: 100)")
    p.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--encode-every", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, str(SRC))
    import tiktoken
    import tokenizers

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu()}; Python {platform.python_version()}, tokenizers "
          f"{tokenizers.__version__}, tiktoken {tiktoken.__version__}; "
          f"{time.strftime('%Y-%m-%d')}\n")
    corpus = d / "corpus.jsonl"
    made = build_corpus(corpus, args.chinese, args.mb)
    print("corpus: " + ", ".join(f"{k} {v:.1f} MB" for k, v in made.items())
          + f" = {sum(made.values()):.1f} MB\n")

    print("| vocabulary | training (s) | RSS after imports (MB) | peak RSS (MB) |")
    print("|---|---|---|---|")
    for v in args.vocab:
        r = train_in_child(corpus, v, d / f"bpe-{v}.json" if v == 8192 else None)
        print(f"| {v:,} | {r['seconds']:.1f} | {r['rss_before_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} |")
    print()

    from gptforge.tokenizer import GPT2Tokenizer, load_bpe

    gpt2 = GPT2Tokenizer()
    docs = list(read_docs(corpus))[::args.encode_every]
    bpe = load_bpe(d / "bpe-8192.json")
    print("| encoder | seconds | MB/s | tokens | speed vs tiktoken 1 thread |")
    print("|---|---|---|---|---|")
    print("\n".join(encode_rows(docs, bpe, gpt2)) + "\n")

    print("| held-out text | vocabulary | bytes per token | vs GPT-2 |")
    print("|---|---|---|---|")
    chinese = poems(args.chinese)
    print("\n".join(held_out_rows(
        "Quan Tang Shi", [x for i, x in enumerate(chinese) if i % 10], chinese[::10],
        [2048, 8192, 32768], gpt2)))
    text = SHAKESPEARE.read_text(encoding="utf-8")
    cut = text.index("\n\n", int(len(text) * 0.9))
    print("\n".join(held_out_rows("Tiny Shakespeare", paragraphs(text[:cut]),
                                  paragraphs(text[cut:]), [2048, 8192, 32768], gpt2)) + "\n")

    print("| vocabulary | corpus | training | check |")
    print("|---|---|---|---|")
    print("\n".join(largest_rows()))


if __name__ == "__main__":
    main()
