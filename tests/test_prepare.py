"""gptforge prepare on real corpora: formats, directories, parallel workers, shards, the
validation split, --max-tokens, resuming after a kill, bad input, memory and progress."""

import bz2
import gzip
import hashlib
import importlib
import json
import lzma
import os
import pty
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import run_cli

from gptforge.data import (
    TokenLoader,
    TokenStream,
    load_meta,
    load_split,
    prepare,
    read_shard,
    write_shard,
)
from gptforge.data.shards import file_sha256, shard_count
from gptforge.errors import GptforgeError
from gptforge.tokenizer import GPT2Tokenizer

P = importlib.import_module("gptforge.data.prepare")  # the module (data.prepare is the function)
T = importlib.import_module("gptforge.data.tokenize")
SOURCES = importlib.import_module("gptforge.data.sources")
SP = importlib.import_module("gptforge.data.splits")
SH = importlib.import_module("gptforge.data.shards")
sources = importlib.import_module("gptforge.data.sources")
SRC = str(Path(__file__).resolve().parents[1] / "src")
EOT = 50256

WORDS = ("the of and to in a is that it for on was with as he she they be at by this had not "
         "are but from or have an they which one you were her all their there been if more when "
         "naïve café déjà vu 🤖 日本語 über — \"quoted\" it's don't 1984 3.14").split()


