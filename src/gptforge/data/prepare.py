"""``gptforge prepare``: inputs -> documents -> tokens -> shards, in parallel and resumable.

``prepare()`` reads as its steps:

1. expand the inputs into files (sources.py) and check the options;
2. look at the output directory: the finished result of the same arguments is kept as it is, an
   unfinished one is resumed, anything else needs ``force``;
3. read the files in order as pieces of documents, tokenize batches of pieces in worker
   processes, and take the tokens back in input order, so the output is the same for any number
   of workers;
4. append each document's tokens to its split, train or val, each split a series of shards of
   ``shard_tokens`` tokens;
5. for a single-document input, move the last ``val_fraction`` of the stream into val;
6. publish: move the shards into place, then write meta.json, which marks a complete directory.

Documents: one ``<|endoftext|>`` goes between consecutive documents of a split (none before the
first), so one file gives exactly ``encode(text)``. The char tokenizer has no such token: its
documents are simply concatenated. Empty documents are skipped and counted.

Validation split (meta.json's ``val_split`` says which rule was used):

- "documents" (any JSON lines or Parquet input, or at least DOC_SPLIT_MIN_FILES files): a
  document goes to val when a seeded hash of its position (its number in input order, empty
  documents included) falls below ``val_fraction``. No document is split.
- "tail" (a few text files, e.g. one book): the last ``val_fraction`` of the token stream,
  rounded down, as gptforge always did; Tiny Shakespeare gives the same numbers as before.

Resuming: all the work happens in ``DIR/.prepare/``. A split's shard in progress is
``train-000003.bin.partial``, whose header says 0 tokens until it is finished, so it never reads
as a shard. When it is full it is finished and synced, recorded in ``state.json`` together with
a checkpoint (where the input stood at the start of the piece that filled it, and every counter
there), and renamed ``train-000003.bin``. A re-run with the same arguments checks the recorded
shards' sha256, cuts each partial shard back to what it held at the checkpoint, and reads on
from there. The tokens from a checkpoint on are the same as the first time (readers restart at
safe cuts), so the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gptforge.atomic import publish, write_text
from gptforge.data.shards import (
    DATA_FORMAT,
    HEADER_BYTES,
    TOKEN_BYTES,
    TOKEN_DTYPE,
    ShardWriter,
    TokenStream,
    file_sha256,
    load_meta,
    read_shard,
    shard_count,
    split_shards,
)
from gptforge.data.sources import (
    FORMATS,
    Piece,
    ReadOptions,
    Source,
    expand_inputs,
    read_sources,
)
from gptforge.errors import GptforgeError
from gptforge.metrics import progress_bar
from gptforge.tokenizer import (
    TOKENIZERS,
    CharTokenizer,
    Tokenizer,
    get_tokenizer,
    tokenizer_from_dict,
)
from gptforge.version import __version__

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per shard
DOC_SPLIT_MIN_FILES = 100  # fewer text files than this (and no JSONL/Parquet): the tail rule
BATCH_CHARS = 1024 * 1024  # text per worker task
IN_FLIGHT = 2  # tasks per worker queued or running: memory ~ workers * IN_FLIGHT * BATCH_CHARS
PARALLEL_MIN_BYTES = 4 * 1024 * 1024  # smaller inputs are tokenized in this process
COPY_TOKENS = 16 * 1024 * 1024  # tokens per read when the tail rule copies val out (32 MB)
STAGING = ".prepare"
STATE_VERSION = 1
SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class Options:
    """Everything that decides the output (the number of workers does not)."""

    tokenizer: str = "gpt2"
    val_fraction: float = 0.1
    seed: int = 0
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    max_tokens: int | None = None
    format: str | None = None
    text_field: str = "text"
    errors: str = "strict"

    def check(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise GptforgeError(
                f"unknown tokenizer {self.tokenizer!r}: choose one of {', '.join(TOKENIZERS)}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise GptforgeError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.errors not in ("strict", "replace"):
            raise GptforgeError(f"--errors must be 'strict' or 'replace', got {self.errors!r}")
        if self.format is not None and self.format not in FORMATS:
            raise GptforgeError(f"--format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if not self.text_field:
            raise GptforgeError("--text-field is empty: name the field or column with the text")
        if self.shard_tokens < 1:
            raise GptforgeError(f"--shard-tokens must be 1 or more, got {self.shard_tokens}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise GptforgeError(f"--max-tokens must be 1 or more, got {self.max_tokens}")


class PrepareInterrupted(GptforgeError):
    """The run stopped for a reason other than its input; what it did so far is kept."""


# -----------------------------------------------------------------------------
# tokenizing in worker processes, results in input order

_worker_tok: Tokenizer | None = None


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:  # a worker whose prepare was killed must not linger
        time.sleep(1.0)
    os._exit(1)


def _init_worker(tokenizer: dict[str, Any], parent: int) -> None:
    global _worker_tok
    _worker_tok = tokenizer_from_dict(tokenizer)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of each text, back to back (uint16), and how many each text gave."""
    assert _worker_tok is not None
    arrays = [_worker_tok.encode_array(t) for t in texts]
    counts = np.array([len(a) for a in arrays], dtype=np.int64)
    tokens = np.concatenate(arrays).astype(TOKEN_DTYPE) if arrays else np.zeros(0, TOKEN_DTYPE)
    return tokens, counts


