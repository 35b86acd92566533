"""gptforge prepare --tokenizer bpe: a byte-level BPE trained on the corpus (every format, any
--workers, a deterministic sample, resumable), reused from a file, a prepared directory or a run,
stored in DIR and recorded in meta.json; uint32 shards for a vocabulary past 65,536."""

import gzip
import hashlib
import importlib
import json
import os
import shutil

import pytest
from test_bpe import wide_tokenizer_file
from test_prepare import files, kill_at_every_step, make_docs, one_line, write_jsonl, write_parquet
from test_train import run_cli

from gptforge.data import load_meta, load_split, prepare
from gptforge.data.shards import read_shard
from gptforge.errors import GptforgeError
from gptforge.tokenizer import CHATML_TEMPLATE
from gptforge.tokenizer import BPE_FILE, load_bpe, train_bpe

P = importlib.import_module("gptforge.data.prepare")
T = importlib.import_module("gptforge.data.tokenize")
V = importlib.import_module("gptforge.data.vocab")
VOCAB = 300
BPE = dict(tokenizer="bpe", vocab_size=VOCAB, progress=False)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_docs(120, seed=3)


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory, docs):
    """The documents as JSON lines, prepared with a trained BPE (one worker)."""
    root = tmp_path_factory.mktemp("bpe")
    path = write_jsonl(root / "d.jsonl", docs)
    prepare([path], root / "out", workers=1, **BPE)
    return root


def test_trains_stores_records_and_tokenizes(jsonl_dir, docs):
    out = jsonl_dir / "out"
    meta = load_meta(out)
    data = (out / BPE_FILE).read_bytes()
    assert meta["tokenizer"] == {"name": "bpe", "vocab_size": VOCAB, "eot_id": VOCAB - 1,
                                 "file": BPE_FILE, "sha256": hashlib.sha256(data).hexdigest(),
                                 "chat_template": CHATML_TEMPLATE}
    assert meta["vocab_size"] == VOCAB and meta["eot_id"] == VOCAB - 1
    opts = meta["prepare_options"]
    assert opts["tokenizer"] == "bpe" and opts["vocab_size"] == VOCAB
    assert opts["tokenizer_sample_mb"] == 100 and "tokenizer_sha256" not in opts
    # the whole corpus (under the sample size) is what it was trained on
    assert data == train_bpe([d for d in docs if d], VOCAB).file_bytes()
    tok = load_bpe(out)
    train = load_split(out, "train")[:].tolist()
    first = train[: train.index(VOCAB - 1)]  # the first document, up to the separator
    assert tok.decode(first) in docs
    val = load_split(out, "val")
    assert len(val) and max(train) < VOCAB
    assert read_shard(out / meta["shards"]["train"][0]["file"]).dtype.itemsize == 2


