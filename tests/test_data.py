"""prepare -> shards -> loader: exact tokens, clean failures, deterministic resumable batches."""

import hashlib
import http.server
import importlib
import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from corpus import SHAKESPEARE

from gptforge import data
from gptforge.data import (
    BatchFeeder,
    TokenLoader,
    count_eval_windows,
    iter_eval_batches,
    load_meta,
    load_split,
    prepare,
    read_shard,
    write_shard,
)
from gptforge.errors import GptforgeError
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer

sources = importlib.import_module("gptforge.data.sources")  # (data.prepare is the function)



@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def shakespeare_gpt2(tmp_path_factory, shakespeare_text) -> str:
    out = str(tmp_path_factory.mktemp("prep") / "shakespeare")
    prepare([SHAKESPEARE], out, progress=False)
    return out


def write(path, content) -> str:
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
        f.write(content)
    return str(path)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def tree(path) -> dict:
    """Every file under path with its bytes, to check a failed prepare left nothing changed."""
    found = {}
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return found


# -----------------------------------------------------------------------------
# prepare and shards


def split_tokens(out, split) -> list[int]:
    return load_split(out, split)[:].tolist()


def test_prepare_shakespeare_round_trip(shakespeare_gpt2, shakespeare_text, gpt2):
    train = read_shard(os.path.join(shakespeare_gpt2, "train-000000.bin"))
    val = read_shard(os.path.join(shakespeare_gpt2, "val-000000.bin"))
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and not train.flags.writeable
    expected = gpt2.encode(shakespeare_text)
    assert len(train) + len(val) == len(expected) == 338_025
    assert len(val) == 33_802  # floor(0.1 * 338025): the last tenth of the stream
    assert np.array_equal(np.concatenate([train, val]), np.array(expected, dtype=np.uint16))

    meta = load_meta(shakespeare_gpt2)
    assert meta["format_version"] == 2
    assert meta["val_split"]["rule"] == "tail"
    assert meta["documents"]["read"] == 1 and meta["documents"]["empty_skipped"] == 0
    assert meta["tokenizer"] == {"name": "gpt2"}
    assert (meta["vocab_size"], meta["eot_id"]) == (50257, 50256)
    assert (meta["train_tokens"], meta["val_tokens"], meta["val_fraction"]) == (
        len(train),
        len(val),
        0.1,
    )
    [src] = meta["sources"]
    assert src["bytes"] == os.path.getsize(SHAKESPEARE)
    assert src["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert os.path.samefile(src["path"], SHAKESPEARE)
    assert meta["created"] and meta["gptforge_version"]
    assert len(load_split(shakespeare_gpt2, "val")) == len(val)
    assert meta["shards"] == {
        split: [{"file": f"{split}-000000.bin", "tokens": n,
                 "sha256": data.shards.file_sha256(os.path.join(shakespeare_gpt2, f"{split}-000000.bin"))}]
        for split, n in (("train", len(train)), ("val", len(val)))
    }
    assert sorted(os.listdir(shakespeare_gpt2)) == ["meta.json", "train-000000.bin", "val-000000.bin"]


def test_chunked_prepare_equals_whole_encoding(tmp_path, monkeypatch, shakespeare_gpt2):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)  # ~270 chunks, each cut at a safe boundary
    prepare([SHAKESPEARE], str(tmp_path / "out"), progress=False)
    for split in ("train", "val"):
        assert split_tokens(tmp_path / "out", split) == split_tokens(shakespeare_gpt2, split)


def text_source(path) -> "sources.Source":
    [src] = sources.expand_inputs([str(path)])
    return src


@pytest.mark.parametrize("errors", ["strict", "replace"])
def test_chunked_pieces_unicode_whitespace(tmp_path, gpt2, monkeypatch, errors):
    # Odd tiny chunks split multi-byte characters and whitespace runs at every possible place.
    text = ("naïve  café\n\n  déjà\t\tvu 🤖🤖 x\u3000y\u00a0 z  \r\n" * 40) + "   end  "
    raw = text.encode()
    if errors == "replace":  # invalid bytes, some of them next to the places cuts go
        raw = raw.replace(b"x", b"\xe2\x82").replace(b"vu", b"v\xff")
        text = raw.decode("utf-8", "replace")
    path = write(tmp_path / "u.txt", raw)
    opt = sources.ReadOptions(errors=errors)
    for chunk in (1, 3, 7, 64):
        monkeypatch.setattr(sources, "CHUNK_BYTES", chunk)
        src = text_source(path)
        pieces = list(sources.read_text(src, opt))
        assert "".join(p.text for p in pieces) == text
        assert [t for p in pieces for t in gpt2.encode(p.text)] == gpt2.encode(text)
        assert src.sha256 == hashlib.sha256(raw).hexdigest()
        # Starting again at any piece's resume point gives the rest of the text exactly.
        for k in range(0, len(pieces), 7):
            rest = list(sources.read_text(text_source(path), opt, pieces[k].resume))
            assert "".join(p.text for p in rest) == "".join(p.text for p in pieces[k:])
            assert rest[0].first == (k == 0)


