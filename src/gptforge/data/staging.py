"""The output directory of a prepare: what identifies a result, its staging area and state, each
split's series of shards, and publishing the finished result.

All the work happens in ``DIR/.prepare/``. A split's shard in progress is
``train-000003.bin.partial``, whose header says 0 tokens until it is finished, so it never reads
as a shard. When it is full it is finished and synced, recorded in ``state.json`` together with
a checkpoint (where the input stood at the start of the piece that filled it, and every counter
there), and renamed ``train-000003.bin``. Publishing moves the shards into DIR and then writes
meta.json, which marks a complete directory; every step of it can be repeated, so a run killed
there finishes it the next time.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gptforge.atomic import publish, write_text
from gptforge.data.shards import HEADER_BYTES, TOKEN_DTYPE, ShardWriter, file_sha256, shard_count, split_shards
from gptforge.data.sources import FORMATS
from gptforge.errors import GptforgeError
from gptforge.tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, TOKENIZERS, check_vocab_size

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per shard
# --tokenizer bpe trains on at most this much of the corpus (a deterministic sample): about
# 2.5 min and 1.5 GB of memory on 2 cores (BENCHMARKS.md, "The trained byte-level BPE").
DEFAULT_TOKENIZER_SAMPLE_MB = 100
# Options that only a trained or reused BPE sets: left out of the record when unset, so the
# record of a gpt2 or char run (meta.json's prepare_options) is what it always was.
BPE_OPTIONS = ("vocab_size", "tokenizer_sample_mb", "tokenizer_sha256")
# Likewise the options of conversation data (data/conversations.py).
CHAT_OPTIONS = ("messages_field", "max_conversation_tokens")
STAGING = ".prepare"
STATE_VERSION = 1


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
    vocab_size: int | None = None  # bpe: the vocabulary to train
    tokenizer_sample_mb: float | None = None  # bpe: how much text it is trained on (0: all)
    tokenizer_sha256: str | None = None  # bpe reused from a file: that file's sha256
    messages_field: str | None = None  # conversations: the field of their messages
    max_conversation_tokens: int | None = None  # conversations: split longer ones on turns

    def record(self) -> dict[str, Any]:
        """What identifies these options (meta.json's prepare_options, a resumable run's args)."""
        optional = BPE_OPTIONS + CHAT_OPTIONS
        return {k: v for k, v in asdict(self).items() if k not in optional or v is not None}

    def check(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise GptforgeError(
                f"unknown tokenizer {self.tokenizer!r}: choose one of {', '.join(TOKENIZERS)}, "
                "or give the path of a tokenizer.json, a prepared directory or a run"
            )
        self._check_bpe()
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
        if self.max_conversation_tokens is not None and self.max_conversation_tokens < 16:
            raise GptforgeError(f"--max-conversation-tokens must be 16 or more, got "
                                f"{self.max_conversation_tokens}")
        if self.messages_field is not None and not self.messages_field:
            raise GptforgeError("--messages-field is empty: name the field with the messages")


    def _check_bpe(self) -> None:
        trained = self.tokenizer == "bpe" and self.tokenizer_sha256 is None
        if self.vocab_size is not None and not trained:
            what = ("--tokenizer PATH reuses a vocabulary of its own" if self.tokenizer == "bpe"
                    else "--tokenizer gpt2 has GPT-2's 50,257 tokens" if self.tokenizer == "gpt2"
                    else "--tokenizer char has one token per character of the text")
            raise GptforgeError(f"--vocab-size is for --tokenizer bpe, which trains a "
                                f"vocabulary; {what}: leave --vocab-size out")
        if self.tokenizer_sample_mb is not None and not trained:
            raise GptforgeError("--tokenizer-sample-mb is for --tokenizer bpe, which trains a "
                                "vocabulary: leave it out")
        if trained:
            if self.vocab_size is None:
                raise GptforgeError(f"--tokenizer bpe needs --vocab-size N ({MIN_VOCAB_SIZE} to "
                                    f"{MAX_VOCAB_SIZE:,})")
            check_vocab_size(self.vocab_size)
            mb = self.tokenizer_sample_mb
            if mb is None or isinstance(mb, bool) or not isinstance(mb, (int, float)) or mb < 0:
                raise GptforgeError(f"--tokenizer-sample-mb must be 0 (all the text) or more, "
                                    f"got {mb!r}")


class PrepareInterrupted(GptforgeError):
    """The run stopped for a reason other than its input; what it did so far is kept."""


def write_json(path: str, obj: Any, tmp: str) -> None:
    """Write JSON atomically and durably, through ``tmp`` (same file system)."""
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n", durable=True, tmp=tmp)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.bin"


class SplitShards:
    """One split's shards: the complete ones, and the one being filled (a .partial file)."""

    def __init__(self, name: str, staging: str, shard_tokens: int, shards: list[dict[str, Any]],
                 tokens: int, docs: int, dtype: np.dtype = TOKEN_DTYPE) -> None:
        self.name, self.staging, self.shard_tokens = name, staging, shard_tokens
        self.dtype = np.dtype(dtype)
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
                         and os.path.getsize(path + ".partial") >= HEADER_BYTES + self.dtype.itemsize * keep):
            raise GptforgeError(
                f"{path}.partial is shorter than the interrupted prepare recorded: pass --force "
                "to start over"
            )
        self.writer: ShardWriter | None = ShardWriter(path, path + ".partial", keep=keep,
                                                      dtype=self.dtype)

    def _path(self, index: int) -> str:
        return os.path.join(self.staging, shard_name(self.name, index))

    def start_next(self) -> None:
        """A new, empty shard to fill, after the complete ones."""
        path = self._path(len(self.shards))
        self.writer = ShardWriter(path, path + ".partial", dtype=self.dtype)

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


