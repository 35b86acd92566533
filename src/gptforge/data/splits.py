"""Which split each document's tokens go to, and the tail rule.

Documents: one ``<|endoftext|>`` goes between consecutive documents of a split (none before the
first), so one file gives exactly ``encode(text)``. The char tokenizer has no such token: its
documents are simply concatenated. Empty documents are skipped and counted.

Validation split (meta.json's ``val_split`` says which rule was used):

- "documents" (any JSON lines or Parquet input, or at least DOC_SPLIT_MIN_FILES files): a
  document goes to val when a seeded hash of its position (its number in input order, empty
  documents included) falls below ``val_fraction``. No document is split.
- "tail" (a few text files, e.g. one book): the last ``val_fraction`` of the token stream,
  rounded down, as gptforge always did; Tiny Shakespeare gives the same numbers as before.
"""

from __future__ import annotations

import decimal
import hashlib
import os
from typing import Any

import numpy as np

from gptforge.atomic import publish
from gptforge.data.shards import (
    ShardWriter,
    TokenStream,
    file_sha256,
    read_shard,
    shard_count,
    token_dtype,
)
from gptforge.data.sources import Piece, ReadOptions, Source, read_sources
from gptforge.data.staging import Options, SplitShards, Staging, shard_name
from gptforge.data.tokenize import batches, tokenized
from gptforge.tokenizer import Tokenizer

DOC_SPLIT_MIN_FILES = 100  # fewer text files than this (and no JSONL/Parquet): the tail rule
COPY_TOKENS = 16 * 1024 * 1024  # tokens per read when the tail rule copies val out (32 MB)


def val_rule(sources: list[Source], val_fraction: float) -> str:
    if val_fraction == 0:
        return "none"
    few_texts = all(s.format == "text" for s in sources) and len(sources) < DOC_SPLIT_MIN_FILES
    return "tail" if few_texts else "documents"


def val_threshold(val_fraction: float) -> int:
    # Decimal so that 0.1 is exactly a tenth of 2**64, not float's nearest value times it.
    return int(decimal.Decimal(repr(val_fraction)) * (1 << 64))


