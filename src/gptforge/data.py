"""Text -> token shards on disk, and a deterministic, resumable loader over them.

Shard format (train.bin, val.bin), after modded-nanogpt: a shard says what it is, so a truncated
or foreign file is caught at load time instead of training on garbage.

    offset  size  field
    0       8     magic b"GPTFTOK\\0"
    8       4     format version (1), uint32 little-endian
    12      4     bytes per token (2), uint32
    16      8     token count, uint64
    24      40    zero padding
    64      2*N   tokens, uint16 little-endian

``prepare`` streams any amount of text through the tokenizer with bounded memory and writes
``train.bin``, ``val.bin`` and ``meta.json`` (written last: it marks a complete directory).
``TokenLoader`` turns a shard into (x, y) batches with a cursor that makes resuming exact and
splits one global stream of sequences between ranks.
"""

from __future__ import annotations

import codecs
import datetime
import decimal
import hashlib
import http.client
import json
import os
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from gptforge.errors import GptforgeError
from gptforge.metrics import progress_bar
from gptforge.tokenizer import TOKENIZERS, CharTokenizer, Tokenizer, get_tokenizer
from gptforge.version import __version__

MAGIC = b"GPTFTOK\0"
FORMAT_VERSION = 1
TOKEN_BYTES = 2
HEADER_BYTES = 64
TOKEN_DTYPE = np.dtype("<u2")

CHUNK_BYTES = 2 * 1024 * 1024  # text per piece; up to 8 pieces (~50 MB of memory each) in flight
MAX_CARRY_CHARS = 64 * 1024 * 1024  # see _iter_text_pieces
PROGRESS_MIN_BYTES = 8 * 1024 * 1024  # below this prepare takes a few seconds: no bar
COPY_TOKENS = 16 * 1024 * 1024  # tokens per piece when copying the val tail out (32 MB)
DOWNLOAD_TIMEOUT_S = 30
OUTPUT_FILES = ("train.bin", "val.bin", "meta.json")

PathLike = Union[str, "os.PathLike[str]"]


# -----------------------------------------------------------------------------
# shards