def test_multiple_files_separated_by_eot(tmp_path, gpt2):
    a = write(tmp_path / "a.txt", "Hello world\n")
    b = write(tmp_path / "b.txt", "second document")
    meta = prepare([a, b], str(tmp_path / "out"), val_fraction=0.0, progress=False)
    train = split_tokens(tmp_path / "out", "train")
    assert train == gpt2.encode("Hello world\n") + [50256] + gpt2.encode("second document")
    assert [s["name"] for s in meta["sources"]] == [a, b]
    # val_fraction 0: everything trains, val has no shards and no tokens
    assert len(load_split(str(tmp_path / "out"), "val")) == 0 and meta["val_tokens"] == 0
    assert meta["shards"]["val"] == [] and meta["val_split"] == {"rule": "none"}


def test_char_files_are_concatenated(tmp_path):
    a = write(tmp_path / "a.txt", "abc")
    b = write(tmp_path / "b.txt", "cab")
    meta = prepare(
        [a, b], str(tmp_path / "out"), tokenizer="char", val_fraction=0.5, progress=False
    )
    assert meta["tokenizer"] == {"name": "char", "chars": "abc"} and meta["eot_id"] is None
    train, val = (split_tokens(tmp_path / "out", s) for s in ("train", "val"))
    assert train + val == [0, 1, 2, 2, 0, 1] and len(val) == 3


def test_char_prepare_shakespeare(tmp_path, shakespeare_text):
    meta = prepare([SHAKESPEARE], str(tmp_path / "out"), tokenizer="char", progress=False)
    assert meta["vocab_size"] == 65 and len(meta["tokenizer"]["chars"]) == 65
    tok = CharTokenizer.from_text(shakespeare_text)
    train = load_split(str(tmp_path / "out"), "train")
    assert train[:1000].tolist() == tok.encode(shakespeare_text[:1000])
    assert meta["train_tokens"] + meta["val_tokens"] == len(shakespeare_text)


def test_val_fraction_rounds_down_exactly(tmp_path):
    path = write(tmp_path / "t.txt", "abcdefghij" * 10)  # 100 char tokens
    meta = prepare(
        [path], str(tmp_path / "out"), tokenizer="char", val_fraction=0.29, progress=False
    )
    assert (meta["train_tokens"], meta["val_tokens"]) == (71, 29)


def test_write_read_shard(tmp_path):
    path = str(tmp_path / "s.bin")
    write_shard(path, [0, 1, 65535, 50256])
    assert read_shard(path).tolist() == [0, 1, 65535, 50256]
    with open(path, "rb") as f:
        head = f.read(64)
    assert head[:8] == b"GPTFTOK\0" and head[8:24] == bytes([1, 0, 0, 0, 2, 0, 0, 0, 4] + [0] * 7)
    with pytest.raises(ValueError):
        write_shard(str(tmp_path / "bad.bin"), [70000])
    assert sorted(os.listdir(tmp_path)) == ["s.bin"]


# -----------------------------------------------------------------------------
# bad input: one line, and nothing left behind