def is_val(position: int, seed: int, threshold: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < threshold


def split_sizes(n_tokens: int, val_fraction: float) -> tuple[int, int]:
    # Decimal so that 0.29 of 100 tokens is 29, not float's 28.999... rounded down to 28.
    n_val = int(decimal.Decimal(repr(val_fraction)) * n_tokens)
    return n_tokens - n_val, n_val


def rule_record(rule: str, opt: Options) -> dict[str, Any]:
    if rule == "documents":
        return {"rule": "documents", "seed": opt.seed,
                "hash": "blake2b(f'{seed}:{position}', digest_size=8) as a little-endian "
                        "integer < val_fraction * 2**64 -> val",
                "position": "the document's number in input order, from 0, empty ones included"}
    if rule == "tail":
        return {"rule": "tail", "what": "the last floor(val_fraction * tokens) tokens of the stream"}
    return {"rule": "none"}


# -----------------------------------------------------------------------------
# documents' tokens into the splits


class SplitWriter:
    """Takes each piece's tokens in input order and appends them to the right split."""

    def __init__(self, run: Staging, tok: Tokenizer, opt: Options, rule: str, sources: list[Source]
                 ) -> None:
        self.run, self.opt, self.rule, self.sources = run, opt, rule, sources
        st = run.state
        ck = st["checkpoint"]
        dtype = token_dtype(tok.vocab_size)
        self.eot = None if tok.eot_id is None else np.array([tok.eot_id], dtype=dtype)
        self.splits = {
            name: SplitShards(name, run.staging, opt.shard_tokens, st["shards"][name],
                              ck["splits"][name]["tokens"], ck["splits"][name]["docs"], dtype)
            for name in ("train", "val")
        }
        self.docs, self.empty = ck["docs"], ck["empty"]
        self.hashes: list[str | None] = list(ck["sha256"])
        self.threshold = val_threshold(opt.val_fraction)
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

    def _on_full(self, split: SplitShards) -> None:
        tmp, entry = split.finish()  # type: ignore[misc]
        split.shards.append(entry)
        for s in self.splits.values():
            if s is not split:
                s.flush()  # what the checkpoint says they hold must be in the OS's hands first
        self.run.state["checkpoint"] = self._checkpoint()
        self.run.save()
        publish(tmp, os.path.join(self.run.staging, entry["file"]), durable=True)
        split.start_next()

    def _reach_file(self, i: int) -> None:
        """Piece of file ``i`` next: the files before it were read to their end."""
        for k in range(self.file, i):
            self.hashes.append(self.sources[k].sha256)
            self.file_start += self.sources[k].bytes
        self.file = i

    def _room_for(self, n: int) -> bool:
        """Whether ``n`` more tokens go in without filling a shard of either split, without
        reaching max_tokens, and with nothing to drop (a resumed run re-reading a shard)."""
        if self.opt.max_tokens is not None and self.total() + n >= self.opt.max_tokens:
            return False
        return all(s.drop == 0 and s.writer is not None and s.writer.count + n < s.shard_tokens
                   for s in self.splits.values())

    def write_batch(self, batch: list[tuple[int, Piece]], tokens: np.ndarray, counts: np.ndarray
                    ) -> bool:
        """Add a batch of pieces (their tokens back to back, ``counts`` each); False once
        max_tokens is reached. Where no shard can fill and max_tokens cannot be reached within
        the batch (nearly always), each split gets one append for the whole batch; otherwise
        the pieces go one at a time through ``write``, which checkpoints where a shard fills.
        Either way the shards get the same tokens."""
        if not self._room_for(len(tokens) + len(batch)):  # + one separator per piece at most
            ends = np.cumsum(counts)
            for (i, piece), end, count in zip(batch, ends, counts, strict=True):
                if not self.write(i, piece, tokens[end - count : end]):
                    return False
            return True
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        offset = 0
        for (i, piece), count in zip(batch, counts.tolist(), strict=True):
            if i != self.file:
                self._reach_file(i)
            start, offset = offset, offset + count
            split = self._split_of(piece)
            if split is None:
                continue
            if self._opens_document(split, piece):
                parts[split.name].append(self.eot)
            parts[split.name].append(tokens[start:offset])
        for name, arrays in parts.items():
            if arrays:
                self.splits[name].append(np.concatenate(arrays), self._on_full)
        return True

    def _opens_document(self, split: SplitShards, piece: Piece) -> bool:
        """Count the document a first piece opens; True if a separator goes before it (one
        between consecutive documents of a split, where the tokenizer has one)."""
        if not piece.first:
            return False
        separate = bool(split.docs) and self.eot is not None
        split.docs += 1
        self.docs += 1
        return separate

    def _split_of(self, piece: Piece) -> SplitShards | None:
        """The split a piece goes to; None for an empty document (counted here)."""
        if piece.first and not piece.text:
            self.empty += 1
            self.docs += 1
            return None
        position = self.docs if piece.first else self.docs - 1
        return self.splits["val" if self.rule == "documents" and is_val(
            position, self.opt.seed, self.threshold) else "train"]

    def write(self, i: int, piece: Piece, tokens: np.ndarray) -> bool:
        """Add one piece's tokens; False once max_tokens is reached."""
        if i != self.file:  # a new file: the one before was read to its end
            self._reach_file(i)
        start = (i, piece.resume, self.docs, self.empty,
                 [(s.tokens, s.docs) for s in self.splits.values()])
        split = self._split_of(piece)
        if split is None:
            return True
        self.piece_start = start
        if self._opens_document(split, piece):
            tokens = np.concatenate([self.eot, tokens])
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


def _cut_at(pieces: Any, room: int) -> Any:
    """The pieces cut after ``room`` characters: a char vocabulary holds the characters of the
    first --max-tokens characters only (one token each), and pieces are tokenized whole and in
    batches ahead of the stop, so a character past the stop would not be in the vocabulary."""
    for i, piece in pieces:
        if room <= 0:
            return
        if len(piece.text) > room:
            piece = piece._replace(text=piece.text[:room])
        room -= len(piece.text)
        yield i, piece


def tokenize_into_splits(run: Staging, sources: list[Source], tok: Tokenizer, opt: Options, rule: str,
              workers: int, bar: Any) -> None:
    """Step 3 and 4: every piece of every document, tokenized, into its split's shards."""
    ck = run.state["checkpoint"]
    writer = SplitWriter(run, tok, opt, rule, sources)
    bar.update(ck["bytes"] - bar.n)
    start = (ck["file"], tuple(ck["resume"]) if ck["resume"] is not None else None)
    pieces = read_sources(sources, ReadOptions(opt.text_field, opt.errors), start)
    if tok.name == "char" and opt.max_tokens is not None:
        pieces = _cut_at(pieces, opt.max_tokens - writer.total())
    results = tokenized(batches(pieces), tok, workers)
    try:
        going = True
        for batch, (tokens, counts) in results:
            going = writer.write_batch(batch, tokens, counts)
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
# the tail rule


def cut_tail(run: Staging, opt: Options) -> None:
    """Move the last val_fraction of the one stream (all in train shards) into val shards.

    Each step is recorded before the next begins, and the only shard changed in place (the one
    the cut falls in) is recognisable by its new length, so a run killed anywhere here resumes.
    """
    st = run.state
    stream = st["shards"]["train"]
    n = sum(e["tokens"] for e in stream)
    n_train, n_val = split_sizes(n, opt.val_fraction)
    S = opt.shard_tokens
    tail = st.setdefault("tail", {})
    if "val" not in tail:
        tokens = TokenStream([read_shard(run.path(e["file"])) for e in stream], "stream")
        val = []
        for k, a in enumerate(range(n_train, n, S)):
            b = min(a + S, n)
            path = run.path(shard_name("val", k))
            w = ShardWriter(path, path + ".partial", dtype=tokens.dtype)
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
            whole = read_shard(path)
            w = ShardWriter(path, path + ".cut.partial", dtype=whole.dtype)
            w.write(whole[:c])
            publish(w.finish(sync=True), path, durable=True)
        keep.append({"file": stream[k]["file"], "tokens": c, "sha256": file_sha256(path)})
    for e in stream[len(keep):]:
        if os.path.exists(run.path(e["file"])):
            os.remove(run.path(e["file"]))
    st["shards"] = {"train": keep, "val": tail["val"]}
    st["phase"] = "publish"
    run.save()