def _temp_path(path: str) -> str:
    """A fresh name beside ``path``: same directory, so os.replace() onto ``path`` is atomic."""
    head, base = os.path.split(path)
    return os.path.join(head, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _header(count: int) -> bytes:
    head = MAGIC + np.array([FORMAT_VERSION, TOKEN_BYTES], "<u4").tobytes()
    head += np.array([count], "<u8").tobytes()
    return head.ljust(HEADER_BYTES, b"\0")


def _as_tokens(tokens: Any) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.dtype != TOKEN_DTYPE:
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
            raise ValueError("token ids must lie in 0..65535 to be stored as uint16")
        arr = arr.astype(TOKEN_DTYPE)
    return arr.reshape(-1)


class ShardWriter:
    """Append tokens to a new shard; it appears at ``path`` only on ``commit()``.

    Tokens go to a temporary file beside ``path`` (same directory, so the final rename is
    atomic). Used as a context manager it commits on success and removes the temp on error.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        self.tmp_path = _temp_path(self.path)
        self._f = open(self.tmp_path, "xb")
        self._f.write(_header(0))  # placeholder until the count is known
        self.count = 0

    def write(self, tokens: Any) -> None:
        arr = _as_tokens(tokens)
        self._f.write(arr.tobytes())
        self.count += arr.size

    def written(self) -> np.ndarray:
        """A read-only view of the tokens written so far (flushes them to disk first)."""
        self._f.flush()
        return np.memmap(
            self.tmp_path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(self.count,)
        )

    def truncate(self, count: int) -> None:
        """Keep only the first ``count`` tokens."""
        assert 0 <= count <= self.count
        self._f.flush()
        self._f.truncate(HEADER_BYTES + TOKEN_BYTES * count)
        self._f.seek(0, os.SEEK_END)
        self.count = count

    def finish(self) -> str:
        """Write the real header and close; returns the finished temp file's path."""
        if not self._f.closed:
            self._f.seek(0)
            self._f.write(_header(self.count))
            self._f.close()
        return self.tmp_path

    def commit(self) -> None:
        self.finish()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        self._f.close()
        try:
            os.remove(self.tmp_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_shard(path: PathLike, tokens: Any) -> None:
    """Write ``tokens`` (ints in 0..65535) as a shard at ``path``, atomically."""
    with ShardWriter(path) as w:
        w.write(tokens)


def read_shard(path: PathLike) -> np.ndarray:
    """Map a shard read-only: a uint16 ``np.memmap`` of its tokens (empty array if none)."""
    path = os.fspath(path)
    redo = "re-run `gptforge prepare ... --force` to rebuild it"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise GptforgeError(
            f"token shard {path} does not exist: run `gptforge prepare FILE --out DIR` first"
        ) from None
    except OSError as e:
        raise GptforgeError(
            f"cannot read token shard {path} ({e.strerror}): check its permissions"
        ) from None
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise GptforgeError(
            f"{path} is not a gptforge token shard (bad header at byte offset 0); {redo}"
        )
    version, token_bytes = np.frombuffer(head, "<u4", count=2, offset=8)
    (count,) = np.frombuffer(head, "<u8", count=1, offset=16)
    if version != FORMAT_VERSION:
        raise GptforgeError(
            f"{path} has shard format version {version}, this gptforge reads version "
            f"{FORMAT_VERSION}; {redo}"
        )
    if token_bytes != TOKEN_BYTES:
        raise GptforgeError(
            f"{path} stores {token_bytes} bytes per token, expected {TOKEN_BYTES}; {redo}"
        )
    expected = HEADER_BYTES + TOKEN_BYTES * int(count)
    if size != expected:
        raise GptforgeError(
            f"{path} is {size} bytes but its header promises {int(count)} tokens "
            f"({expected} bytes): it is truncated or corrupt; {redo}"
        )
    if count == 0:
        empty = np.zeros(0, dtype=TOKEN_DTYPE)  # mmap cannot map zero bytes
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(int(count),))


def load_meta(data_dir: PathLike) -> dict[str, Any]:
    """Read ``data_dir/meta.json`` as written by ``prepare``."""
    data_dir = os.fspath(data_dir)
    path = os.path.join(data_dir, "meta.json")
    redo = f"re-run `gptforge prepare FILE --out {data_dir} --force`"
    if not os.path.isfile(path):
        raise GptforgeError(
            f"no prepared data in {data_dir}: run `gptforge prepare FILE --out {data_dir}`"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise GptforgeError(
            f"{path} is unreadable or corrupt ({' '.join(str(e).split())}); {redo}"
        ) from None
    if not isinstance(meta, dict) or "format_version" not in meta or "tokenizer" not in meta:
        raise GptforgeError(f"{path} is not gptforge metadata; {redo}")
    if meta["format_version"] != FORMAT_VERSION:
        raise GptforgeError(
            f"{path} has data format version {meta['format_version']}, this gptforge reads "
            f"version {FORMAT_VERSION}; {redo}"
        )
    return meta


def load_split(data_dir: PathLike, split: str) -> np.ndarray:
    """The tokens of ``split`` ("train" or "val") of a prepared directory, checked with meta."""
    data_dir = os.fspath(data_dir)
    meta = load_meta(data_dir)
    tokens = read_shard(os.path.join(data_dir, f"{split}.bin"))
    promised = meta.get(f"{split}_tokens")
    if len(tokens) != promised:
        raise GptforgeError(
            f"{data_dir}/{split}.bin has {len(tokens)} tokens but meta.json says {promised}: "
            f"re-run `gptforge prepare FILE --out {data_dir} --force`"
        )
    return tokens


# -----------------------------------------------------------------------------
# named datasets


@dataclass(frozen=True)
class NamedDataset:
    url: str
    sha256: str
    filename: str  # name of the cached copy under the cache directory
    url_env: str  # environment variable that overrides url (a mirror)
    title: str


NAMED_DATASETS: dict[str, NamedDataset] = {
    "shakespeare": NamedDataset(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare/input.txt",
        url_env="GPTFORGE_SHAKESPEARE_URL",
        title="Tiny Shakespeare",
    ),
}


def default_cache_dir() -> str:
    if os.environ.get("GPTFORGE_CACHE"):
        return os.environ["GPTFORGE_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "gptforge")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_named_dataset(
    name_or_ds: str | NamedDataset, url: str | None = None, cache_dir: str | None = None,
    hint: str | None = None,
) -> str:
    """Path of a verified local copy of a dataset (registered name or a ``NamedDataset``),
    downloading it once into the cache. ``hint`` ends a failure's message: how to get the file
    and pass it to the command at hand (default: to ``gptforge prepare``)."""
    ds = NAMED_DATASETS[name_or_ds] if isinstance(name_or_ds, str) else name_or_ds
    url = url or os.environ.get(ds.url_env) or ds.url
    path = os.path.join(cache_dir or default_cache_dir(), ds.filename)
    if os.path.isfile(path) and _file_sha256(path) == ds.sha256:
        return path
    base = os.path.basename(ds.filename)
    hint = hint or f"download {base} yourself and pass the file: gptforge prepare {base} --out DIR"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise GptforgeError(
            f"cannot create cache directory {os.path.dirname(path)} ({e.strerror}): "
            "set GPTFORGE_CACHE to a writable directory"
        ) from None
    tmp = _temp_path(path)
    try:
        h = hashlib.sha256()
        with open(tmp, "xb") as f:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        h.update(block)
                        f.write(block)
            except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
                if isinstance(e, urllib.error.URLError) and not isinstance(
                    e, urllib.error.HTTPError
                ):
                    reason = str(e.reason)
                else:
                    reason = str(e) or type(e).__name__
                reason = " ".join(reason.split())  # one line, whatever the OS said
                raise GptforgeError(
                    f"could not download {ds.title} from {url} ({reason}): {hint}"
                ) from None
        if h.hexdigest() != ds.sha256:
            raise GptforgeError(
                f"the {ds.title} downloaded from {url} has sha256 {h.hexdigest()}, expected "
                f"{ds.sha256}: the mirror serves other data; {hint}"
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# -----------------------------------------------------------------------------
# prepare: text files -> train.bin, val.bin, meta.json


@dataclass
class _Source:
    name: str  # what the user passed ("shakespeare" or a path)
    path: str
    bytes: int
    sha256: str = ""


# The last place in a text where a non-whitespace character is followed by whitespace. GPT-2's
# split pattern never puts such a pair in one piece, so encoding text[:cut] and text[cut:]
# separately gives exactly the tokens of encoding text. Python's \S (not str.isspace()) is
# stricter than the tokenizer's, and the right side is plain ASCII whitespace, so every cut
# found here is a real boundary for tiktoken too.
_LAST_CUT = re.compile(r".*\S(?=[\t\n\r ])", re.DOTALL)


def _cut_point(text: str, start: int = 0) -> int:
    """Index of the last safe cut in text at or after start+1, or 0 if there is none."""
    m = _LAST_CUT.match(text, start)
    return m.end() if m else 0


def _iter_text_pieces(
    source: _Source, errors: str = "strict", chunk_bytes: int = CHUNK_BYTES, progress: Any = None
) -> Iterator[str]:
    """Decode a file in chunks and yield text pieces that can be tokenized independently.

    Also checks the file (no NUL bytes, valid UTF-8 unless errors="replace") and fills in
    ``source.sha256``. Memory stays at a few chunks whatever the file size.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    sha = hashlib.sha256()
    offset = 0  # bytes of the file read before the current chunk
    carry = ""
    with open(source.path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            final = not raw
            nul = raw.find(b"\0")
            if nul >= 0:
                raise GptforgeError(
                    f"{source.path} looks binary (NUL byte at byte offset {offset + nul}): "
                    "pass text files only"
                )
            sha.update(raw)
            pending = len(decoder.getstate()[0])  # undecoded bytes held over from the last chunk
            try:
                text = carry + decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                raise GptforgeError(
                    f"{source.path} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte "
                    f"offset {bad}): convert it to UTF-8, or pass --errors replace to substitute "
                    "U+FFFD"
                ) from None
            offset += len(raw)
            if progress is not None:
                progress.update(len(raw))
            if final:
                if text:
                    yield text
                break
            # carry held no cut, so only look from its last character on: linear in the file.
            cut = _cut_point(text, max(len(carry) - 1, 0))
            if cut == 0 and len(text) > MAX_CARRY_CHARS:
                # No safe boundary in 64M characters (no whitespace at all): cut anyway so memory
                # stays bounded; at worst one piece here is split where whole-text BPE would not.
                cut = len(text)
            if cut:
                yield text[:cut]
            carry = text[cut:]
    source.sha256 = sha.hexdigest()


def _check_inputs(inputs: list[str], url: str | None, cache_dir: str | None) -> list[_Source]:
    if not inputs:
        raise GptforgeError("no input files given: gptforge prepare FILE [FILE ...] --out DIR")
    sources = []
    for name in inputs:
        path = name
        if name in NAMED_DATASETS and not os.path.exists(name):
            path = fetch_named_dataset(name, url=url, cache_dir=cache_dir)
        if not os.path.exists(path):
            known = ", ".join(NAMED_DATASETS)
            raise GptforgeError(
                f"input file {path} does not exist: check the path (named datasets: {known})"
            )
        if not os.path.isfile(path):
            raise GptforgeError(f"input {path} is not a regular file: pass text files")
        size = os.path.getsize(path)
        if size == 0:
            raise GptforgeError(f"input file {path} is empty: pass a file with text in it")
        sources.append(_Source(name=name, path=os.path.abspath(path), bytes=size))
    return sources


def _split_sizes(n_tokens: int, val_fraction: float) -> tuple[int, int]:
    # Decimal so that 0.29 of 100 tokens is 29, not float's 28.999... rounded down to 28.
    n_val = int(decimal.Decimal(repr(val_fraction)) * n_tokens)
    return n_tokens - n_val, n_val


def prepare(
    inputs: list[str],
    out: PathLike,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.1,
    force: bool = False,
    errors: str = "strict",
    url: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize text files into ``out/train.bin``, ``out/val.bin`` and ``out/meta.json``.

    Each input file is one document. With gpt2, documents are joined by ``<|endoftext|>``
    (50256), so a single file's tokens are exactly ``encode(text)``. With char, which has no
    end-of-text token, documents are simply concatenated (a separator character would be a
    symbol the text itself never contains). The last ``val_fraction`` of the token stream
    (rounded down) is the validation split. Returns the metadata written to meta.json.

    On any error nothing is left in ``out``: files are built under temporary names and renamed
    into place at the end, meta.json last.
    """
    out = os.fspath(out)
    if tokenizer not in TOKENIZERS:
        raise GptforgeError(
            f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise GptforgeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if errors not in ("strict", "replace"):
        raise GptforgeError(f"--errors must be 'strict' or 'replace', got {errors!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise GptforgeError(f"output {out} exists and is not a directory: choose another --out")
    existing = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out, f))]
    if existing and not force:
        raise GptforgeError(
            f"{out} already holds prepared data ({', '.join(existing)}): "
            "pass --force to overwrite it"
        )
    sources = _check_inputs(inputs, url, cache_dir)

    total_bytes = sum(s.bytes for s in sources)
    passes = 2 if tokenizer == "char" else 1  # char needs its vocabulary before it can encode
    bar = progress_bar(
        total=total_bytes * passes,
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=not progress or total_bytes <= PROGRESS_MIN_BYTES,
    )
    # Remember which directories we create, to remove them again if anything fails.
    created = []
    d = os.path.abspath(out)
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise GptforgeError(
            f"cannot create --out {out} ({e.strerror}): choose another directory"
        ) from None
    writers: list[ShardWriter] = []
    meta_tmp = None
    try:
        with bar:
            if tokenizer == "char":
                chars: set[str] = set()
                for src in sources:
                    for piece in _iter_text_pieces(src, errors, CHUNK_BYTES, bar):
                        chars.update(piece)
                if len(chars) > 1 << 16:
                    raise GptforgeError(
                        f"the inputs hold {len(chars)} distinct characters, more than the 65536 a "
                        "uint16 shard can store: use --tokenizer gpt2"
                    )
                tok: Tokenizer = CharTokenizer("".join(sorted(chars)))
            else:
                tok = get_tokenizer(tokenizer)

            # All tokens stream into what becomes train.bin; the val tail is copied out at the end.
            stream = ShardWriter(os.path.join(out, "train.bin"))
            writers.append(stream)
            in_flight = max(1, min(os.cpu_count() or 1, 8))  # pieces encoded in parallel
            for k, src in enumerate(sources):
                if k > 0 and tok.eot_id is not None:
                    stream.write([tok.eot_id])
                batch: list[str] = []
                for piece in _iter_text_pieces(src, errors, CHUNK_BYTES, bar):
                    batch.append(piece)
                    if len(batch) == in_flight:
                        for ids in tok.encode_batch(batch):
                            stream.write(ids)
                        batch = []
                for ids in tok.encode_batch(batch):
                    stream.write(ids)

        n_tokens = stream.count
        n_train, n_val = _split_sizes(n_tokens, val_fraction)
        if n_train < 2:
            raise GptforgeError(
                f"the inputs give only {n_tokens} tokens ({n_train} for training): "
                "pass more text or a smaller --val-fraction"
            )
        # Copy the tail out as val.bin in bounded pieces, then cut the stream down to train.
        val = ShardWriter(os.path.join(out, "val.bin"))
        writers.append(val)
        everything = stream.written()
        for i in range(n_train, n_tokens, COPY_TOKENS):
            val.write(everything[i : i + COPY_TOKENS])
        del everything
        stream.truncate(n_train)
        stream.finish()
        val.finish()

        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tok.to_dict(),
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "val_fraction": val_fraction,
            "sources": [
                {"name": s.name, "path": s.path, "bytes": s.bytes, "sha256": s.sha256}
                for s in sources
            ],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gptforge_version": __version__,
        }
        meta_path = os.path.join(out, "meta.json")
        meta_tmp = _temp_path(meta_path)
        with open(meta_tmp, "x", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
            f.write("\n")

        # Publish. meta.json goes first out and last in, so a directory caught halfway through
        # (a crash between renames) reads as "no prepared data", never as mismatched shards.
        if os.path.exists(meta_path):
            os.remove(meta_path)
        os.replace(stream.tmp_path, stream.path)
        os.replace(val.tmp_path, val.path)
        os.replace(meta_tmp, meta_path)
        return meta
    except BaseException:
        for w in writers:
            w.abort()
        if meta_tmp is not None and os.path.exists(meta_tmp):
            os.remove(meta_tmp)
        for d in created:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise


# -----------------------------------------------------------------------------
# loading batches


def _too_short(tokens: np.ndarray, n: int, b: int, t: int, need: int) -> GptforgeError:
    where = getattr(tokens, "filename", None) or "the token array"
    return GptforgeError(
        f"{where} has {n} tokens, fewer than one batch of {b} x {t} + 1 = {need}; "
        "use a smaller train.batch_size/train.seq_len or more text"
    )


class TokenLoader:
    """(x, y) int32 batches of shape (B, T) from one shard; y is x shifted left by one token.
    (int32, not int64: half the bytes to the device, widened there; see device.BatchFeeder.)

    There is one global stream of sequences (windows of T+1 tokens). ``cursor`` counts global
    sequences consumed; a call on rank r returns sequences [cursor + r*B, cursor + (r+1)*B) and
    advances cursor by world_size*B. So the stream does not depend on how many processes read
    it: 2 calls on 1 process see what 1 call each on 2 processes see, and a run can resume with
    a different world size.

    mode "sequential" is build-nanogpt's DataLoaderLite: sequence k starts at token
    (k mod n_seq) * T with n_seq = floor((N-1) / (B*T)) * B, i.e. batches walk the shard in
    order and wrap to the start when a whole B*T+1 no longer fits (the tail is dropped).
    mode "random" draws each sequence's start uniformly in [0, N-T-1], seeded per global index.
    """

    RANDOM_BLOCK = 4096  # sequences whose starts come from one seeded generator

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        mode: str = "sequential",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if mode not in ("sequential", "random"):
            raise GptforgeError(f"unknown data loader mode {mode!r}: choose sequential or random")
        if batch_size < 1 or seq_len < 1:
            raise GptforgeError(
                f"batch size and sequence length must be >= 1, got {batch_size} x {seq_len}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.tokens = tokens
        self.B, self.T = batch_size, seq_len
        self.mode, self.seed = mode, int(seed)
        self.rank, self.world_size = rank, world_size
        self.cursor = 0
        n = len(tokens)
        if mode == "sequential":
            need = self.B * self.T + 1
            self.n_seq = (n - 1) // (self.B * self.T) * self.B if n > 0 else 0
        else:
            need = self.T + 1
            self.n_seq = 0
        if n < need:
            raise _too_short(tokens, n, self.B, self.T, need)
        self._block_index = -1
        self._block_starts = np.zeros(0, dtype=np.int64)

    def _random_starts(self, first: int) -> np.ndarray:
        """Window starts of global sequences first .. first+B-1, independent of world size."""
        ks = np.arange(first, first + self.B, dtype=np.int64)
        starts = np.empty(self.B, dtype=np.int64)
        high = len(self.tokens) - self.T  # exclusive: start + T + 1 <= N
        for block in np.unique(ks // self.RANDOM_BLOCK):
            block = int(block)
            if block != self._block_index:
                rng = np.random.default_rng([self.seed, block])
                self._block_starts = rng.integers(0, high, size=self.RANDOM_BLOCK, dtype=np.int64)
                self._block_index = block
            sel = ks // self.RANDOM_BLOCK == block
            starts[sel] = self._block_starts[ks[sel] % self.RANDOM_BLOCK]
        return starts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        first = self.cursor + self.rank * B
        if self.mode == "sequential":
            # n_seq is a multiple of B and first is too, so a batch never straddles the wrap:
            # it is one contiguous run of B*T+1 tokens.
            start = (first % self.n_seq) * T
            buf = torch.from_numpy(
                np.asarray(self.tokens[start : start + B * T + 1], dtype=np.int32)
            )
            x = buf[:-1].view(B, T)
            y = buf[1:].view(B, T)  # shares storage with x, like DataLoaderLite
        else:
            idx = self._random_starts(first)[:, None] + np.arange(T + 1)  # (B, T+1)
            buf = np.asarray(self.tokens[idx], dtype=np.int32)
            x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
            y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
        self.cursor += self.world_size * B
        return x, y

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, plus what must match for resuming to continue the same stream."""
        return {
            "mode": self.mode,
            "seed": self.seed,
            "cursor": self.cursor,
            "batch_size": self.B,
            "seq_len": self.T,
            "n_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        # state key -> the setting a person would change (config names; n_tokens is the data)
        settings = {
            "mode": "data.loader",
            "seed": "train.seed",
            "batch_size": "train.batch_size",
            "seq_len": "train.seq_len",
            "n_tokens": "train tokens in the data",
        }
        for key, setting in settings.items():
            if state.get(key) != mine[key]:
                raise GptforgeError(
                    f"cannot resume the data stream: {setting} was {state.get(key)!r} in the "
                    f"checkpoint and is {mine[key]!r} now; resume with the same data and settings"
                )
        cursor = state.get("cursor")
        if not isinstance(cursor, int) or cursor < 0:
            raise GptforgeError(
                f"cannot resume the data stream: bad cursor {cursor!r} in the checkpoint"
            )
        self.cursor = cursor


def count_eval_windows(tokens: np.ndarray, seq_len: int) -> int:
    """Windows of seq_len+1 tokens in ``tokens``, consecutive (neighbours share one token)."""
    return max(len(tokens) - 1, 0) // seq_len


def iter_eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every full window of a split, in order, as (x, y) int32 batches; the last may be smaller.

    Window w predicts tokens[w*T+1 : (w+1)*T+1], so together they score every token but the
    first once. A final window shorter than T is dropped. Yields nothing if the split is shorter
    than T+1 tokens (check count_eval_windows first to say so).
    """
    T = seq_len
    n_windows = count_eval_windows(tokens, T)
    for w0 in range(0, n_windows, batch_size):
        rows = min(batch_size, n_windows - w0)
        buf = torch.from_numpy(np.asarray(tokens[w0 * T : (w0 + rows) * T + 1], dtype=np.int32))
        yield buf[:-1].view(rows, T), buf[1:].view(rows, T)