@pytest.mark.parametrize(
    "content, kwargs, needle",
    [
        (None, {}, "does not exist"),
        (b"", {}, "hold no text"),
        (b"hello\0world", {}, "NUL byte at byte offset 5"),
        (b"caf\xc3\xa9 ok \xff\xfe", {}, "byte 0xff at byte offset 9"),
        (b"abc\xc3", {}, "at byte offset 3"),  # a character cut off by the end of the file
        (b"hello world", {"val_fraction": 1.0}, "--val-fraction must be in [0, 1)"),
        (b"hello world", {"val_fraction": -0.1}, "--val-fraction must be in [0, 1)"),
        (b"hello world", {"tokenizer": "bqe"}, "neither a tokenizer (gpt2, char, bpe)"),
        (b"hello world", {"tokenizer": "bpe"}, "needs --vocab-size N (259 to 131,072)"),
        (b"hello world", {"tokenizer": "bpe", "vocab_size": 258}, "choose 259"),
        (b"hello world", {"tokenizer": "gpt2", "vocab_size": 300}, "leave --vocab-size out"),
        (b"hello world", {"tokenizer": "char", "tokenizer_sample_mb": 1}, "leave it out"),
        (b"hello hello world " * 50, {"tokenizer": "bpe", "vocab_size": 400},
         "training stopped at 26"),
        (b"hello world", {"errors": "ignore"}, "--errors"),
        (b"a", {}, "only 1 tokens"),
        (b"hello world", {"val_fraction": 0.9}, "smaller --val-fraction"),
    ],
)
def test_bad_input_leaves_nothing(tmp_path, content, kwargs, needle):
    path = str(tmp_path / "in.txt")
    if content is not None:
        write(path, content)
    out = tmp_path / "deep" / "out"
    with pytest.raises(GptforgeError) as e:
        prepare([path], str(out), progress=False, **kwargs)
    assert needle in one_line_error(e)
    if content is not None and "byte" in needle:
        assert path in str(e.value)
    if "UTF-8" in str(e.value):
        assert "--errors replace" in str(e.value)
    assert not (tmp_path / "deep").exists()


def test_offsets_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 7)  # splits the 2-byte characters
    bad = write(tmp_path / "bad.txt", "é".encode() * 100 + b"\xff" + b"tail")
    binary = write(tmp_path / "nul.txt", b"x" * 123 + b"\0")
    with pytest.raises(GptforgeError, match="byte 0xff at byte offset 200"):
        prepare([bad], str(tmp_path / "out"), progress=False)
    with pytest.raises(GptforgeError, match="NUL byte at byte offset 123"):
        prepare([binary], str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.txt", "nul.txt"]


def test_errors_replace(tmp_path, gpt2):
    path = write(tmp_path / "latin1.txt", "café ok".encode("latin-1"))
    meta = prepare(
        [path], str(tmp_path / "out"), errors="replace", val_fraction=0.0, progress=False
    )
    assert split_tokens(tmp_path / "out", "train") == gpt2.encode("caf\ufffd ok")
    assert meta["train_tokens"] > 0
    # NUL still means binary, whatever the decoding
    nul = write(tmp_path / "nul.txt", b"text\0")
    with pytest.raises(GptforgeError, match="NUL byte"):
        prepare([nul], str(tmp_path / "out2"), errors="replace", progress=False)
    assert not (tmp_path / "out2").exists()


def test_late_failure_cleans_temp_files(tmp_path):
    good = write(tmp_path / "good.txt", "fine text " * 100)
    binary = write(tmp_path / "z.txt", b"x" * 50 + b"\0")
    out = tmp_path / "out"
    out.mkdir()  # an existing, empty directory stays, empty
    with pytest.raises(GptforgeError, match="offset 50"):
        prepare([good, binary], str(out), progress=False)
    assert list(out.iterdir()) == []


def test_existing_output_needs_force(tmp_path, gpt2):
    first = write(tmp_path / "a.txt", "first text here")
    second = write(tmp_path / "b.txt", "second, different text")
    out = str(tmp_path / "out")
    prepare([first], out, val_fraction=0.0, progress=False)
    before = tree(out)
    with pytest.raises(GptforgeError) as e:
        prepare([second], out, progress=False)
    assert "--force" in one_line_error(e)
    assert tree(out) == before
    # a forced run that fails leaves the old data as it was
    with pytest.raises(GptforgeError):
        prepare([write(tmp_path / "n.txt", b"\0")], out, force=True, progress=False)
    assert tree(out) == before
    # the same arguments again: nothing to do, nothing touched
    assert prepare([first], out, val_fraction=0.0, progress=False)["run"]["status"] == "unchanged"
    assert tree(out) == before
    prepare([second], out, val_fraction=0.0, force=True, progress=False)
    assert split_tokens(out, "train") == gpt2.encode("second, different text")
    assert sorted(os.listdir(out)) == ["meta.json", "train-000000.bin"]


def test_corrupt_shards(tmp_path):
    path = str(tmp_path / "train.bin")
    write_shard(path, list(range(100)))
    raw = open(path, "rb").read()

    write(path, b"NOTTOKEN" + raw[8:])
    with pytest.raises(GptforgeError) as e:
        read_shard(path)
    assert path in one_line_error(e) and "--force" in str(e.value)

    write(path, raw[:-1])
    with pytest.raises(GptforgeError, match="truncated") as e:
        read_shard(path)
    assert path in one_line_error(e) and "--force" in str(e.value)

    write(path, raw[:30])
    with pytest.raises(GptforgeError, match="bad header"):
        read_shard(path)

    write(path, raw[:8] + bytes([9]) + raw[9:])
    with pytest.raises(GptforgeError, match="version 9"):
        read_shard(path)

    with pytest.raises(GptforgeError, match="does not exist"):
        read_shard(str(tmp_path / "missing.bin"))


def test_load_meta_errors(tmp_path):
    with pytest.raises(GptforgeError) as e:
        load_meta(str(tmp_path / "nowhere"))
    assert "no prepared data in" in one_line_error(e) and "gptforge prepare INPUT --out" in str(
        e.value
    )
    write(tmp_path / "meta.json", "{not json")
    with pytest.raises(GptforgeError, match="corrupt"):
        load_meta(str(tmp_path))


# -----------------------------------------------------------------------------
# named dataset download


class _Server:
    """A quiet HTTP server on 127.0.0.1 serving one directory, in a thread."""

    def __init__(self, directory):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(directory), **k)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/input.txt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called "shakespeare" here
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "default-cache"))  # never touch ~/.cache
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("GPTFORGE_SHAKESPEARE_URL", raising=False)