class Staging:
    """The output directory of one prepare: its staging area, its state, its splits."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.staging = os.path.join(out, STAGING)
        self.state_path = os.path.join(self.staging, "state.json")
        self.state: dict[str, Any] = {}

    def path(self, file: str) -> str:
        return os.path.join(self.staging, file)

    def save(self) -> None:
        write_json(self.state_path, self.state, self.state_path + ".tmp")

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


def differs(a: dict[str, Any], b: dict[str, Any]) -> str:
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


def args_of_meta(meta: dict[str, Any]) -> dict[str, Any] | None:
    if "prepare_options" not in meta:
        return None
    keys = ("path", "format", "compression", "bytes", "mtime_ns")
    return {"options": meta["prepare_options"],
            "inputs": [{k: s.get(k) for k in keys} for s in meta.get("sources", [])]}


def publish_staged(run: Staging) -> None:
    """Shards into place, then meta.json. Every step can be repeated, so a run killed here
    finishes it the next time."""
    st = run.state
    meta = st["meta"]
    new = {e["file"] for split in ("train", "val") for e in meta["shards"][split]}
    new.update(e["file"] for split in ("train", "val") for e in meta.get("masks", {}).get(split, []))
    new.update(tokenizer_files(meta))
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
            raise GptforgeError(f"{f} went missing while publishing: pass --force to redo")
    write_json(meta_path, meta, run.path("meta.json.tmp"))  # a leftover goes with .prepare
    run.discard()


def tokenizer_files(meta: dict[str, Any]) -> list[str]:
    """The tokenizer file a prepared directory holds beside its shards (a bpe's), if any."""
    file = meta.get("tokenizer", {}).get("file")
    return [os.path.basename(file)] if isinstance(file, str) else []


def old_result(out: str) -> list[str]:
    """The files of a finished result already in ``out`` (to be replaced)."""
    try:
        with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)  # not load_meta: what it lists goes, whatever state it is in
        shards = [e["file"] for split in ("train", "val") for e in split_shards(meta, split)]
        masks = [e["file"] for split in ("train", "val") for e in meta.get("masks", {}).get(split, [])]
        return shards + masks + tokenizer_files(meta)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