def make_docs(n: int, seed: int = 0, empty: tuple[int, ...] = (3,)) -> list[str]:
    """n documents of random words, lines and paragraphs (0 to ~2,000 characters)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i in empty:
            docs.append("")
            continue
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 300))]
        for k in range(len(words)):
            if rng.random() < 0.08:
                words[k] += rng.choice([".\n", "\n\n", ",", "  ", "\t"])
        docs.append(" ".join(words))
    return docs


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_docs(60)


def joined(docs: list[str], tok: GPT2Tokenizer) -> list[int]:
    """The rule: one <|endoftext|> between consecutive non-empty documents."""
    out: list[int] = []
    for d in docs:
        if d:
            out += ([EOT] if out else []) + tok.encode(d)
    return out


def write_jsonl(path, docs, field="text", opener=open) -> str:
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")
    return str(path)


def write_parquet(path, docs, column="text", row_group_size=7) -> str:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": list(range(len(docs))), column: docs}), str(path),
                   row_group_size=row_group_size)
    return str(path)


def zst_open(path, mode, encoding):
    zstandard = pytest.importorskip("zstandard")
    return zstandard.open(path, mode, encoding=encoding)


def tokens_of(out, split="train") -> list[int]:
    return load_split(out, split)[:].tolist()


def files(out) -> dict[str, bytes]:
    """The shards of a prepared directory, and meta.json without what differs run to run."""
    found = {}
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name), "rb") as f:
            found[name] = f.read()
    meta = json.loads(found.pop("meta.json"))
    meta.pop("created")
    found["meta"] = json.dumps(meta, sort_keys=True).encode()
    return found


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("gptforge prepare: error: "), err
    return err


# -----------------------------------------------------------------------------
# inputs and formats


def test_every_format_gives_the_same_documents(tmp_path, docs, gpt2):
    expected = joined(docs, gpt2)
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / ".cache").mkdir()
    for i, doc in enumerate(docs):  # 00.txt .. 29.md at the top, then sub/30.txt ..
        name = f"{i:02d}.{'md' if i % 3 else 'txt'}"
        (d / "sub" / name if i >= 30 else d / name).write_text(doc, encoding="utf-8")
    (d / ".hidden.txt").write_text("never read", encoding="utf-8")
    (d / ".cache" / "x.txt").write_text("never read", encoding="utf-8")
    inputs = {
        "a directory of text files": [str(d)],
        "jsonl": [write_jsonl(tmp_path / "d.jsonl", docs)],
        "json lines named .json": [write_jsonl(tmp_path / "d.json", docs)],
        "jsonl.gz": [write_jsonl(tmp_path / "d.jsonl.gz", docs, opener=gzip.open)],
        "jsonl.bz2": [write_jsonl(tmp_path / "d.jsonl.bz2", docs, opener=bz2.open)],
        "jsonl.xz": [write_jsonl(tmp_path / "d.jsonl.xz", docs, opener=lzma.open)],
        "jsonl.zst": [write_jsonl(tmp_path / "d.jsonl.zst", docs, opener=zst_open)],
        "parquet in row groups of 7": [write_parquet(tmp_path / "d.parquet", docs)],
        "two files and a glob": [write_jsonl(tmp_path / "p1.jsonl", docs[:20]),
                                 str(tmp_path / "g*.jsonl")],
    }
    write_jsonl(tmp_path / "g1.jsonl", docs[20:45])
    write_jsonl(tmp_path / "g2.jsonl", docs[45:])
    for what, paths in inputs.items():
        out = tmp_path / "out" / what
        meta = prepare(paths, out, val_fraction=0.0, progress=False, shard_tokens=3000)
        assert tokens_of(out) == expected, what
        assert meta["documents"] == {"read": 60, "empty_skipped": 1, "train": 59, "val": 0}, what
        assert all(len(s["sha256"]) == 64 for s in meta["sources"]), what
    names = [s["name"] for s in load_meta(tmp_path / "out" / "a directory of text files")["sources"]]
    assert names == [str(d / f"{i:02d}.{'md' if i % 3 else 'txt'}") for i in range(30)] + [
        str(d / "sub" / f"{i:02d}.{'md' if i % 3 else 'txt'}") for i in range(30, 60)]


def test_compressed_text_and_forced_format(tmp_path, gpt2, docs):
    text = "\n\n".join(docs)
    with gzip.open(tmp_path / "book.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    prepare([str(tmp_path / "book.txt.gz")], tmp_path / "gz", val_fraction=0, progress=False)
    assert tokens_of(tmp_path / "gz") == gpt2.encode(text)
    # an extension that says nothing: refused, naming what is supported, unless --format says
    write_jsonl(tmp_path / "dump.data", docs)
    with pytest.raises(GptforgeError, match=r"unknown file type '\.data'; supported: .*--format"):
        prepare([str(tmp_path / "dump.data")], tmp_path / "x", progress=False)
    prepare([str(tmp_path / "dump.data")], tmp_path / "forced", format="jsonl", val_fraction=0,
            progress=False)
    assert tokens_of(tmp_path / "forced") == joined(docs, gpt2)


def test_text_field(tmp_path, gpt2, docs):
    path = write_jsonl(tmp_path / "d.jsonl", docs, field="content")
    prepare([path], tmp_path / "out", text_field="content", val_fraction=0, progress=False)
    assert tokens_of(tmp_path / "out") == joined(docs, gpt2)
    pq_path = write_parquet(tmp_path / "d.parquet", docs, column="body")
    prepare([pq_path], tmp_path / "pq", text_field="body", val_fraction=0, progress=False)
    assert tokens_of(tmp_path / "pq") == joined(docs, gpt2)


def test_long_documents_are_cut_at_safe_places(tmp_path, gpt2, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 500)  # every document is many pieces
    docs = make_docs(12, seed=5, empty=())
    docs[4] = "x" * 3000 + " tail"  # no whitespace in the first 3000 characters: stays whole
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    prepare([path], tmp_path / "out", val_fraction=0, progress=False)
    assert tokens_of(tmp_path / "out") == joined(docs, gpt2)


# -----------------------------------------------------------------------------
# workers, shards, the loader across shards


def test_any_number_of_workers_gives_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(T, "BATCH_CHARS", 4000)  # ~50 tasks
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(200, seed=1))
    results = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        prepare([path], out, workers=workers, shard_tokens=7000, progress=False)
        results.append(files(out))
    assert len(results[0]) > 5 and results[0] == results[1] == results[2]


def test_shards_are_listed_with_counts_and_sha256(tmp_path, gpt2):
    docs = make_docs(120, seed=2)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    meta = prepare([path], tmp_path / "out", shard_tokens=2500, val_fraction=0.2, progress=False)
    for split in ("train", "val"):
        entries = meta["shards"][split]
        assert [e["file"] for e in entries] == [f"{split}-{i:06d}.bin" for i in range(len(entries))]
        assert all(e["tokens"] == 2500 for e in entries[:-1]) and 0 < entries[-1]["tokens"] <= 2500
        assert sum(e["tokens"] for e in entries) == meta[f"{split}_tokens"]
        for e in entries:
            path = tmp_path / "out" / e["file"]
            assert shard_count(path) == e["tokens"] and file_sha256(path) == e["sha256"]
        stream = load_split(tmp_path / "out", split)
        whole = np.concatenate([read_shard(tmp_path / "out" / e["file"]) for e in entries])
        assert isinstance(stream, TokenStream) and np.array_equal(stream[:], whole)


def test_token_stream_reads_across_shards(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1000, dtype=np.uint16)
    cuts = [0, 137, 138, 500, 1000]  # shards of 137, 1, 362 and 500 tokens
    shards = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        write_shard(tmp_path / f"s{i}.bin", tokens[a:b])
        shards.append(read_shard(tmp_path / f"s{i}.bin"))
    stream = TokenStream(shards, "test")
    assert len(stream) == 1000
    for a, b in [(0, 1000), (100, 140), (137, 138), (130, 600), (999, 1000), (5, 5), (-10, None)]:
        assert np.array_equal(stream[a:b], tokens[a:b])
    idx = np.random.default_rng(1).integers(0, 1000, size=(7, 33))
    assert np.array_equal(stream[idx], tokens[idx]) and stream[137] == tokens[137]
    assert stream[-1] == tokens[-1]
    with pytest.raises(IndexError):
        stream[np.array([1000])]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[np.ndarray, TokenStream]:
    """The same 3,001 tokens as one array and as a stream over 5 uneven shards."""
    d = tmp_path_factory.mktemp("shards")
    tokens = np.random.default_rng(3).integers(0, 50257, size=3001, dtype=np.uint16)
    cuts = [0, 400, 401, 1500, 2999, 3001]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        write_shard(d / f"s{i}.bin", tokens[a:b])
    return tokens, TokenStream([read_shard(d / f"s{i}.bin") for i in range(5)], "sharded")


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_loader_over_shards_equals_loader_over_one_array(sharded, mode):
    tokens, stream = sharded
    B, T, W = 4, 64, 2
    whole = TokenLoader(tokens, B, T, mode=mode, seed=9)
    ranks = [TokenLoader(stream, B, T, mode=mode, seed=9, rank=r, world_size=W) for r in range(W)]
    for step in range(30):  # sequential wraps after 11 batches
        if step == 13:  # resume every rank from its state, as a restarted run does
            states = [json.loads(json.dumps(r.state_dict())) for r in ranks]
            ranks = [TokenLoader(stream, B, T, mode=mode, seed=9, rank=r, world_size=W)
                     for r in range(W)]
            for r, s in zip(ranks, states):
                r.load_state_dict(s)
        for r in ranks:
            (x, y), (wx, wy) = r.next_batch(), whole.next_batch()
            assert torch.equal(x, wx) and torch.equal(y, wy)


def test_random_windows_cover_every_shard(sharded):
    tokens, stream = sharded
    loader = TokenLoader(stream, 16, 8, mode="random", seed=0)
    starts = np.concatenate([loader._random_starts(k * 16) for k in range(100)])
    # uniform over the whole stream: each of the 4 big shards gets its share of 1,600 windows
    for a, b in [(0, 400), (401, 1500), (1500, 2999)]:
        share = ((starts >= a) & (starts < b)).mean()
        assert abs(share - (b - a) / (3001 - 8)) < 0.05


def test_directories_of_the_unsharded_format_still_load(tmp_path):
    """A directory written before sharding: train.bin, val.bin, meta.json format 1."""
    tokens = np.arange(300, dtype=np.uint16)
    write_shard(tmp_path / "train.bin", tokens[:270])
    write_shard(tmp_path / "val.bin", tokens[270:])
    meta = {"format_version": 1, "tokenizer": {"name": "gpt2"}, "vocab_size": 50257,
            "eot_id": EOT, "train_tokens": 270, "val_tokens": 30, "val_fraction": 0.1}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    train, val = load_split(tmp_path, "train"), load_split(tmp_path, "val")
    assert np.array_equal(train[:], tokens[:270]) and np.array_equal(val[:], tokens[270:])
    x, _ = TokenLoader(train, 2, 8).next_batch()
    assert x.flatten().tolist() == list(range(16))
    # replacing it with a new prepare needs --force, and removes the old files
    text = tmp_path / "t.txt"
    text.write_text("some new text " * 50)
    with pytest.raises(GptforgeError, match="older gptforge"):
        prepare([str(text)], tmp_path, progress=False)
    prepare([str(text)], tmp_path, force=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "t.txt", "train-000000.bin",
                                            "val-000000.bin"]


# -----------------------------------------------------------------------------
# the validation split and --max-tokens


def _is_val(position: int, seed: int, fraction: float) -> bool:
    """The documented rule, written out independently of prepare's code."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def test_validation_takes_whole_documents_by_seeded_hash(tmp_path, gpt2):
    docs = make_docs(300, seed=4, empty=(3, 77))
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    picks = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        meta = prepare([path], out, val_fraction=0.25, seed=seed, shard_tokens=4000,
                       progress=False)
        assert meta["val_split"]["rule"] == "documents" and meta["val_split"]["seed"] == seed
        val_docs = [d for i, d in enumerate(docs) if _is_val(i, seed, 0.25)]
        train_docs = [d for i, d in enumerate(docs) if not _is_val(i, seed, 0.25)]
        assert tokens_of(out, "train") == joined(train_docs, gpt2)
        assert tokens_of(out, "val") == joined(val_docs, gpt2)
        assert meta["documents"]["val"] == sum(1 for d in val_docs if d)
        assert 50 < meta["documents"]["val"] < 100
        picks[seed] = [i for i in range(300) if _is_val(i, seed, 0.25)]
    assert picks[0] != picks[1]