Batch = list[tuple[int, Piece]]  # (file index, piece)


def _batches(pieces: Iterator[tuple[int, Piece]]) -> Iterator[Batch]:
    batch: Batch = []
    chars = 0
    for item in pieces:
        batch.append(item)
        chars += len(item[1].text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenized(batches: Iterator[Batch], tok: Tokenizer, workers: int
               ) -> Iterator[tuple[Batch, tuple[np.ndarray, np.ndarray]]]:
    """(batch, its tokens) for every batch, in order, tokenized by ``workers`` processes."""
    global _worker_tok
    if workers <= 1:
        _worker_tok = tok
        for batch in batches:
            yield batch, _encode([p.text for _, p in batch])
        return
    # fork: workers start at once and inherit the tokenizer already built (spawn elsewhere).
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=_init_worker, initargs=(tok.to_dict(), os.getpid()))
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_encode, [p.text for _, p in batch])))
            if len(pending) >= IN_FLIGHT * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    except BrokenProcessPool:
        raise PrepareInterrupted(
            "a tokenizer process died (out of memory?): run the same command again to continue, "
            "with fewer --workers if memory is short"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -----------------------------------------------------------------------------
# the output: staging directory, state, splits of shards


def _write_json(path: str, obj: Any, tmp: str) -> None:
    """Write JSON atomically and durably, through ``tmp`` (same file system)."""
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n", durable=True, tmp=tmp)


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.bin"


class _Split:
    """One split's shards: the complete ones, and the one being filled (a .partial file)."""

    def __init__(self, name: str, staging: str, shard_tokens: int, shards: list[dict[str, Any]],
                 tokens: int, docs: int) -> None:
        self.name, self.staging, self.shard_tokens = name, staging, shard_tokens
        self.shards = shards
        self.tokens = tokens  # tokens this split has been given (those dropped included)
        self.docs = docs  # non-empty documents it has been given
        committed = sum(s["tokens"] for s in shards)
        # Resuming: tokens the complete shards already hold are dropped as they come again;
        # the partial shard keeps what it held at the checkpoint.
        self.drop = max(0, committed - tokens)
        keep = max(0, tokens - committed)
        path = self._path(len(shards))
        if keep and not (os.path.exists(path + ".partial")
                         and os.path.getsize(path + ".partial") >= HEADER_BYTES + TOKEN_BYTES * keep):
            raise GptforgeError(
                f"{path}.partial is shorter than the interrupted prepare recorded: pass --force "
                "to start over"
            )
        self.writer: ShardWriter | None = ShardWriter(path, path + ".partial", keep=keep)

    def _path(self, index: int) -> str:
        return os.path.join(self.staging, _shard_name(self.name, index))

    def start_next(self) -> None:
        """A new, empty shard to fill, after the complete ones."""
        path = self._path(len(self.shards))
        self.writer = ShardWriter(path, path + ".partial")

    def append(self, tokens: np.ndarray, on_full: Any) -> None:
        self.tokens += len(tokens)
        if self.drop:
            cut = min(self.drop, len(tokens))
            tokens, self.drop = tokens[cut:], self.drop - cut
        while len(tokens):
            assert self.writer is not None
            room = self.shard_tokens - self.writer.count
            self.writer.write(tokens[:room])
            tokens = tokens[room:]
            if self.writer.count == self.shard_tokens:
                on_full(self)

    def finish(self) -> tuple[str, dict[str, Any]] | None:
        """Finish the shard being filled (synced): (its temp path, its record), or None if empty."""
        w = self.writer
        if w is None:
            return None
        if w.count == 0:
            w.abort()
            self.writer = None
            return None
        tmp = w.finish(sync=True)
        return tmp, {"file": os.path.basename(w.path), "tokens": w.count, "sha256": file_sha256(tmp)}

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _Run:
    """The output directory of one prepare: its staging area, its state, its splits."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.staging = os.path.join(out, STAGING)
        self.state_path = os.path.join(self.staging, "state.json")
        self.state: dict[str, Any] = {}

    def path(self, file: str) -> str:
        return os.path.join(self.staging, file)

    def save(self) -> None:
        _write_json(self.state_path, self.state, self.state_path + ".tmp")

    def load(self) -> dict[str, Any] | None:
        """The state an unfinished run left, if any (and of this version)."""
        try:
            with open(self.state_path, encoding="utf-8") as f:
                state = json.load(f)
            return state if isinstance(state, dict) and state.get("version") == STATE_VERSION else None
        except (OSError, ValueError):
            return None

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def verify(self, entries: list[dict[str, Any]]) -> None:
        """Check complete shards an interrupted run left before building on them."""
        for e in entries:
            p = self.path(e["file"])
            if not os.path.exists(p) and os.path.exists(p + ".partial"):
                publish(p + ".partial", p, durable=True)  # killed between the record and the rename
            ok = os.path.exists(p) and shard_count(p) == e["tokens"] and file_sha256(p) == e["sha256"]
            if not ok:
                raise GptforgeError(
                    f"{p} is not the shard the interrupted prepare recorded (changed or missing): "
                    "pass --force to start over"
                )


def _differs(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The first argument that differs between two runs, for a person to read."""
    oa, ob = a.get("options", {}), b.get("options", {})
    for key in sorted(set(oa) | set(ob)):
        if oa.get(key) != ob.get(key):
            return f"{key} {oa.get(key)!r} then, {ob.get(key)!r} now"
    ia, ib = a.get("inputs", []), b.get("inputs", [])
    if len(ia) != len(ib):
        return f"{len(ia)} input files then, {len(ib)} now"
    for x, y in zip(ia, ib, strict=True):
        if x != y:
            if x.get("path") != y.get("path"):
                return f"input {x.get('path')} then, {y.get('path')} now"
            return f"input {y.get('path')} has changed since"
    return "written by an older gptforge"


def _args_of_meta(meta: dict[str, Any]) -> dict[str, Any] | None:
    if "prepare_options" not in meta:
        return None
    keys = ("path", "format", "compression", "bytes", "mtime_ns")
    return {"options": meta["prepare_options"],
            "inputs": [{k: s.get(k) for k in keys} for s in meta.get("sources", [])]}


# -----------------------------------------------------------------------------
# the split rules


def _val_rule(sources: list[Source], val_fraction: float) -> str:
    if val_fraction == 0:
        return "none"
    few_texts = all(s.format == "text" for s in sources) and len(sources) < DOC_SPLIT_MIN_FILES
    return "tail" if few_texts else "documents"


def _val_threshold(val_fraction: float) -> int:
    # Decimal so that 0.1 is exactly a tenth of 2**64, not float's nearest value times it.
    return int(decimal.Decimal(repr(val_fraction)) * (1 << 64))


def _is_val(position: int, seed: int, threshold: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < threshold


def _split_sizes(n_tokens: int, val_fraction: float) -> tuple[int, int]:
    # Decimal so that 0.29 of 100 tokens is 29, not float's 28.999... rounded down to 28.
    n_val = int(decimal.Decimal(repr(val_fraction)) * n_tokens)
    return n_tokens - n_val, n_val


def _rule_record(rule: str, opt: Options) -> dict[str, Any]:
    if rule == "documents":
        return {"rule": "documents", "seed": opt.seed,
                "hash": "blake2b(f'{seed}:{position}', digest_size=8) as a little-endian "
                        "integer < val_fraction * 2**64 -> val",
                "position": "the document's number in input order, from 0, empty ones included"}
    if rule == "tail":
        return {"rule": "tail", "what": "the last floor(val_fraction * tokens) tokens of the stream"}
    return {"rule": "none"}


# -----------------------------------------------------------------------------
# step 4: documents' tokens into the splits


class _Writer:
    """Takes each piece's tokens in input order and appends them to the right split."""

    def __init__(self, run: _Run, tok: Tokenizer, opt: Options, rule: str, sources: list[Source]
                 ) -> None:
        self.run, self.opt, self.rule, self.sources = run, opt, rule, sources
        st = run.state
        ck = st["checkpoint"]
        self.eot = None if tok.eot_id is None else np.array([tok.eot_id], dtype=TOKEN_DTYPE)
        self.splits = {
            name: _Split(name, run.staging, opt.shard_tokens, st["shards"][name],
                         ck["splits"][name]["tokens"], ck["splits"][name]["docs"])
            for name in ("train", "val")
        }
        self.docs, self.empty = ck["docs"], ck["empty"]
        self.hashes: list[str | None] = list(ck["sha256"])
        self.threshold = _val_threshold(opt.val_fraction)
        self.file_start = sum(s.bytes for s in sources[: ck["file"]])  # progress: bytes before
        self.file = ck["file"]
        # Where the current piece started, with every counter there: what a shard filled
        # during this piece records as its checkpoint (kept small: it changes every piece).
        self.piece_start: tuple[Any, ...] | None = None

    def total(self) -> int:
        return self.splits["train"].tokens + self.splits["val"].tokens

    def _checkpoint(self) -> dict[str, Any]:
        assert self.piece_start is not None
        i, resume, docs, empty, counts = self.piece_start
        return {
            "file": i, "resume": list(resume), "docs": docs, "empty": empty,
            "splits": {n: {"tokens": t, "docs": d} for n, (t, d) in zip(self.splits, counts)},
            "sha256": list(self.hashes),  # of files 0 .. i-1 (a piece never spans two files)
            "bytes": self.file_start,
        }

    def _on_full(self, split: _Split) -> None:
        tmp, entry = split.finish()  # type: ignore[misc]
        split.shards.append(entry)
        for s in self.splits.values():
            if s is not split:
                s.flush()  # what the checkpoint says they hold must be in the OS's hands first
        self.run.state["checkpoint"] = self._checkpoint()
        self.run.save()
        publish(tmp, os.path.join(self.run.staging, entry["file"]), durable=True)
        split.start_next()

    def write(self, i: int, piece: Piece, tokens: np.ndarray) -> bool:
        """Add one piece's tokens; False once max_tokens is reached."""
        if i != self.file:  # a new file: the one before was read to its end
            for k in range(self.file, i):
                self.hashes.append(self.sources[k].sha256)
                self.file_start += self.sources[k].bytes
            self.file = i
        if piece.first and not piece.text:
            self.empty += 1
            self.docs += 1
            return True
        position = self.docs if piece.first else self.docs - 1
        self.piece_start = (i, piece.resume, self.docs, self.empty,
                            [(s.tokens, s.docs) for s in self.splits.values()])
        split = self.splits["val" if self.rule == "documents" and _is_val(
            position, self.opt.seed, self.threshold) else "train"]
        if piece.first:
            if split.docs and self.eot is not None:
                tokens = np.concatenate([self.eot, tokens])
            split.docs += 1
            self.docs += 1
        room = None if self.opt.max_tokens is None else self.opt.max_tokens - self.total()
        if room is not None and len(tokens) >= room:
            split.append(tokens[:room], self._on_full)
            return False
        split.append(tokens, self._on_full)
        return True

    def finish(self, stopped: bool) -> None:
        """The stream ended (``stopped``: at max_tokens): finish the shards being filled and
        record the end."""
        # None for a file not read to its end (how far the reader read ahead does not count)
        self.hashes.extend(None if stopped else s.sha256 for s in self.sources[self.file :])
        for split in self.splits.values():
            done = split.finish()
            split.writer = None
            if done is None:
                continue
            tmp, entry = done
            split.shards.append(entry)
            self.run.save()
            publish(tmp, os.path.join(self.run.staging, entry["file"]), durable=True)
        self.run.state["end"] = {
            "docs": self.docs, "empty": self.empty,
            "splits": {n: {"tokens": s.tokens, "docs": s.docs} for n, s in self.splits.items()},
            "sha256": self.hashes,
            "stopped_at_max_tokens": stopped,
        }

    def close(self) -> None:
        for s in self.splits.values():
            s.close()


def _tokenize(run: _Run, sources: list[Source], tok: Tokenizer, opt: Options, rule: str,
              workers: int, bar: Any) -> None:
    """Step 3 and 4: every piece of every document, tokenized, into its split's shards."""
    ck = run.state["checkpoint"]
    writer = _Writer(run, tok, opt, rule, sources)
    bar.update(ck["bytes"] - bar.n)
    start = (ck["file"], tuple(ck["resume"]) if ck["resume"] is not None else None)
    pieces = read_sources(sources, ReadOptions(opt.text_field, opt.errors), start)
    results = _tokenized(_batches(pieces), tok, workers)
    try:
        going = True
        for batch, (tokens, counts) in results:
            ends = np.cumsum(counts)
            for (i, piece), end, count in zip(batch, ends, counts, strict=True):
                going = writer.write(i, piece, tokens[end - count : end])
                if not going:
                    break
            i, piece = batch[-1]
            bar.update(writer.file_start + piece.done - bar.n)
            bar.set_postfix_str(f"{bar.format_sizeof(writer.total())} tokens, "
                                f"{bar.format_sizeof(writer.docs)} documents", refresh=False)
            if not going:
                break
        writer.finish(stopped=not going)
    finally:
        results.close()  # stops the workers
        writer.close()


# -----------------------------------------------------------------------------
# step 5: the tail rule


def _cut_tail(run: _Run, opt: Options) -> None:
    """Move the last val_fraction of the one stream (all in train shards) into val shards.

    Each step is recorded before the next begins, and the only shard changed in place (the one
    the cut falls in) is recognisable by its new length, so a run killed anywhere here resumes.
    """
    st = run.state
    stream = st["shards"]["train"]
    n = sum(e["tokens"] for e in stream)
    n_train, n_val = _split_sizes(n, opt.val_fraction)
    S = opt.shard_tokens
    tail = st.setdefault("tail", {})
    if "val" not in tail:
        tokens = TokenStream([read_shard(run.path(e["file"])) for e in stream], "stream")
        val = []
        for k, a in enumerate(range(n_train, n, S)):
            b = min(a + S, n)
            path = run.path(_shard_name("val", k))
            w = ShardWriter(path, path + ".partial")
            for i in range(a, b, COPY_TOKENS):
                w.write(tokens[i : min(i + COPY_TOKENS, b)])
            tmp = w.finish(sync=True)
            val.append({"file": os.path.basename(path), "tokens": b - a, "sha256": file_sha256(tmp)})
            publish(tmp, path, durable=True)
        tail["val"] = val
        run.save()
    k, c = divmod(n_train, S)
    keep = list(stream[:k])
    if c:
        path = run.path(stream[k]["file"])
        if shard_count(path) != c:  # not cut yet (a killed run may have cut it already)
            w = ShardWriter(path, path + ".cut.partial")
            w.write(read_shard(path)[:c])
            publish(w.finish(sync=True), path, durable=True)
        keep.append({"file": stream[k]["file"], "tokens": c, "sha256": file_sha256(path)})
    for e in stream[len(keep):]:
        if os.path.exists(run.path(e["file"])):
            os.remove(run.path(e["file"]))
    st["shards"] = {"train": keep, "val": tail["val"]}
    st["phase"] = "publish"
    run.save()


# -----------------------------------------------------------------------------
# step 6: publish


def _publish(run: _Run) -> None:
    """Shards into place, then meta.json. Every step can be repeated, so a run killed here
    finishes it the next time."""
    st = run.state
    meta = st["meta"]
    new = {e["file"] for split in ("train", "val") for e in meta["shards"][split]}
    meta_path = os.path.join(run.out, "meta.json")
    if os.path.exists(meta_path):  # first out, last in: the directory never looks complete
        os.remove(meta_path)  # with a mix of old and new shards
    for f in st["replaces"]:  # what an older result in the directory consists of
        if f not in new and os.path.exists(os.path.join(run.out, f)):
            os.remove(os.path.join(run.out, f))
    for f in sorted(new):
        if os.path.exists(run.path(f)):
            publish(run.path(f), os.path.join(run.out, f), durable=True)
        elif not os.path.exists(os.path.join(run.out, f)):
            raise GptforgeError(f"shard {f} went missing while publishing: pass --force to redo")
    _write_json(meta_path, meta, run.path("meta.json.tmp"))  # a leftover goes with .prepare
    run.discard()


def _old_result(out: str) -> list[str]:
    """The shard files of a finished result already in ``out`` (to be replaced)."""
    try:
        meta = load_meta(out)
    except GptforgeError:
        return []
    return [e["file"] for split in ("train", "val") for e in split_shards(meta, split)]


# -----------------------------------------------------------------------------


def _char_tokenizer(sources: list[Source], opt: Options, show: bool) -> CharTokenizer:
    """The char vocabulary: every character the run will tokenize (a pass over the inputs)."""
    chars: set[str] = set()
    n = 0
    total = sum(s.bytes for s in sources)
    with _bar(total, "vocabulary", show) as bar:
        for i, piece in read_sources(sources, ReadOptions(opt.text_field, opt.errors)):
            text = piece.text
            if opt.max_tokens is not None:
                text = text[: opt.max_tokens - n]
            chars.update(text)
            n += len(text)
            bar.update(sum(s.bytes for s in sources[:i]) + piece.done - bar.n)
            if opt.max_tokens is not None and n >= opt.max_tokens:
                break
    if not chars:
        raise GptforgeError("the inputs hold no text: pass files with text in them")
    if len(chars) > 1 << 16:
        raise GptforgeError(
            f"the inputs hold {len(chars)} distinct characters, more than the 65536 a uint16 "
            "shard can store: use --tokenizer gpt2"
        )
    return CharTokenizer("".join(sorted(chars)))


def _bar(total: int, desc: str, show: bool) -> Any:
    """Bytes read, MB/s and ETA; tokens and documents go in its postfix. On a terminal only."""
    return progress_bar(total=total, unit="B", unit_scale=True, desc=desc, disable=not show,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B "
                                   "{rate_fmt} ETA {remaining}{postfix}")


def _meta(run: _Run, sources: list[Source], tok: dict[str, Any], opt: Options, rule: str
          ) -> dict[str, Any]:
    st = run.state
    end = st["end"]
    shards = st["shards"]
    n = {s: sum(e["tokens"] for e in shards[s]) for s in ("train", "val")}
    built = tokenizer_from_dict(tok)
    docs = {s: end["splits"][s]["docs"] for s in ("train", "val")}
    if rule == "tail" and n["val"]:
        docs = {"train": None, "val": None}  # the cut falls inside a document
    return {
        "format_version": DATA_FORMAT,
        "tokenizer": tok,
        "vocab_size": built.vocab_size,
        "eot_id": built.eot_id,
        "train_tokens": n["train"],
        "val_tokens": n["val"],
        "val_fraction": opt.val_fraction,
        "val_split": _rule_record(rule, opt),
        "separator": (f"one {SEPARATOR} ({built.eot_id}) between consecutive documents of a split"
                      if built.eot_id is not None else "none: documents are concatenated"),
        "documents": {"read": end["docs"], "empty_skipped": end["empty"], **docs},
        "max_tokens": opt.max_tokens,
        "stopped_at_max_tokens": end["stopped_at_max_tokens"],
        "shard_tokens": opt.shard_tokens,
        "shards": shards,
        "sources": [
            {"name": s.name, "path": s.path, "format": s.format, "compression": s.compression,
             "bytes": s.bytes, "mtime_ns": s.mtime_ns, "sha256": h}
            for s, h in zip(sources, end["sha256"], strict=True)
        ],
        "prepare_options": asdict(opt),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gptforge_version": __version__,
    }


def _finished(run: _Run, args: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """The finished result in ``run.out`` if it is what ``args`` would make (and not ``force``);
    refuses one made with other arguments unless ``force``."""
    if not os.path.isfile(os.path.join(run.out, "meta.json")):
        return None
    try:
        meta = load_meta(run.out)
        old_args = _args_of_meta(meta)
        why = _differs(old_args, args) if old_args else "written by an older gptforge"
    except GptforgeError:
        meta, old_args, why = None, None, "its meta.json cannot be read"
    if meta is not None and old_args == args and not force:
        for split in ("train", "val"):  # cheap: sizes and headers, not sha256
            for e in split_shards(meta, split):
                path = os.path.join(run.out, e["file"])
                if not os.path.isfile(path) or shard_count(path) != e["tokens"]:
                    raise GptforgeError(
                        f"{path} is missing or not what meta.json lists: pass --force to "
                        "prepare the data again"
                    )
        state = run.load()
        if state is None or state["args"] == args:
            run.discard()  # what a run killed just after publishing left
        return meta
    if not force:
        raise GptforgeError(
            f"{run.out} already holds prepared data made with other arguments ({why}): pass "
            "--force to replace it, or choose another --out"
        )
    return None


def _start(run: _Run, args: dict[str, Any], force: bool) -> tuple[bool, list[str]]:
    """Resume the unfinished run of the same arguments, or start afresh (an unfinished run of
    other arguments only with ``force``). Returns (resumed, directories created)."""
    state = run.load()
    if state is not None and state["args"] != args and not force:
        raise GptforgeError(
            f"{run.out} holds an unfinished prepare with other arguments "
            f"({_differs(state['args'], args)}): run that command again to finish it, or pass "
            "--force to start over"
        )
    if state is not None and state["args"] == args:
        run.state = state
        if state["phase"] == "stream":
            for split in ("train", "val"):
                run.verify(state["shards"][split])
        return True, []
    created = []  # directories this call makes, removed again if its input turns out bad
    d = os.path.abspath(run.out)
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    run.discard()
    try:
        os.makedirs(run.staging)
    except OSError as e:
        raise GptforgeError(
            f"cannot create --out {run.out} ({e.strerror}): choose another directory"
        ) from None
    return False, created


def _fresh_state(args: dict[str, Any], tokenizer: dict[str, Any]) -> dict[str, Any]:
    nothing = {"tokens": 0, "docs": 0}
    return {
        "version": STATE_VERSION, "args": args, "tokenizer": tokenizer, "phase": "stream",
        "shards": {"train": [], "val": []},
        "checkpoint": {"file": 0, "resume": None, "docs": 0, "empty": 0, "sha256": [],
                       "bytes": 0, "splits": {"train": dict(nothing), "val": dict(nothing)}},
    }


def prepare(
    inputs: list[str],
    out: str | os.PathLike[str],
    tokenizer: str = "gpt2",
    val_fraction: float = 0.1,
    force: bool = False,
    errors: str = "strict",
    url: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    *,
    format: str | None = None,
    text_field: str = "text",
    workers: int | None = None,
    shard_tokens: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (files, directories, globs, named datasets) into shards in ``out``.

    Returns the metadata written to ``out/meta.json`` plus a ``"run"`` entry for this call:
    ``status`` ("done", "resumed" or "unchanged": ``out`` already held this result), ``seconds``
    and ``bytes_read``. A bad input raises ``GptforgeError`` and leaves ``out`` as it was; an
    interrupted run (killed, Ctrl-C, disk full) leaves ``out/.prepare/`` to be resumed by running
    the same call again.
    """
    t0 = time.perf_counter()
    out = os.fspath(out)
    opt = Options(tokenizer, val_fraction, seed,
                  DEFAULT_SHARD_TOKENS if shard_tokens is None else shard_tokens, max_tokens,
                  format, text_field, errors)
    opt.check()
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers < 1:
        raise GptforgeError(f"--workers must be 1 or more, got {workers}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise GptforgeError(f"output {out} exists and is not a directory: choose another --out")

    # 1. the files, and what identifies this run
    sources = expand_inputs(inputs, format, url, cache_dir, out)
    args = {"options": asdict(opt), "inputs": [s.identity() for s in sources]}
    total_bytes = sum(s.bytes for s in sources)
    rule = _val_rule(sources, val_fraction)

    # 2. what the output directory holds: this result already, an unfinished run, other data
    run = _Run(out)
    finished = _finished(run, args, force)
    if finished is not None:
        return {**finished, "run": {"status": "unchanged", "seconds": time.perf_counter() - t0,
                                    "bytes_read": 0}}
    resumed, created = _start(run, args, force)

    show = progress  # progress_bar draws on a terminal only; in a pipe, the summary line
    try:
        if not resumed:
            tok_dict = (_char_tokenizer(sources, opt, show) if tokenizer == "char"
                        else get_tokenizer(tokenizer)).to_dict()
            run.state = _fresh_state(args, tok_dict)
            run.save()
        tok = tokenizer_from_dict(run.state["tokenizer"])
        bytes_before = run.state["checkpoint"]["bytes"]

        # 3, 4. tokenize into the splits
        if run.state["phase"] == "stream":
            use = workers if total_bytes >= PARALLEL_MIN_BYTES else 1
            with _bar(total_bytes, "prepare", show) as bar:
                _tokenize(run, sources, tok, opt, rule, use, bar)
            _check_sizes(run, opt, rule)
            run.state["phase"] = "tail" if rule == "tail" else "publish"
            run.save()

        # 5. the tail rule
        if run.state["phase"] == "tail":
            _cut_tail(run, opt)

        # 6. publish
        if "meta" not in run.state:
            run.state["meta"] = _meta(run, sources, run.state["tokenizer"], opt, rule)
            run.state["replaces"] = _old_result(out)
            run.save()
        _publish(run)
        meta = run.state["meta"]
    except PrepareInterrupted:
        raise
    except GptforgeError:
        if not resumed:  # a bad input: nothing of this run stays, older data stays as it was
            run.discard()
            for d in created:  # deepest first
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        raise
    except OSError as e:
        raise PrepareInterrupted(
            f"cannot write {out} ({e.strerror or e}): fix that (free disk space?), then run the "
            "same command again to continue"
        ) from None
    seconds = time.perf_counter() - t0
    return {**meta, "run": {"status": "resumed" if resumed else "done", "seconds": seconds,
                            "bytes_read": max(total_bytes - bytes_before, 0)}}


def _check_sizes(run: _Run, opt: Options, rule: str) -> None:
    """Enough tokens for training, and a validation split if one was asked for."""
    end = run.state["end"]
    n = end["splits"]["train"]["tokens"] + end["splits"]["val"]["tokens"]
    if rule == "tail":
        n_train, n_val = _split_sizes(n, opt.val_fraction)
    else:
        n_train, n_val = end["splits"]["train"]["tokens"], end["splits"]["val"]["tokens"]
    if n == 0:
        raise GptforgeError(
            f"the inputs hold no text ({end['empty']} empty documents): pass files with text in them"
        )
    if n_train < 2:
        raise GptforgeError(
            f"the inputs give only {n} tokens ({n_train} for training): pass more text or a "
            "smaller --val-fraction"
        )
    if rule == "documents" and n_val == 0:
        raise GptforgeError(
            f"none of the {end['docs'] - end['empty']} documents was drawn for validation at "
            f"--val-fraction {opt.val_fraction}: pass more documents, a larger --val-fraction, "
            "or --val-fraction 0"
        )