def test_every_format_and_any_workers_give_the_same_bytes(tmp_path, jsonl_dir, docs, monkeypatch):
    monkeypatch.setattr(P, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(T, "BATCH_CHARS", 4000)
    want = files(jsonl_dir / "out")
    want.pop("meta")  # it names the inputs
    gz = tmp_path / "d.jsonl.gz"
    write_jsonl(gz, docs, opener=gzip.open)
    inputs = {"gz": str(gz), "parquet": write_parquet(tmp_path / "d.parquet", docs)}
    for name, path in inputs.items():
        prepare([path], tmp_path / name, workers=2, **BPE)
        got = files(tmp_path / name)
        got.pop("meta")
        assert got == want, name
    # text files: another val rule, but the same documents train the same tokenizer
    text = tmp_path / "texts"
    text.mkdir()
    for i, d in enumerate(docs):
        (text / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    prepare([str(text)], tmp_path / "t", workers=2, **BPE)
    assert (tmp_path / "t" / BPE_FILE).read_bytes() == want[BPE_FILE]


def test_a_large_corpus_trains_on_a_deterministic_sample(tmp_path, docs):
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    size_mb = os.path.getsize(path) / 1e6
    kw = dict(BPE, tokenizer_sample_mb=size_mb / 3, vocab_size=280)
    prepare([path], tmp_path / "a", **kw)
    prepare([path], tmp_path / "b", **kw)
    a, b = (tmp_path / "a" / BPE_FILE).read_bytes(), (tmp_path / "b" / BPE_FILE).read_bytes()
    assert a == b and a != train_bpe(docs, 280).file_bytes()

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    opt = P.Options("bpe", vocab_size=280, tokenizer_sample_mb=size_mb / 3)
    srcs = P.expand_inputs([path])
    sample = list(V.sample_texts(srcs, opt, Bar()))
    assert 0.15 < len(sample) / len(docs) < 0.55 and set(sample) < set(docs)
    assert a == train_bpe(sample, 280).file_bytes()
    with pytest.raises(GptforgeError, match="or a larger --tokenizer-sample-mb"):
        prepare([path], tmp_path / "c", **dict(kw, vocab_size=2000))
    assert not (tmp_path / "c").exists()


def test_killed_anywhere_then_rerun_gives_the_same_bytes(tmp_path, monkeypatch):
    inputs = [write_jsonl(tmp_path / "d.jsonl", make_docs(12, seed=7))]
    kw = dict(BPE, vocab_size=270, val_fraction=0.3, shard_tokens=2000, workers=1)
    prepare(inputs, tmp_path / "ref", **kw)
    want = files(tmp_path / "ref")
    assert BPE_FILE in want and len(want) > 4
    # What the tokenizer adds: staging its file (the first operations) and publishing it (the
    # last ones); test_prepare.py kills the gpt2 path at every step in between.
    total = kill_at_every_step(monkeypatch, lambda at: prepare(inputs, tmp_path / "out", **kw)
                               and tmp_path / "out", want,
                               only=lambda n: [*range(1, 5), n // 2, *range(n - 6, n + 1)])
    assert total > 12


def test_reuse_a_file_a_prepared_directory_or_a_run(tmp_path, jsonl_dir, docs):
    src = jsonl_dir / "out"
    data = (src / BPE_FILE).read_bytes()
    other = write_jsonl(tmp_path / "other.jsonl", make_docs(40, seed=9))
    run = tmp_path / "run" / "checkpoints" / "step_0000001"  # what a checkpoint keeps
    run.mkdir(parents=True)
    (run.parent / "latest").write_text("step_0000001\n")
    (run / "config.json").write_text(json.dumps({"tokenizer": load_meta(src)["tokenizer"]}))
    (run / BPE_FILE).write_bytes(data)
    for i, given in enumerate([src, src / BPE_FILE, tmp_path / "run", run]):
        out = tmp_path / f"o{i}"
        meta = prepare([other], out, tokenizer=str(given), progress=False)
        assert (out / BPE_FILE).read_bytes() == data
        assert meta["tokenizer"] == load_meta(src)["tokenizer"]
        assert meta["prepare_options"]["tokenizer_sha256"] == meta["tokenizer"]["sha256"]
    again = prepare([other], tmp_path / "o1", tokenizer=str(src), progress=False)
    assert again["run"]["status"] == "unchanged"
    # another tokenizer into that directory is other data
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / BPE_FILE).write_bytes(train_bpe(docs, 290).file_bytes())
    with pytest.raises(GptforgeError, match="other arguments .*tokenizer_sha256"):
        prepare([other], tmp_path / "o1", tokenizer=str(tmp_path / "x"), progress=False)
    # a run's checkpoint whose tokenizer.json is not the recorded one
    (run / BPE_FILE).write_bytes(train_bpe(docs, 290).file_bytes())
    with pytest.raises(GptforgeError, match="is not the tokenizer recorded"):
        prepare([other], tmp_path / "o9", tokenizer=str(run), progress=False)


def test_bad_tokenizer_files_are_one_line_and_leave_dir_as_it_was(tmp_path, jsonl_dir, capsys):
    src = str(jsonl_dir / "d.jsonl")
    out = tmp_path / "out"
    shutil.copytree(jsonl_dir / "out", out)
    before = files(out)
    bad = {"corrupt.json": b'{"model": {"type": "BPE", "vocab": ', "plain.json": b"[1, 2]",
           "binary.json": b"\x00\xff\xfe", "empty.json": b""}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        assert run_cli("prepare", src, "--out", str(out), "--tokenizer", str(tmp_path / name),
                       "--force") == 2
        err = one_line(capsys.readouterr().err)
        assert name in err and "tokenizer" in err
        assert files(out) == before
    for args, needle in [(["--tokenizer", "bpe", "--vocab-size", "200000"], "choose 259"),
                         (["--tokenizer", "char", "--vocab-size", "300"], "leave --vocab-size"),
                         (["--tokenizer", "bpe", "--vocab-size", "60000"], "training stopped at")]:
        assert run_cli("prepare", src, "--out", str(out), "--force", *args) == 2
        assert needle in one_line(capsys.readouterr().err)
        assert files(out) == before


def test_help_names_the_range_and_the_sample(capsys):
    assert run_cli("prepare", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "259" in text and "131,072" in text and "--tokenizer-sample-mb" in text
    assert "default: 100" in text


def test_a_vocabulary_past_65536_makes_uint32_shards(tmp_path):
    (tmp_path / "tok").mkdir()
    vocab = wide_tokenizer_file(tmp_path / "tok")
    text = tmp_path / "in.txt"
    text.write_text("ex: an example text, exactly. " * 40, encoding="utf-8")
    meta = prepare([str(text)], tmp_path / "out", tokenizer=str(tmp_path / "tok"),
                   progress=False)
    assert meta["vocab_size"] == 65795
    train = load_split(tmp_path / "out", "train")
    assert train.dtype.itemsize == 4 and train[0] == vocab["ex"] > 65535
    tok = load_bpe(tmp_path / "out")
    both = train[:].tolist() + load_split(tmp_path / "out", "val")[:].tolist()
    assert tok.decode(both) == text.read_text(encoding="utf-8")


def test_a_second_prepare_into_the_same_dir_is_refused(tmp_path, jsonl_dir, capsys):
    """One writer per data directory: the run lock, held here by another process."""
    import subprocess
    import sys
    out = tmp_path / "out"
    shutil.copytree(jsonl_dir / "out", out)
    before = files(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from gptforge.rundir import hold_run_lock\n"
         f"with hold_run_lock({str(out)!r}, what='prepare'):\n"
         "    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_cli("prepare", str(jsonl_dir / "d.jsonl"), "--out", str(out), "--tokenizer",
                       "char", "--force") == 2
        err = one_line(capsys.readouterr().err)
        assert "being written by another gptforge prepare" in err and f"pid {holder.pid}" in err
        assert {k: v for k, v in files(out).items() if k != ".lock"} == before
    finally:
        holder.communicate("")
    assert run_cli("prepare", str(jsonl_dir / "d.jsonl"), "--out", str(out), "--tokenizer",
                   "char", "--force") == 0
    assert not (out / ".lock").exists()