@pytest.mark.parametrize("shard_tokens", [1500, 10**9])
def test_batches_written_whole_or_piece_by_piece_give_the_same_splits(tmp_path, gpt2, monkeypatch,
                                                                      shard_tokens):
    """Where no shard fills within a batch, each split gets the batch in one append; where one
    does, the pieces go one at a time. Both give the documented splits, empty documents, split
    documents (long ones come in several pieces) and file changes included."""
    monkeypatch.setattr(T, "BATCH_CHARS", 3000)  # many batches
    monkeypatch.setattr(SOURCES, "PIECE_CHARS", 700)  # longer documents come in several pieces
    docs = make_docs(160, seed=9, empty=(0, 5, 6, 90))
    paths = [write_jsonl(tmp_path / "a.jsonl", docs[:70]), write_jsonl(tmp_path / "b.jsonl", docs[70:])]
    one_at_a_time = []
    write = SP.SplitWriter.write
    monkeypatch.setattr(SP.SplitWriter, "write",
                        lambda self, *a: one_at_a_time.append(1) or write(self, *a))
    later_pieces = []
    batches = SP.batches
    monkeypatch.setattr(SP, "batches", lambda pieces: batches(
        p for p in pieces if p[1].first or not later_pieces.append(p)))
    meta = prepare(paths, tmp_path / "out", val_fraction=0.3, seed=2, shard_tokens=shard_tokens,
                   workers=1, progress=False)
    assert (len(one_at_a_time) > 0) == (shard_tokens == 1500) and len(later_pieces) > 20
    val = [_is_val(i, 2, 0.3) for i in range(len(docs))]
    assert tokens_of(tmp_path / "out", "train") == joined([d for d, v in zip(docs, val) if not v], gpt2)
    assert tokens_of(tmp_path / "out", "val") == joined([d for d, v in zip(docs, val) if v], gpt2)
    assert meta["documents"]["read"] == 160 and meta["documents"]["empty_skipped"] == 4
    assert meta["documents"]["val"] == sum(1 for d, v in zip(docs, val) if v and d)


