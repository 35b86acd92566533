"""Token shards on disk: the self-describing file, an atomic writer, a checked reader, and the
tokens of a prepared split as one read-only stream over its shards.

A shard, after modded-nanogpt: it says what it is, so a truncated or foreign file is caught at
load time instead of training on garbage.

    offset  size  field
    0       8     magic b"GPTFTOK\\0"
    8       4     shard format version (1), uint32 little-endian
    12      4     bytes per token (2, or 4 for a vocabulary of more than 65,536), uint32
    16      8     token count, uint64
    24      40    zero padding
    64      2*N   tokens, uint16 little-endian (4*N, uint32, where the header says 4)

The width is the narrowest that holds every id of the vocabulary (``token_dtype``): GPT-2's,
char and BPE vocabularies up to 65,536 tokens give the same uint16 files as always.

A prepared directory is ``meta.json`` plus the shards it lists. ``meta.json`` is written last, so
a directory without it holds no prepared data, whatever else is there.

- data format 2: ``meta["shards"]["train"]`` (and ``"val"``) lists ``{"file", "tokens", "sha256"}``
  per shard, in stream order (``train-000000.bin``, ``train-000001.bin``, ...).
- data format 1 (gptforge before sharding): one ``train.bin`` and one ``val.bin``. Still read.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

from gptforge.atomic import file_sha256 as file_sha256  # re-exported: shards are checked by it
from gptforge.atomic import publish, temp_path
from gptforge.errors import GptforgeError
from gptforge.tokenizer import tokenizer_from_dict
from gptforge.version import __version__

MAGIC = b"GPTFTOK\0"
SHARD_VERSION = 1
TOKEN_BYTES = 2
HEADER_BYTES = 64
TOKEN_DTYPE = np.dtype("<u2")
WIDE_TOKEN_DTYPE = np.dtype("<u4")
MASK_DTYPE = np.dtype("u1")  # a conversation's mask shard (data/conversations.py): 0 or 1 per token
DTYPES = {1: MASK_DTYPE, 2: TOKEN_DTYPE, 4: WIDE_TOKEN_DTYPE}  # bytes per element -> dtype

DATA_FORMAT = 2  # what meta.json's format_version says for directories written now
READ_FORMATS = (1, 2)
SPLITS = ("train", "val")

PathLike = Union[str, "os.PathLike[str]"]


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest shard dtype that holds ids 0..vocab_size-1."""
    return TOKEN_DTYPE if vocab_size <= 1 << 16 else WIDE_TOKEN_DTYPE


def shard_header(count: int, dtype: np.dtype = TOKEN_DTYPE) -> bytes:
    head = MAGIC + np.array([SHARD_VERSION, np.dtype(dtype).itemsize], "<u4").tobytes()
    head += np.array([count], "<u8").tobytes()
    return head.ljust(HEADER_BYTES, b"\0")


def as_tokens(tokens: Any, dtype: np.dtype = TOKEN_DTYPE) -> np.ndarray:
    """Token ids as a flat array of ``dtype`` (uint16: ids must lie in 0..65535)."""
    arr = np.asarray(tokens)
    if arr.dtype != dtype:
        top = np.iinfo(dtype).max
        if arr.size and (arr.min() < 0 or arr.max() > top):
            raise ValueError(f"token ids must lie in 0..{top} to be stored as {np.dtype(dtype).name}")
        arr = arr.astype(dtype)
    return arr.reshape(-1)


class ShardWriter:
    """Append tokens to a shard that appears at ``path`` only on ``commit()``.

    Tokens go to ``tmp_path`` (by default a fresh hidden name beside ``path``, so the final rename
    is atomic), behind a header that says 0 tokens until ``finish()`` writes the real count: a
    file caught halfway never passes ``read_shard``. ``keep=N`` reopens an existing ``tmp_path``
    and keeps its first N tokens, to go on with a shard an interrupted run left. Used as a context
    manager it commits on success and removes the temporary file on error. ``dtype``: uint16, or
    uint32 for a vocabulary too large for it (``token_dtype``).
    """

    def __init__(self, path: PathLike, tmp_path: str | None = None, keep: int = 0,
                 dtype: np.dtype = TOKEN_DTYPE) -> None:
        self.path = os.fspath(path)
        self.tmp_path = tmp_path or temp_path(self.path)
        self.dtype = np.dtype(dtype)
        if keep:
            self._f = open(self.tmp_path, "r+b")
            self._f.truncate(HEADER_BYTES + self.dtype.itemsize * keep)
            self._f.seek(0)
            self._f.write(shard_header(0, self.dtype))
            self._f.seek(0, os.SEEK_END)
        else:
            self._f = open(self.tmp_path, "wb" if tmp_path else "xb")
            self._f.write(shard_header(0, self.dtype))
        self.count = keep

    def write(self, tokens: Any) -> None:
        arr = as_tokens(tokens, self.dtype)
        self._f.write(arr.tobytes())
        self.count += arr.size

    def flush(self) -> None:
        """Hand what was written to the OS: it survives the process being killed."""
        self._f.flush()

    def finish(self, sync: bool = False) -> str:
        """Write the real header and close (``sync``: to the disk); returns the temp file's path."""
        if not self._f.closed:
            self._f.seek(0)
            self._f.write(shard_header(self.count, self.dtype))
            self._f.flush()
            if sync:
                os.fsync(self._f.fileno())
            self._f.close()
        return self.tmp_path

    def commit(self, durable: bool = False) -> None:
        self.finish(sync=durable)
        publish(self.tmp_path, self.path, durable=durable)

    def close(self) -> None:
        """Close, keeping the temporary file as it is (an interrupted run resumes from it)."""
        self._f.close()

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