def test_download_verify_and_reuse_cache(tmp_path, offline_env):
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(SHAKESPEARE, served / "input.txt")
    server = _Server(served)
    cache = tmp_path / "cache"
    try:
        meta = prepare(
            ["shakespeare"],
            str(tmp_path / "a"),
            tokenizer="char",
            url=server.url,
            cache_dir=str(cache),
            progress=False,
        )
    finally:
        server.stop()
    assert meta["vocab_size"] == 65 and meta["sources"][0]["name"] == "shakespeare"
    cached = meta["sources"][0]["path"]
    assert cached.startswith(str(cache)) and os.listdir(os.path.dirname(cached)) == ["input.txt"]
    # server gone: the verified cached copy is used without any network
    again = data.fetch_named_dataset("shakespeare", url=server.url, cache_dir=str(cache))
    assert again == cached


def test_download_wrong_checksum_not_cached(tmp_path, offline_env):
    served = tmp_path / "www"
    served.mkdir()
    write(served / "input.txt", "not shakespeare at all\n")
    server = _Server(served)
    cache = tmp_path / "cache"
    try:
        with pytest.raises(GptforgeError) as e:
            prepare(
                ["shakespeare"],
                str(tmp_path / "out"),
                url=server.url,
                cache_dir=str(cache),
                progress=False,
            )
    finally:
        server.stop()
    assert "sha256" in one_line_error(e)
    assert tree(cache) == {} and not (tmp_path / "out").exists()


def test_fetch_a_dataset_of_ones_own(tmp_path, offline_env):
    """fetch_named_dataset also takes a NamedDataset that is not in NAMED_DATASETS."""
    served = tmp_path / "www"
    served.mkdir()
    write(served / "input.txt", "some evaluation data\n")
    ds = data.NamedDataset(url="unused", sha256=hashlib.sha256(b"some evaluation data\n").hexdigest(),
                           filename="mine/input.txt", url_env="GPTFORGE_TEST_MINE_URL", title="Mine")
    server = _Server(served)
    try:
        path = data.fetch_named_dataset(ds, url=server.url, cache_dir=str(tmp_path / "cache"))
    finally:
        server.stop()
    assert path == str(tmp_path / "cache" / "mine" / "input.txt")
    assert data.fetch_named_dataset(ds, cache_dir=str(tmp_path / "cache")) == path  # cached
    bad = data.NamedDataset(**{**ds.__dict__, "sha256": "0" * 64, "filename": "bad/input.txt"})
    server = _Server(served)
    try:
        with pytest.raises(GptforgeError, match="the Mine downloaded from .* has sha256"):
            data.fetch_named_dataset(bad, url=server.url, cache_dir=str(tmp_path / "cache"))
    finally:
        server.stop()


