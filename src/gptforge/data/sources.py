"""Inputs -> documents: which files the inputs name, the format of each, and one small reader per
format yielding the text of its documents in pieces that can be tokenized independently.

Formats (by extension, or forced with ``--format``), each optionally compressed (.gz, .zst, .xz,
.bz2) except Parquet:

- text (.txt, .md, ..., or no extension): the whole file is one document.
- jsonl (.jsonl, .json): one JSON object per line; the document is its ``text_field``.
- parquet (.parquet): one document per row of the ``text_field`` column, read a batch of rows
  at a time.

A reader yields ``Piece``s in order. Every piece carries ``resume``: where the reader can start
again to yield that same piece's text, which is what makes an interrupted ``prepare`` resumable.
A new format is one function ``read_X(source, options, resume) -> Iterator[Piece]`` in
``READERS``.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from gptforge.data.named import NAMED_DATASETS, fetch_named_dataset
from gptforge.data.shards import file_sha256
from gptforge.errors import GptforgeError

FORMATS = ("text", "jsonl", "parquet")
SUFFIXES = {
    ".txt": "text", ".md": "text", ".markdown": "text", ".text": "text", ".rst": "text", "": "text",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet",
}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".xz": "xz", ".bz2": "bz2"}
SUPPORTED = (".txt/.md/no extension (text), .jsonl/.json (JSON lines), .parquet; text and JSON "
             "lines may be compressed (.gz, .zst, .xz, .bz2)")
DATA_EXTRA = "pip install 'gptforge[data]'"

CHUNK_BYTES = 2 * 1024 * 1024  # bytes read at a time, and the size of a text file's pieces
PIECE_CHARS = 2 * 1024 * 1024  # a longer JSON or Parquet document is cut into pieces of about this
MAX_CARRY_CHARS = 64 * 1024 * 1024  # see read_text
PARQUET_BATCH_ROWS = 1024


@dataclass
class Source:
    name: str  # as the user would write it: the argument, or a file found under it
    path: str  # absolute
    format: str
    compression: str | None
    bytes: int
    mtime_ns: int
    sha256: str | None = None  # of the file's bytes; set once a reader has read it to the end

    def identity(self) -> dict[str, Any]:
        """What must not change for an interrupted prepare of this file to be resumed."""
        return {"path": self.path, "format": self.format, "compression": self.compression,
                "bytes": self.bytes, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    errors: str = "strict"  # invalid UTF-8: "strict" stops, "replace" substitutes U+FFFD


class Piece(NamedTuple):
    text: str  # text to tokenize; "" only for an empty document
    doc: int  # the document's number within its file (0-based, empty documents included)
    first: bool  # the first piece of its document
    resume: tuple[int, ...]  # what the file's reader takes to start again at this piece
    done: int  # bytes of the file read so far (for progress)


# -----------------------------------------------------------------------------
# which files


def _format_of(path: str, forced: str | None) -> tuple[str, str | None]:
    stem, ext = os.path.splitext(os.path.basename(path).lower())
    compression = COMPRESSIONS.get(ext)
    if compression:
        stem, ext = os.path.splitext(stem)
    fmt = forced or SUFFIXES.get(ext)
    if fmt is None:
        raise GptforgeError(
            f"{path}: unknown file type {ext!r}; supported: {SUPPORTED}; or pass --format "
            f"{'|'.join(FORMATS)} to read it as one of them"
        )
    if fmt == "parquet" and compression:
        raise GptforgeError(
            f"{path}: a compressed Parquet file cannot be read in row groups: decompress it "
            "(Parquet compresses its pages itself)"
        )
    return fmt, compression


def _walk(directory: str, skip: str | None = None) -> list[str]:
    """Files under directory, recursively, sorted by path (a/z.txt before b.txt), hidden files
    and directories skipped, and the directory ``skip`` (prepare's own output)."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not (skip and os.path.realpath(os.path.join(root, d)) == skip)]
        found.extend(os.path.join(root, f) for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: os.path.relpath(p, directory).split(os.sep))


def expand_inputs(
    inputs: list[str], forced_format: str | None = None, url: str | None = None,
    cache_dir: str | None = None, out: str | None = None,
) -> list[Source]:
    """The files ``inputs`` name, in order: files, directories (recursive, sorted, hidden files
    skipped), glob patterns (sorted matches) and named datasets (fetched once, verified). A
    directory ``out`` (where the tokens go) is never read, even inside an input directory."""
    skip = os.path.realpath(out) if out else None
    if not inputs:
        raise GptforgeError("no inputs given: gptforge prepare INPUT [INPUT ...] --out DIR")
    names: list[str] = []
    for arg in inputs:
        if arg in NAMED_DATASETS and not os.path.exists(arg):
            names.append(arg)
        elif os.path.isdir(arg):
            files = _walk(arg, skip)
            if not files:
                raise GptforgeError(
                    f"directory {arg} has no files to read (hidden files are skipped): "
                    "check the path"
                )
            names.extend(files)
        elif os.path.exists(arg):
            names.append(arg)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            files = [f for m in matches for f in (_walk(m, skip) if os.path.isdir(m) else [m])]
            if not files:
                raise GptforgeError(f"the pattern {arg} matches no files: check it")
            names.extend(files)
        else:
            known = ", ".join(NAMED_DATASETS)
            raise GptforgeError(
                f"input {arg} does not exist: check the path (named datasets: {known})"
            )
    sources = []
    for name in names:
        path = name
        if name in NAMED_DATASETS and not os.path.exists(name):
            path = fetch_named_dataset(name, url=url, cache_dir=cache_dir)
        if not os.path.isfile(path):
            raise GptforgeError(f"input {path} is not a regular file: pass files or directories")
        fmt, compression = _format_of(path, forced_format)
        st = os.stat(path)
        sources.append(Source(name=name, path=os.path.abspath(path), format=fmt,
                              compression=compression, bytes=st.st_size, mtime_ns=st.st_mtime_ns))
    return sources


# -----------------------------------------------------------------------------
# byte streams: plain or decompressed, hashing the file's own bytes as they are read


class _Hashing(io.RawIOBase):
    """A file read through sha256: ``sha`` and ``count`` cover the bytes read so far."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)
        self.sha.update(memoryview(b)[:n])
        self.count += n
        return n


class _Zstd(io.RawIOBase):
    """Decompressed zstd frames, one after another; a file cut inside a frame is an error (the
    zstandard package's own stream reader ends quietly there)."""

    def __init__(self, raw: Any, zstandard: Any) -> None:
        self._raw, self._zstd = raw, zstandard
        self._frame: Any = None  # the frame being decompressed, if inside one
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._out:
            data = self._raw.read(64 * 1024)
            if not data:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            out = []
            while data:
                if self._frame is None:
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
                out.append(self._frame.decompress(data))
                data = b""
                if self._frame.eof:
                    data, self._frame = self._frame.unused_data, None
            self._out = memoryview(b"".join(out))
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def _import_zstandard() -> Any:
    try:
        import zstandard
    except ImportError:
        raise GptforgeError(
            f"reading .zst files needs the zstandard package: {DATA_EXTRA}"
        ) from None
    return zstandard


def _corrupt(source: Source, e: BaseException) -> GptforgeError:
    detail = " ".join(str(e).split()) or type(e).__name__
    return GptforgeError(
        f"{source.name} is a truncated or corrupt {source.compression} file ({detail}): "
        "download or compress it again"
    )


@contextmanager
def _open_bytes(source: Source) -> Iterator[tuple[Any, _Hashing]]:
    """(decompressed binary stream, the hashing raw file under it); errors become one line."""
    try:
        f = open(source.path, "rb", buffering=0)
    except OSError as e:
        raise GptforgeError(
            f"cannot read {source.name} ({e.strerror}): check that it exists and is readable"
        ) from None
    raw = _Hashing(f)
    buffered = io.BufferedReader(raw, CHUNK_BYTES)
    # What reading may raise: a file cut short (EOFError), bad data (the codec's own error).
    failures: tuple[type[BaseException], ...] = (OSError, EOFError)
    try:
        if source.compression is None:
            stream: Any = buffered
        elif source.compression == "gzip":
            import gzip
            import zlib

            stream = gzip.GzipFile(fileobj=buffered, mode="rb")
            failures += (zlib.error,)
        elif source.compression == "bz2":
            import bz2

            stream = bz2.BZ2File(buffered)
        elif source.compression == "xz":
            import lzma

            stream = lzma.LZMAFile(buffered)
            failures += (lzma.LZMAError,)
        else:
            zstandard = _import_zstandard()
            stream = io.BufferedReader(_Zstd(buffered, zstandard), CHUNK_BYTES)
            failures += (zstandard.ZstdError,)
        try:
            yield stream, raw
        except failures as e:
            if source.compression is None:
                detail = " ".join(str(e).split()) or type(e).__name__
                raise GptforgeError(f"cannot read {source.name} ({detail}): check the file") from None
            raise _corrupt(source, e) from None
    finally:
        f.close()


def _skip(stream: Any, n: int) -> None:
    """Read and drop n bytes (so the file's hash still covers them)."""
    while n > 0:
        got = len(stream.read(min(n, CHUNK_BYTES)))
        if got == 0:
            raise GptforgeError("an input file is shorter than when prepare was interrupted: "
                                "pass --force to start over")
        n -= got


def _in(source: Source) -> str:
    return " of its decompressed text" if source.compression else ""


# -----------------------------------------------------------------------------
# safe cuts: where text can be split without changing its tokens

# The last place in a text where a non-whitespace character is followed by whitespace. GPT-2's
# split pattern never puts such a pair in one piece, so encoding text[:cut] and text[cut:]
# separately gives exactly the tokens of encoding text. Python's \S (not str.isspace()) is
# stricter than the tokenizer's, and the right side is plain ASCII whitespace, so every cut
# found here is a real boundary for tiktoken too. (Char-level tokens do not care where.)
_LAST_CUT = re.compile(r".*\S(?=[\t\n\r ])", re.DOTALL)
_NEXT_CUT = re.compile(r"\S(?=[\t\n\r ])")


def cut_point(text: str, start: int = 0, end: int | None = None) -> int:
    """Index of the last safe cut in text[start:end] after start, or 0 if there is none."""
    m = _LAST_CUT.match(text, start, len(text) if end is None else end)
    return m.end() if m else 0


def split_text(text: str, max_chars: int | None = None) -> Iterator[tuple[int, str]]:
    """(offset, piece) for pieces of about max_chars (PIECE_CHARS), cut only at safe cuts (so a
    text with no whitespace stays whole)."""
    max_chars = PIECE_CHARS if max_chars is None else max_chars
    start = 0
    while len(text) - start > max_chars:
        cut = cut_point(text, start, start + max_chars)
        if not cut:
            m = _NEXT_CUT.search(text, start + max_chars)
            if not m:
                break
            cut = m.end()
        yield start, text[start:cut]
        start = cut
    yield start, text[start:]


# -----------------------------------------------------------------------------
# one reader per format


def read_text(source: Source, opt: ReadOptions, resume: tuple[int, ...] | None = None
              ) -> Iterator[Piece]:
    """The file is one document: its text in pieces of about CHUNK_BYTES, cut at safe cuts.

    Also checks the file (no NUL bytes, valid UTF-8 unless errors="replace"). ``resume`` is the
    byte offset (in the decompressed text) of a piece's start. With errors="replace" the text is
    decoded with surrogateescape, so that byte offsets stay exact, and each piece is then decoded
    again from its own bytes with "replace": the same characters as decoding the whole file,
    because a cut before ASCII whitespace never falls inside a UTF-8 sequence, valid or not.
    """
    start = resume[0] if resume else 0
    replace = opt.errors == "replace"
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape" if replace else "strict")

    def piece(text: str, at: int, done: int) -> Piece:
        if replace:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return Piece(text, 0, at == 0, (at,), done)

    with _open_bytes(source) as (stream, raw):
        _skip(stream, start)
        offset = start  # bytes of decompressed text read before the current chunk
        at = start  # byte offset of carry's start: where the next piece begins
        carry = ""
        while True:
            chunk = stream.read(CHUNK_BYTES)
            final = not chunk
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise GptforgeError(
                    f"{source.name} looks binary (NUL byte at byte offset {offset + nul}"
                    f"{_in(source)}): pass text files only"
                )
            pending = len(decoder.getstate()[0])  # undecoded bytes held over from the last chunk
            try:
                text = carry + decoder.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                raise GptforgeError(
                    f"{source.name} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte "
                    f"offset {bad}{_in(source)}): convert it to UTF-8, or pass --errors replace "
                    "to substitute U+FFFD"
                ) from None
            offset += len(chunk)
            if final:
                if text or at == 0:  # an empty file is an empty document
                    yield piece(text, at, raw.count)
                break
            # carry held no cut, so only look from its last character on: linear in the file.
            cut = cut_point(text, max(len(carry) - 1, 0))
            if cut == 0 and len(text) > MAX_CARRY_CHARS:
                # No safe cut in 64M characters (no whitespace at all): cut anyway so memory
                # stays bounded; the tokens may differ at this one place from whole-text BPE.
                cut = len(text)
            if cut:
                head = text[:cut]
                yield piece(head, at, raw.count)
                at += len(head.encode("utf-8", "surrogateescape"))
            carry = text[cut:]
    source.sha256 = raw.sha.hexdigest()


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _pieces(text: str, doc: int, char: int, resume: tuple[int, ...], done: int) -> Iterator[Piece]:
    """One document's pieces from character ``char`` on; resume + (char offset,) restarts each."""
    for off, part in split_text(text[char:] if char else text):
        yield Piece(part, doc, char + off == 0, resume + (char + off,), done)


def _parse_json_line(line: bytes, errors: str) -> Any:
    """The line's JSON value. orjson parses valid UTF-8 JSON ~2.5x faster than the standard
    library, to the same objects; a line it refuses (invalid UTF-8, lone surrogates, NaN, a BOM,
    not JSON) goes to ``json`` instead, which accepts what it always did and raises the errors
    this reader reports."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line.decode("utf-8", errors))


def read_jsonl(source: Source, opt: ReadOptions, resume: tuple[int, ...] | None = None
               ) -> Iterator[Piece]:
    """One document per line: the line's JSON object's ``text_field``. Blank lines are skipped.

    ``resume`` is (byte offset of the line, lines before it, its document number, char offset).
    """
    offset, line_no, doc, char = resume or (0, 0, 0, 0)
    field = opt.text_field
    with _open_bytes(source) as (stream, raw):
        _skip(stream, offset)
        for line in stream:
            start = offset
            offset += len(line)
            line_no += 1
            if not line.strip():
                continue
            where = f"{source.name}: line {line_no}"
            try:
                obj = _parse_json_line(line, opt.errors)
            except UnicodeDecodeError as e:
                raise GptforgeError(
                    f"{where} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte offset "
                    f"{start + e.start}{_in(source)}): convert the file to UTF-8, or pass "
                    "--errors replace to substitute U+FFFD"
                ) from None
            except json.JSONDecodeError as e:
                raise GptforgeError(
                    f"{where} is not valid JSON ({e.msg} at column {e.colno}): fix or remove "
                    "that line"
                ) from None
            if not isinstance(obj, dict):
                raise GptforgeError(
                    f"{where} is {_json_type(obj)}, not a JSON object with a {field!r} field: "
                    "each line must be one object"
                )
            if field not in obj:
                fields = ", ".join(map(repr, obj)) or "none"
                raise GptforgeError(
                    f"{where} has no {field!r} field (its fields: {fields}): pass --text-field "
                    "with the field that holds the text"
                )
            text = obj[field]
            if not isinstance(text, str):
                raise GptforgeError(
                    f"{where}: field {field!r} is {_json_type(text)}, not a string: pass "
                    "--text-field with the field that holds the text"
                )
            yield from _pieces(text, doc, char, (start, line_no - 1, doc), raw.count)
            doc += 1
            char = 0
    source.sha256 = raw.sha.hexdigest()


def _import_pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise GptforgeError(f"reading Parquet files needs pyarrow: {DATA_EXTRA}") from None
    return pa, pq


def read_parquet(source: Source, opt: ReadOptions, resume: tuple[int, ...] | None = None
                 ) -> Iterator[Piece]:
    """One document per row: the ``text_field`` column, read PARQUET_BATCH_ROWS rows at a time
    from one row group at a time, so memory holds one row group's column at most.

    ``resume`` is (row group, row within it, document number = row within the file, char offset).
    """
    pa, pq = _import_pyarrow()
    group, skip, doc, char = resume or (0, 0, 0, 0)
    field = opt.text_field
    try:
        pf = pq.ParquetFile(source.path)
        schema = pf.schema_arrow
        rows = pf.metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise GptforgeError(
            f"{source.name} is not a readable Parquet file ({' '.join(str(e).split())}): "
            "download it again"
        ) from None
    if field not in schema.names:
        raise GptforgeError(
            f"{source.name} has no column {field!r} (its columns: "
            f"{', '.join(map(repr, schema.names))}): pass --text-field with the column that "
            "holds the text"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or (pa.types.is_dictionary(kind) and pa.types.is_string(kind.value_type))):
        raise GptforgeError(
            f"{source.name}: column {field!r} holds {kind}, not text: pass --text-field with the "
            "column that holds the text"
        )
    group_rows = [pf.metadata.row_group(k).num_rows for k in range(pf.num_row_groups)]
    g = group
    try:
        for g in range(group, pf.num_row_groups):
            first_row = sum(group_rows[:g])  # document number of the group's first row
            batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[g],
                                      columns=[field], use_threads=False)
            for batch in batches:
                values = batch.column(0).to_pylist()
                if skip:
                    drop = min(skip, len(values))
                    values, skip = values[drop:], skip - drop
                for text in values:
                    if text is None:
                        raise GptforgeError(
                            f"{source.name}: row {doc} has no text (null in column {field!r}): "
                            "drop such rows or fill them in"
                        )
                    done = source.bytes * (doc + 1) // max(rows, 1)
                    yield from _pieces(text, doc, char, (g, doc - first_row, doc), done)
                    doc += 1
                    char = 0
    except (pa.ArrowException, OSError) as e:
        raise GptforgeError(
            f"{source.name} is a truncated or corrupt Parquet file (row group {g}: "
            f"{' '.join(str(e).split())}): download it again"
        ) from None
    source.sha256 = file_sha256(source.path)


READERS = {"text": read_text, "jsonl": read_jsonl, "parquet": read_parquet}


def read_sources(
    sources: list[Source], opt: ReadOptions, start: tuple[int, tuple[int, ...] | None] = (0, None)
) -> Iterator[tuple[int, Piece]]:
    """(file index, piece) for every piece of every file in order, from ``start`` = (file index,
    that file's reader's resume point or None for its beginning)."""
    first, resume = start
    for i in range(first, len(sources)):
        reader = READERS[sources[i].format]
        for piece in reader(sources[i], opt, resume if i == first else None):
            yield i, piece