def write_shard(path: PathLike, tokens: Any, dtype: np.dtype = TOKEN_DTYPE) -> None:
    """Write ``tokens`` (ints in 0..65535, or wider with a wider ``dtype``) as a shard at
    ``path``, atomically."""
    with ShardWriter(path, dtype=dtype) as w:
        w.write(tokens)


def shard_count(path: PathLike, redo: str = "re-run `gptforge prepare ... --force` to rebuild it") -> int:
    """The token count a shard's header promises, checked against the file's size."""
    return _shard_info(path, redo)[0]


def _shard_info(path: PathLike, redo: str = "re-run `gptforge prepare ... --force` to rebuild it"
                ) -> tuple[int, np.dtype]:
    """(token count, token dtype) from a shard's header, checked against the file's size."""
    path = os.fspath(path)
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
    if version != SHARD_VERSION:
        raise GptforgeError(
            f"{path} has shard format version {version}, this gptforge reads version "
            f"{SHARD_VERSION}; {redo}"
        )
    if int(token_bytes) not in DTYPES:
        raise GptforgeError(
            f"{path} stores {token_bytes} bytes per token, expected 1 (a mask), 2 or 4; {redo}"
        )
    expected = HEADER_BYTES + int(token_bytes) * int(count)
    if size != expected:
        raise GptforgeError(
            f"{path} is {size} bytes but its header promises {int(count)} tokens "
            f"({expected} bytes): it is truncated or corrupt; {redo}"
        )
    return int(count), DTYPES[int(token_bytes)]


def read_shard(path: PathLike) -> np.ndarray:
    """Map a shard read-only: a uint16 (or uint32) ``np.memmap`` of its tokens (empty array if
    none)."""
    count, dtype = _shard_info(path)
    if count == 0:
        empty = np.zeros(0, dtype=dtype)  # mmap cannot map zero bytes
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


class TokenStream:
    """The shards of one split back to back, read through memmap, used like a 1-D uint16 array.

    ``len()``; slices ``[a:b]`` with step 1 (a view inside one shard, a copy across shards); and
    integer arrays of any shape (random windows), each index looked up in its shard. Nothing is
    read until asked for, so a split of billions of tokens costs only its memory maps.
    """

    def __init__(self, shards: Sequence[np.ndarray], name: str) -> None:
        # One dtype for the stream: the widest of its shards (a directory's are all alike).
        self.dtype = max((np.dtype(s.dtype) for s in shards), key=lambda d: d.itemsize,
                         default=TOKEN_DTYPE)
        self._shards = [s for s in shards if len(s)]
        self._starts = [0]  # _starts[i]: stream index of shard i's first token; last: the length
        for s in self._shards:
            self._starts.append(self._starts[-1] + len(s))
        self._starts_np = np.array(self._starts, dtype=np.int64)
        self.name = name
        self.shape = (self._starts[-1],)

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard_of(self, i: int) -> int:
        return bisect.bisect_right(self._starts, i) - 1

    def __getitem__(self, key: Any) -> Any:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("a TokenStream slice takes step 1 only")
            if stop <= start:
                return np.zeros(0, dtype=self.dtype)
            first, last = self._shard_of(start), self._shard_of(stop - 1)
            parts = [
                self._shards[k][max(start, self._starts[k]) - self._starts[k] :
                                min(stop, self._starts[k + 1]) - self._starts[k]]
                for k in range(first, last + 1)
            ]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} is out of range for {n} tokens")
            k = self._shard_of(i)
            return self._shards[k][i - self._starts[k]]
        idx = np.asarray(key)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"a TokenStream takes slices and integer indices, not {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"indices out of range for {n} tokens")
        which = np.searchsorted(self._starts_np, idx, side="right") - 1
        out = np.empty(idx.shape, dtype=self.dtype)
        for k in np.unique(which):
            sel = which == k
            out[sel] = self._shards[k][idx[sel] - self._starts[k]]
        return out

    def __repr__(self) -> str:
        return f"TokenStream({self.name}: {len(self):,} tokens in {len(self._shards)} shards)"