def test_download_unreachable_one_line(tmp_path, offline_env, monkeypatch):
    url = "http://127.0.0.1:1/input.txt"
    monkeypatch.setenv("GPTFORGE_SHAKESPEARE_URL", url)  # the mirror variable is honoured
    with pytest.raises(GptforgeError) as e:
        prepare(["shakespeare"], str(tmp_path / "out"), progress=False)
    msg = one_line_error(e)
    assert msg.startswith(f"could not download Tiny Shakespeare from {url} (")
    assert msg.endswith(
        "download input.txt yourself and pass the file: gptforge prepare input.txt --out DIR"
    )
    assert not (tmp_path / "out").exists() and tree(tmp_path / "default-cache") == {}


# -----------------------------------------------------------------------------
# loader


class DataLoaderLite:
    """build-nanogpt's loader (single process), the reference for mode="sequential"."""

    def __init__(self, tokens, B, T):
        self.tokens = torch.tensor(tokens.astype(np.int64))
        self.B, self.T = B, T
        self.current_position = 0

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.tokens[self.current_position : self.current_position + B * T + 1]
        x = buf[:-1].view(B, T)
        y = buf[1:].view(B, T)
        self.current_position += B * T
        if self.current_position + (B * T + 1) > len(self.tokens):
            self.current_position = 0
        return x, y


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50257, size=1000, dtype=np.uint16)


def test_sequential_matches_dataloaderlite(tokens):
    for B, T in [(4, 8), (3, 7), (1, 999)]:
        ours, ref = TokenLoader(tokens, B, T), DataLoaderLite(tokens, B, T)
        for _ in range(3 * (999 // (B * T)) + 2):  # wraps a few times
            x, y = ours.next_batch()
            rx, ry = ref.next_batch()
            assert x.dtype == torch.int32 and x.shape == (B, T)
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_random_is_deterministic_and_in_range(tokens):
    a, b, c = (TokenLoader(tokens, 8, 16, mode="random", seed=s) for s in (1, 1, 2))
    xa = [a.next_batch() for _ in range(5)]
    xb = [b.next_batch() for _ in range(5)]
    xc = [c.next_batch() for _ in range(5)]
    assert all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(xa, xb, strict=True)
    )
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(xa, xc, strict=True))
    t = torch.from_numpy(tokens.astype(np.int64))
    for x, y in xa:
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, yrow in zip(x, y, strict=True):  # each row is a real window of the data
            s = next(i for i in range(len(t) - 16) if torch.equal(t[i : i + 16], row))
            assert torch.equal(t[s + 1 : s + 17], yrow)