def test_json_lines_read_as_the_standard_library_reads_them(tmp_path):
    """orjson parses the lines; a line it refuses (a lone surrogate, NaN, an infinite number, an
    integer beyond 64 bits) goes to json, so every line reads exactly as json.loads reads it."""
    lines = ['{"text": "a", "text": "b"}', '{"text": "x \\ud800 y"}', '{"n": NaN, "text": "c"}',
             '{"n": 123456789012345678901234567890, "text": "d"}', '{"text": "\\ud83d\\ude00 e"}',
             '{"n": 1e400, "text": "f\\u0000"}', '{"text": "g\\n\\t h"}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (source,) = SOURCES.expand_inputs([str(path)])
    got = [p.text for p in SOURCES.read_jsonl(source, SOURCES.ReadOptions())]
    assert got == [json.loads(line)["text"] for line in lines]
    assert "\ud800" in got[1] and got[4] == "\U0001f600 e"


def test_many_text_files_split_by_document(tmp_path, gpt2, monkeypatch):
    monkeypatch.setattr(SP, "DOC_SPLIT_MIN_FILES", 5)  # 100 in real use
    docs = make_docs(8, seed=6, empty=())
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d, encoding="utf-8")
    meta = prepare([str(tmp_path)], tmp_path / "out", val_fraction=0.5, progress=False)
    assert meta["val_split"]["rule"] == "documents"
    val_docs = [d for i, d in enumerate(docs) if _is_val(i, 0, 0.5)]
    assert tokens_of(tmp_path / "out", "val") == joined(val_docs, gpt2)