def _redo(data_dir: str) -> str:
    return f"re-run `gptforge prepare INPUT --out {data_dir} --force`"


def load_meta(data_dir: PathLike) -> dict[str, Any]:
    """Read ``data_dir/meta.json`` as written by ``prepare`` (data format 1 or 2)."""
    data_dir = os.fspath(data_dir)
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise GptforgeError(
            f"no prepared data in {data_dir}: run `gptforge prepare INPUT --out {data_dir}`"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise GptforgeError(
            f"{path} is unreadable or corrupt ({' '.join(str(e).split())}); {_redo(data_dir)}"
        ) from None
    if not isinstance(meta, dict) or "format_version" not in meta or "tokenizer" not in meta:
        raise GptforgeError(f"{path} is not gptforge metadata; {_redo(data_dir)}")
    if meta["format_version"] not in READ_FORMATS:
        raise GptforgeError(
            f"{path} has data format version {meta['format_version']} (written by gptforge "
            f"{meta.get('gptforge_version', '?')}), this gptforge {__version__} reads versions "
            f"{', '.join(map(str, READ_FORMATS))}; {_redo(data_dir)} or upgrade gptforge "
            "(pip install --upgrade gptforge)"
        )
    _check_tokenizer_file(data_dir, meta["tokenizer"])
    return meta


def _check_tokenizer_file(data_dir: str, record: Any) -> None:
    """A trained tokenizer's file must be there and be the one recorded (sha256): reading it
    here also makes its record alone rebuild it (see tokenizer/bpe.py, known tokenizers)."""
    if not isinstance(record, dict) or record.get("name") != "bpe":
        return
    path = os.path.join(data_dir, os.path.basename(str(record.get("file"))))
    if not os.path.isfile(path):
        raise GptforgeError(
            f"{path} is missing: {data_dir} was prepared with a trained tokenizer kept in that "
            f"file; restore it, or {_redo(data_dir)}")
    tokenizer_from_dict(record, directory=data_dir)


def split_shards(meta: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The shards of ``split`` as meta.json lists them (a format-1 directory: its one file)."""
    if meta["format_version"] == 1:
        return [{"file": f"{split}.bin", "tokens": meta.get(f"{split}_tokens")}]
    return list(meta.get("shards", {}).get(split, []))


def load_split(data_dir: PathLike, split: str, verify: str = "sizes") -> TokenStream:
    """The tokens of ``split`` ("train" or "val") of a prepared directory, as one stream.

    Each shard's length is checked against its header and meta.json when it is opened, and with
    ``verify="sha256"`` its sha256 against meta.json's (it reads every byte once: ``train`` does
    it at the start of a run, ``eval`` before scoring a split; BENCHMARKS.md gives the cost).
    """
    data_dir = os.fspath(data_dir)
    meta = load_meta(data_dir)
    return _stream(data_dir, split_shards(meta, split), f"{split} split", meta.get(f"{split}_tokens"),
                   verify)


def load_mask(data_dir: PathLike, split: str, verify: str = "sizes") -> TokenStream | None:
    """The mask of a conversation split (1: trained on), parallel to ``load_split``'s tokens;
    None for prepared documents."""
    data_dir = os.fspath(data_dir)
    meta = load_meta(data_dir)
    if "masks" not in meta:
        return None
    return _stream(data_dir, meta["masks"].get(split, []), f"{split} mask",
                   meta.get(f"{split}_tokens"), verify)


def _stream(data_dir: str, entries: list[dict[str, Any]], what: str, promised: Any, verify: str
            ) -> TokenStream:
    assert verify in ("sizes", "sha256"), verify
    shards = []
    for entry in entries:
        path = os.path.join(data_dir, entry["file"])
        tokens = read_shard(path)
        if len(tokens) != entry["tokens"]:
            raise GptforgeError(
                f"{path} has {len(tokens)} tokens but meta.json says {entry['tokens']}: "
                f"{_redo(data_dir)}"
            )
        if verify == "sha256" and entry.get("sha256") and file_sha256(path) != entry["sha256"]:
            raise GptforgeError(
                f"{path} is damaged: its sha256 is not the one meta.json records (a changed "
                f"byte, bit rot or a bad copy); rebuild it: {_redo(data_dir)}"
            )
        shards.append(tokens)
    stream = TokenStream(shards, f"{data_dir} ({what})")
    if len(stream) != promised:
        raise GptforgeError(
            f"the {what} shards of {data_dir} hold {len(stream)} tokens but meta.json says "
            f"{promised}: {_redo(data_dir)}"
        )
    if len(shards) == 1:
        stream.name = getattr(shards[0], "filename", None) or stream.name
    return stream