def test_random_starts_per_global_index_across_blocks(tokens):
    # Sequences 4093..4099 straddle two generator blocks; each start follows the documented rule.
    loader = TokenLoader(tokens, 7, 10, mode="random", seed=5)
    loader.load_state_dict(dict(loader.state_dict(), cursor=4093))
    x, _ = loader.next_batch()
    for i, k in enumerate(range(4093, 4100)):
        start = np.random.default_rng([5, k // 4096]).integers(0, len(tokens) - 10, size=4096)[
            k % 4096
        ]
        assert x[i].tolist() == tokens[start : start + 10].tolist()


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_ranks_split_the_single_stream(tokens, mode):
    B, T, W = 2, 8, 3
    single = TokenLoader(tokens, B, T, mode=mode, seed=3)
    ranks = [TokenLoader(tokens, B, T, mode=mode, seed=3, rank=r, world_size=W) for r in range(W)]
    for _ in range(25):  # sequential wraps after 62 sequences = ~10 steps
        got = [loader.next_batch() for loader in ranks]
        want = [single.next_batch() for _ in range(W)]
        for (x, y), (wx, wy) in zip(got, want, strict=True):
            assert torch.equal(x, wx) and torch.equal(y, wy)
    assert all(loader.cursor == single.cursor for loader in ranks)


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_state_dict_resumes_exactly(tokens, mode):
    a = TokenLoader(tokens, 4, 8, mode=mode, seed=7)
    for _ in range(11):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = TokenLoader(tokens, 4, 8, mode=mode, seed=7)
    b.load_state_dict(state)
    for _ in range(40):
        (x, y), (bx, by) = a.next_batch(), b.next_batch()
        assert torch.equal(x, bx) and torch.equal(y, by)


def test_state_dict_mismatch(tokens):
    state = TokenLoader(tokens, 4, 8, mode="random", seed=7).state_dict()
    for other in [
        TokenLoader(tokens, 4, 8, mode="random", seed=8),
        TokenLoader(tokens, 4, 8, mode="sequential", seed=7),
        TokenLoader(tokens, 4, 9, mode="random", seed=7),
        TokenLoader(tokens, 5, 8, mode="random", seed=7),
        TokenLoader(tokens[:900], 4, 8, mode="random", seed=7),
    ]:
        with pytest.raises(GptforgeError, match="cannot resume") as e:
            other.load_state_dict(state)
        one_line_error(e)


def test_too_short_for_one_batch(tmp_path):
    path = str(tmp_path / "train.bin")
    write_shard(path, list(range(32)))
    shard = read_shard(path)
    with pytest.raises(GptforgeError) as e:
        TokenLoader(shard, 4, 8)
    assert one_line_error(e) == (
        f"{path} has 32 tokens, fewer than one batch of 4 x 8 + 1 = 33; "
        "use a smaller train.batch_size/train.seq_len or more text"
    )
    TokenLoader(shard, 4, 8, mode="random")  # random only needs one window of T+1
    with pytest.raises(GptforgeError, match="fewer than one batch"):
        TokenLoader(shard, 4, 32, mode="random")
    with pytest.raises(GptforgeError, match="sequential or random"):
        TokenLoader(shard, 1, 8, mode="shuffle")


def test_eval_batches_cover_the_split(tokens):
    T, B = 16, 5
    n = count_eval_windows(tokens, T)
    assert n == 999 // 16 == 62
    batches = list(iter_eval_batches(tokens, B, T))
    assert [x.shape[0] for x, _ in batches] == [5] * 12 + [2]
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert xs.tolist() == tokens[: n * T].tolist()
    assert ys.tolist() == tokens[1 : n * T + 1].tolist()
    assert list(iter_eval_batches(tokens[:16], B, T)) == []


def test_batch_feeder_stages_through_reused_buffers_and_widens_on_the_device():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50257, (4, 8), generator=gen, dtype=torch.int32),
                torch.randint(0, 50257, (4, 8), generator=gen, dtype=torch.int32)) for _ in range(7)]
    it = iter(batches)
    feeder = BatchFeeder(lambda: next(it), torch.device("cpu"), slots=3, stage=True)
    seen = set()
    for x, y in batches:
        dx, dy = feeder()
        assert dx.dtype == dy.dtype == torch.int64
        assert torch.equal(dx, x.long()) and torch.equal(dy, y.long())
        seen.update(id(t) for buf in feeder._buffers if buf is not None for t in buf)
    assert len(seen) == 6  # three pairs of staging buffers, reused, never more
    plain = BatchFeeder(lambda: batches[0], torch.device("cpu"))
    assert not plain.stage and torch.equal(plain()[0], batches[0][0].long())


def test_shakespeare_ships_with_the_package_and_needs_no_network(tmp_path, offline_env, monkeypatch):
    """`gptforge prepare shakespeare` on a machine without network: the bundled copy, verified,
    and no download is even attempted."""
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("prepare shakespeare tried the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    meta = prepare(["shakespeare"], str(tmp_path / "char"), tokenizer="char", progress=False)
    assert meta["vocab_size"] == 65 and meta["train_tokens"] + meta["val_tokens"] == 1_115_394
    source = meta["sources"][0]
    assert source["name"] == "shakespeare" and source["sha256"] == data.NAMED_DATASETS["shakespeare"].sha256
    assert os.path.dirname(source["path"]) == data.named.BUNDLED_DIR
    assert not (tmp_path / "default-cache").exists()  # nothing cached, nothing fetched


def test_a_damaged_bundled_copy_is_one_line(tmp_path, offline_env, monkeypatch):
    bad = tmp_path / "bundled"
    bad.mkdir()
    (bad / "tinyshakespeare.txt").write_text("First Citizen:\nsomething else\n")
    monkeypatch.setattr(data.named, "BUNDLED_DIR", str(bad))
    with pytest.raises(GptforgeError) as e:
        prepare(["shakespeare"], str(tmp_path / "out"), progress=False)
    assert "missing or damaged" in one_line_error(e) and "reinstall gptforge" in one_line_error(e)
    assert not (tmp_path / "out").exists()


def test_char_data_capped_by_max_tokens_holds_only_the_characters_before_the_cap(tmp_path):
    """The char vocabulary is read from the first --max-tokens characters; the pieces tokenized
    must stop there too (Tiny Shakespeare's first 'Q' is past 50,000 characters)."""
    out = tmp_path / "capped"
    data.prepare([str(SHAKESPEARE)], str(out), tokenizer="char", max_tokens=50_000, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == 50_000 and meta["stopped_at_max_tokens"]
    assert "Q" not in meta["tokenizer"]["chars"]