def test_max_tokens_stops_early(tmp_path, gpt2, docs):
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    meta = prepare([path], tmp_path / "out", val_fraction=0, max_tokens=1234, shard_tokens=500,
                   progress=False)
    assert tokens_of(tmp_path / "out") == joined(docs, gpt2)[:1234]
    assert meta["train_tokens"] == 1234 and meta["stopped_at_max_tokens"] is True
    assert meta["sources"][0]["sha256"] is None  # not read to its end
    assert [e["tokens"] for e in meta["shards"]["train"]] == [500, 500, 234]


# -----------------------------------------------------------------------------
# resuming


def test_a_shard_being_written_never_reads_as_one(tmp_path):
    w = SH.ShardWriter(tmp_path / "s.bin", str(tmp_path / "s.bin.partial"))
    w.write(np.arange(100))
    w.flush()
    with pytest.raises(GptforgeError, match="header promises 0 tokens"):
        read_shard(tmp_path / "s.bin.partial")  # what a kill leaves: the header says 0
    w.close()
    resumed = SH.ShardWriter(tmp_path / "s.bin", str(tmp_path / "s.bin.partial"), keep=60)
    resumed.write(np.arange(60, 70))
    resumed.commit()
    assert read_shard(tmp_path / "s.bin").tolist() == list(range(70))
    assert os.listdir(tmp_path) == ["s.bin"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it (finally blocks still run, see the real kill below)."""


def kill_at_every_step(monkeypatch, run, want, only=None) -> int:
    """Kill ``run`` at its k-th file operation for every k (or those ``only(total)`` lists),
    re-run it, compare with ``want``."""
    calls = {"n": 0, "at": 0}
    shards_mod = importlib.import_module("gptforge.data.shards")
    real_write = shards_mod.ShardWriter.write
    for name in ("replace", "fsync", "remove"):
        real = getattr(os, name)

        def hooked(*a, _real=real, **k):
            calls["n"] += 1
            if calls["n"] == calls["at"]:
                raise Killed
            return _real(*a, **k)

        monkeypatch.setattr(os, name, hooked)

    def write(self, tokens):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise Killed
        real_write(self, tokens)

    monkeypatch.setattr(shards_mod.ShardWriter, "write", write)
    out = run(at=None)
    total = calls["n"]
    assert files(out) == want
    for at in range(1, total + 1) if only is None else only(total):
        shutil.rmtree(out)
        calls["n"], calls["at"] = 0, at
        with pytest.raises(Killed):
            run(at=at)
        calls["at"] = 0
        if not os.path.exists(out / "meta.json"):  # nothing that looks complete
            with pytest.raises(GptforgeError, match="no prepared data"):
                load_split(out, "train")
        run(at=None)
        assert files(out) == want, f"killed at file operation {at} of {total}"
        assert not (out / ".prepare").exists()
    return total


@pytest.mark.parametrize("rule", ["documents", "tail"])
def test_killed_anywhere_then_rerun_gives_the_same_bytes(tmp_path, monkeypatch, rule):
    docs = make_docs(40, seed=7)
    if rule == "documents":
        inputs = [write_jsonl(tmp_path / "d.jsonl", docs)]
    else:
        (tmp_path / "book.txt").write_text("\n".join(docs), encoding="utf-8")
        inputs = [str(tmp_path / "book.txt")]
        monkeypatch.setattr(sources, "CHUNK_BYTES", 3000)  # many pieces in the one document
    kwargs = dict(val_fraction=0.3, shard_tokens=1500, workers=1, progress=False)
    prepare(inputs, tmp_path / "ref", **kwargs)
    want = files(tmp_path / "ref")
    assert len(want) > 6
    total = kill_at_every_step(monkeypatch, lambda at: prepare(inputs, tmp_path / "out", **kwargs)
                               and tmp_path / "out", want)
    assert total > 20


def test_sigkill_mid_run_then_rerun_gives_the_same_bytes(tmp_path):
    """A real SIGKILL of a `gptforge prepare` process with 2 workers, then the same command."""
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(6000, seed=8))  # ~5 MB, 1.5M tokens
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gptforge", "prepare", path, "--out", str(out),
           "--shard-tokens", "20000", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list((out / ".prepare").glob("train-*.bin"))) < 3 and time.time() < deadline:
        time.sleep(0.005)
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == proc.pid]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "meta.json").exists()
    done = len(list((out / ".prepare").glob("train-*.bin")))
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip().endswith("resumed") and rerun.stderr == ""
    prepare([path], tmp_path / "ref", shard_tokens=20000, workers=1, progress=False)
    assert files(out) == files(tmp_path / "ref") and done >= 3
    assert workers
    for pid in workers:  # the killed run's workers noticed and left
        for _ in range(50):
            if _gone(pid):
                break
            time.sleep(0.1)
        assert _gone(pid)


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except OSError:
        return True


def test_other_arguments_are_refused_unless_force(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(40, seed=9))
    out = tmp_path / "out"
    base = ["prepare", path, "--out", str(out), "--shard-tokens", "1500", "--workers", "1"]
    # an unfinished run: killed when its second shard is finished
    real_replace = os.replace
    seen = []

    def replace(a, b):
        seen.append(b)
        if sum(".bin" in str(x) for x in seen) == 2:
            raise Killed
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        run_cli(*base)
    monkeypatch.setattr(os, "replace", real_replace)
    capsys.readouterr()
    assert run_cli(*base, "--val-fraction", "0.2") == 2
    err = one_line(capsys.readouterr().err)
    assert "unfinished prepare with other arguments (val_fraction 0.1 then, 0.2 now)" in err
    assert "--force" in err and (out / ".prepare" / "state.json").exists()
    assert run_cli(*base) == 0  # the same command finishes it
    assert capsys.readouterr().out.strip().endswith("resumed")
    before = files(out)
    # a finished result: the same command does nothing; other arguments need --force
    assert run_cli(*base) == 0 and "already holds this data" in capsys.readouterr().out
    assert run_cli(*base, "--seed", "5") == 2
    assert "other arguments (seed 0 then, 5 now)" in one_line(capsys.readouterr().err)
    os.utime(path, ns=(1, 1))  # an input that changed since
    assert run_cli(*base) == 2
    assert f"input {path} has changed since" in one_line(capsys.readouterr().err)
    assert files(out) == before
    assert run_cli(*base, "--force") == 0
    assert files(out)["train-000000.bin"] == before["train-000000.bin"]


# -----------------------------------------------------------------------------
# bad input: one line naming the file and the place, exit 2, nothing left


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)  # the same bytes in every process (test ids)


def _zst(data: bytes) -> bytes:
    return pytest.importorskip("zstandard").ZstdCompressor().compress(data)


GOOD = b'{"text": "fine"}\n' * 50


@pytest.mark.parametrize(
    "name, content, extra, needles",
    [
        ("d.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c",\n', [],
         ["d.jsonl: line 3 is not valid JSON (", "column"]),
        ("d.jsonl", b'{"text": "a"}\n\n{"body": "b", "id": 2}\n', [],
         ["line 3 has no 'text' field (its fields: 'body', 'id')", "--text-field"]),
        ("d.jsonl", b'{"text": "a"}\n{"text": 5}\n', [], ["line 2: field 'text' is a number"]),
        ("d.jsonl", b'{"text": "a"}\n["text"]\n', [], ["line 2 is an array, not a JSON object"]),
        ("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', [],
         ["line 2 is not valid UTF-8 (byte 0xe9 at byte offset 28)", "--errors replace"]),
        ("d.txt", b"fine text \xff more", [], ["d.txt is not valid UTF-8 (byte 0xff at byte offset 10)"]),
        ("d.jsonl.gz", _gz(GOOD)[:-30], [], ["d.jsonl.gz is a truncated or corrupt gzip file"]),
        ("d.jsonl.gz", b"not gzip at all", [], ["truncated or corrupt gzip file"]),
        ("d.txt.bz2", bz2.compress(b"text " * 1000)[:-20], [], ["truncated or corrupt bz2 file"]),
        ("d.txt.xz", lzma.compress(b"text " * 1000)[:-20], [], ["truncated or corrupt xz file"]),
        ("d.jsonl.zst", None, [], ["truncated or corrupt zstd file"]),
        ("d.parquet", b"PAR1 this is no parquet file", [], ["d.parquet is not a readable Parquet file"]),
        ("d.csv", b"a,b\n", [], ["unknown file type '.csv'", ".jsonl", "--format"]),
        ("d.jsonl", GOOD, ["--workers", "0"], ["--workers must be 1 or more"]),
        ("d.jsonl", GOOD, ["--shard-tokens", "0"], ["--shard-tokens must be 1 or more"]),
        ("d.jsonl", GOOD, ["--max-tokens", "0"], ["--max-tokens must be 1 or more"]),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, name, content, extra, needles):
    if content is None:
        content = _zst(GOOD)[:-5]
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "deep" / "out"
    assert run_cli("prepare", str(tmp_path / name), "--out", str(out), *extra) == 2
    err = one_line(capsys.readouterr().err)
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "deep").exists()


def test_bad_parquet_column_and_values(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["a", "b"], "id": [1, 2]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c.parquet")
    for name, needle in [
        ("a.parquet", "a.parquet has no column 'text' (its columns: 'body', 'id'): pass --text-field"),
        ("b.parquet", "b.parquet: row 1 has no text (null in column 'text')"),
        ("c.parquet", "c.parquet: column 'text' holds int64, not text"),
    ]:
        assert run_cli("prepare", str(tmp_path / name), "--out", str(tmp_path / "out")) == 2
        assert needle in one_line(capsys.readouterr().err)
        assert not (tmp_path / "out").exists()


def test_bad_inputs_paths(tmp_path, capsys):
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden.txt").write_text("x")
    for arg, needle in [
        (str(tmp_path / "empty"), "has no files to read (hidden files are skipped)"),
        (str(tmp_path / "*.jsonl"), "matches no files"),
        (str(tmp_path / "nope.txt"), "does not exist"),
    ]:
        assert run_cli("prepare", arg, "--out", str(tmp_path / "out")) == 2
        assert needle in one_line(capsys.readouterr().err)
        assert not (tmp_path / "out").exists()


def test_a_late_bad_line_leaves_older_data_as_it_was(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(30))
    out = tmp_path / "out"
    assert run_cli("prepare", good, "--out", str(out), "--shard-tokens", "500") == 0
    before = files(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(Path(good).read_bytes() + b"{broken\n")
    assert run_cli("prepare", str(bad), "--out", str(out), "--shard-tokens", "500",
                   "--force") == 2
    assert "bad.jsonl: line 31 is not valid JSON" in one_line(capsys.readouterr().err)
    assert files(out) == before and not (out / ".prepare").exists()


def test_unreadable_file(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(5))

    def denied(file, *a, **k):
        if str(file) == path:
            raise PermissionError(13, "Permission denied")
        return open(file, *a, **k)

    monkeypatch.setattr(sources, "open", denied, raising=False)  # root may read anything
    assert run_cli("prepare", path, "--out", str(tmp_path / "out")) == 2
    assert f"cannot read {path} (Permission denied)" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_the_output_inside_an_input_directory_is_not_read(tmp_path, gpt2):
    docs = make_docs(5, empty=())
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d, encoding="utf-8")
    prepare([str(tmp_path)], tmp_path / "tokens", val_fraction=0, progress=False)
    again = prepare([str(tmp_path)], tmp_path / "tokens", val_fraction=0, progress=False)
    assert again["run"]["status"] == "unchanged" and len(again["sources"]) == 5
    assert tokens_of(tmp_path / "tokens") == joined(docs, gpt2)
    os.remove(tmp_path / "tokens" / "train-000000.bin")
    with pytest.raises(GptforgeError, match="missing or not what meta.json lists: pass --force"):
        prepare([str(tmp_path)], tmp_path / "tokens", val_fraction=0, progress=False)


def test_missing_extras_say_what_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "b.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    for name, what in [("a.parquet", "Parquet files needs pyarrow"), ("b.jsonl.zst", "zstandard")]:
        assert run_cli("prepare", str(tmp_path / name), "--out", str(tmp_path / "out")) == 2
        err = one_line(capsys.readouterr().err)
        assert what in err and "pip install 'gptforge[data]'" in err


# -----------------------------------------------------------------------------
# memory and progress

MEMORY_SCRIPT = """
import importlib, json, resource, sys
P = importlib.import_module("gptforge.data.prepare")
S = importlib.import_module("gptforge.data.sources")
T = importlib.import_module("gptforge.data.tokenize")
S.CHUNK_BYTES = S.PIECE_CHARS = T.BATCH_CHARS = 64 * 1024
P.PARALLEL_MIN_BYTES = 0
P.get_tokenizer("gpt2")
# The peak so far is the imports' (it varies from run to run by tens of MB): start again from here.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
P.prepare(sys.argv[1:-1], sys.argv[-1], workers=2, shard_tokens=200_000, progress=False)
with open("/proc/self/status") as f:
    main = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps([main, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc")
def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS (of prepare and of its workers) preparing 0.6 MB and 9.9 MB corpora with small
    chunks: holding the corpus or its tokens would grow it by 10 MB or more (an unbounded queue
    of tasks: +26 MB)."""
    peaks = []
    for scale in (1, 16):
        d = tmp_path / f"c{scale}"
        d.mkdir()
        docs = make_docs(400, seed=10)
        text = "\n".join(docs)
        with open(d / "a.jsonl", "w", encoding="utf-8") as f:
            for _ in range(scale):
                for doc in docs:
                    f.write(json.dumps({"text": doc}) + "\n")
        (d / "b.txt").write_text(text * scale, encoding="utf-8")  # one long document
        result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(d / "a.jsonl"),
                                 str(d / "b.txt"), str(d / "out")],
                                env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
        peaks.append(json.loads(result.stdout))
        assert load_meta(d / "out")["train_tokens"] > scale * 150_000
    (main_small, workers_small), (main_big, workers_big) = peaks  # KiB
    assert main_big - main_small < 8 * 1024 and workers_big - workers_small < 8 * 1024, peaks
    assert main_big < 1024 * 1024 and workers_big < 1024 * 1024


def test_a_pipe_gets_one_summary_line(tmp_path, capsys, docs):
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    assert run_cli("prepare", path, "--out", str(tmp_path / "out")) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.count("\n") == 1
    assert captured.out.startswith(f"wrote {tmp_path / 'out'}: ")
    assert "train tokens (1 shards)" in captured.out and "from 60 documents (1 empty, skipped)" in captured.out
    assert "MB/s" in captured.out


def test_a_terminal_gets_a_progress_bar(tmp_path, docs):
    path = write_jsonl(tmp_path / "d.jsonl", docs * 20)
    primary, secondary = pty.openpty()
    code = "from gptforge.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "prepare", path, "--out",
                             str(tmp_path / "out")], stderr=secondary, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200"})
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 60)
        try:
            chunk = os.read(primary, 4096) if ready else b""
        except OSError:  # the other end closed
            chunk = b""
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    bar = seen.decode()
    assert "prepare 100%" in bar and "MB/s ETA 00:00" in bar
    assert "k tokens, 1.20k documents" in bar
    assert out.decode().startswith("wrote ")
