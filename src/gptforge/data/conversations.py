"""Conversation files -> token shards plus mask shards: what ``prepare`` does with chat data.

Input: JSON lines (one conversation per line) or Parquet (one per row) whose ``messages`` field
(``--messages-field``) is OpenAI's list of ``{"role", "content"}`` messages, as in OpenAI's
fine-tuning files and Hugging Face chat datasets. ``detect`` recognises such files on its own:
JSON lines or Parquet whose first record has no text field but a ``messages`` field.

Layout (meta.json's ``conversations`` says it too): each conversation becomes its ChatML ids
(tokenizer/chat.py); a split is its conversations one after another, one ``<|endoftext|>``
between two, in the usual token shards. Beside each token shard is a mask shard
(``train-000000.mask``: the same header with 1 byte per token, the same count), 1 where the
token is trained on (an assistant's content and the ``<|im_end|>`` after it), 0 elsewhere
(separators included). Training packs whole conversations into rows of ``train.seq_len + 1``
tokens (data/loader.py, ``RowLoader``) and checks there, at start-up, that every conversation
fits one: prepare does not know the model's context. ``--max-conversation-tokens N`` splits
longer conversations here instead, on turn boundaries (before a user message that follows an
assistant's), each part keeping the conversation's leading system messages; how many were
split is reported. Bad input (a missing or unknown role, content that is not a string, an empty
conversation or one without an assistant message, one exchange longer than N) is one line naming
the file and line (or row), and nothing is published.

Conversation sets are small next to pre-training corpora, so this runs in one process and an
interrupted run starts over (nothing half-written is ever published: prepare's staging area).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gptforge.data.shards import MASK_DTYPE, ShardWriter, file_sha256, token_dtype
from gptforge.data.sources import (
    Source,
    _import_pyarrow,
    _open_bytes,
    _parse_json_line,
)
from gptforge.data.splits import is_val, val_threshold
from gptforge.data.staging import Options, Staging, shard_name
from gptforge.errors import GptforgeError
from gptforge.tokenizer import Tokenizer, message_problem, render
from gptforge.tokenizer.chat import turn_starts

MESSAGES = "messages"
MASK_SUFFIX = ".mask"
LAYOUT = ("ChatML ids of each conversation, one after another, one <|endoftext|> between two; "
          "training packs whole conversations into rows of train.seq_len + 1 tokens")
MASK_NOTE = ("a .mask shard beside each token shard, 1 byte per token: 1 = trained on (an "
             "assistant's content and its <|im_end|>), 0 = context")


def mask_name(split: str, index: int) -> str:
    return shard_name(split, index).removesuffix(".bin") + MASK_SUFFIX


# -----------------------------------------------------------------------------
# reading


def _first_record(source: Source) -> dict[str, Any] | list[str] | None:
    """A JSON lines file's first object, or a Parquet file's column names."""
    if source.format == "parquet":
        _, pq = _import_pyarrow()
        try:
            return list(pq.ParquetFile(source.path).schema_arrow.names)
        except Exception:  # noqa: BLE001 - the reader says what is wrong, later
            return None
    with _open_bytes(source) as (stream, _):
        for line in stream:
            if line.strip():
                try:
                    obj = _parse_json_line(line, "replace")
                except ValueError:
                    return None
                return obj if isinstance(obj, dict) else None
    return None


def detect(sources: list[Source], text_field: str, messages_field: str | None) -> str | None:
    """The field conversations are read from, or None for documents: ``--messages-field`` when
    given, else ``messages`` when the first input is JSON lines or Parquet whose first record has
    no ``text_field`` but a ``messages`` field."""
    if messages_field is not None:
        bad = [s.name for s in sources if s.format == "text"]
        if bad:
            raise GptforgeError(f"{bad[0]} is a text file, but --messages-field reads "
                                "conversations from JSON lines or Parquet: leave it out, or "
                                "give conversation files")
        return messages_field
    if not sources or sources[0].format == "text":
        return None
    first = _first_record(sources[0])
    if first is not None and text_field not in first and MESSAGES in first:
        return MESSAGES
    return None


def _records(source: Source, name: str, errors: str) -> Iterator[tuple[str, Any]]:
    """(where, the field's value) for each conversation of a file, where = "FILE: line N"."""
    if source.format == "parquet":
        pa, pq = _import_pyarrow()
        try:
            pf = pq.ParquetFile(source.path)
            if name not in pf.schema_arrow.names:
                raise GptforgeError(f"{source.name} has no column {name!r} (its columns: "
                                    f"{', '.join(map(repr, pf.schema_arrow.names))}): pass "
                                    "--messages-field with the column of the conversations")
            row = 0
            for batch in pf.iter_batches(batch_size=1024, columns=[name], use_threads=False):
                for value in batch.column(0).to_pylist():
                    yield f"{source.name}: row {row}", value
                    row += 1
        except (pa.ArrowException, OSError) as e:
            raise GptforgeError(f"{source.name} is not a readable Parquet file "
                                f"({' '.join(str(e).split())}): download it again") from None
        return
    if source.format != "jsonl":
        raise GptforgeError(f"{source.name} is a text file: conversations come from JSON lines "
                            "or Parquet files")
    with _open_bytes(source) as (stream, _):
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"{source.name}: line {number}"
            try:
                obj = _parse_json_line(line, errors)
            except ValueError as e:
                raise GptforgeError(f"{where} is not valid JSON ({str(e).splitlines()[0]}): fix "
                                    "or remove that line") from None
            if not isinstance(obj, dict) or name not in obj:
                raise GptforgeError(f"{where} has no {name!r} field: each line must be an object "
                                    f"with a list of messages under {name!r}")
            yield where, obj[name]


def conversations(sources: list[Source], name: str, errors: str
                  ) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(where, messages) for every conversation of every file, in order, each checked."""
    for source in sources:
        for where, messages in _records(source, name, errors):
            problem = message_problem(messages, need_assistant=True)
            if problem:
                raise GptforgeError(f"{where}: {problem}: fix or remove that conversation")
            yield where, messages


# -----------------------------------------------------------------------------
# over-long conversations


def split_turns(tok: Tokenizer, messages: list[dict[str, str]], limit: int, where: str
                ) -> list[tuple[list[int], list[int]]]:
    """The conversation's (ids, mask) in parts of at most ``limit`` tokens, cut on turn
    boundaries, each part with the leading system messages; one part if it fits."""
    whole = render(tok, messages)
    if len(whole[0]) <= limit:
        return [whole]
    system = 0
    while system < len(messages) and messages[system]["role"] == "system":
        system += 1
    cuts = [c for c in turn_starts(messages) if c > system] + [len(messages)]
    parts, start = [], system
    while start < len(messages):
        best = None
        for end in cuts:
            if end <= start:
                continue
            candidate = render(tok, messages[:system] + messages[start:end])
            if len(candidate[0]) > limit:
                break
            best = (end, candidate)
        if best is None:
            raise GptforgeError(f"{where}: one exchange of this conversation is longer than "
                                f"--max-conversation-tokens {limit}: shorten it, or raise the limit")
        start, part = best
        if any(part[1]):  # a part of user turns alone would train nothing
            parts.append(part)
    return parts


# -----------------------------------------------------------------------------
# writing


@dataclass
class _SplitOut:
    """One split's token and mask shards, rolled over every ``shard_tokens`` tokens."""

    name: str
    run: Staging
    shard_tokens: int
    dtype: np.dtype
    shards: list[dict[str, Any]] = field(default_factory=list)
    masks: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0  # conversations
    tokens: int = 0
    trained: int = 0
    _writers: tuple[ShardWriter, ShardWriter] | None = None

    def append(self, ids: list[int], mask: list[int]) -> None:
        self.count += 1
        self.trained += sum(mask)
        ids_a, mask_a = np.asarray(ids), np.asarray(mask, dtype=MASK_DTYPE)
        while len(ids_a):
            if self._writers is None:
                k = len(self.shards)
                self._writers = tuple(ShardWriter(self.run.path(f), dtype=d) for f, d in
                                      ((shard_name(self.name, k), self.dtype),
                                       (mask_name(self.name, k), MASK_DTYPE)))
            tokens, masks = self._writers
            room = self.shard_tokens - tokens.count
            tokens.write(ids_a[:room])
            masks.write(mask_a[:room])
            self.tokens += len(ids_a[:room])
            ids_a, mask_a = ids_a[room:], mask_a[room:]
            if tokens.count == self.shard_tokens:
                self.finish()

    def finish(self) -> None:
        if self._writers is None:
            return
        for writer, records in zip(self._writers, (self.shards, self.masks)):
            writer.commit(durable=True)
            records.append({"file": os.path.basename(writer.path), "tokens": writer.count,
                            "sha256": file_sha256(writer.path)})
        self._writers = None

    def abort(self) -> None:
        for writer in self._writers or ():
            writer.abort()


@dataclass
class Written:
    """What ``write_conversations`` put in the staging area, for meta.json."""

    splits: dict[str, _SplitOut]
    conversations: int
    split_up: int  # conversations split on turn boundaries (--max-conversation-tokens)
    longest: int


def write_conversations(run: Staging, sources: list[Source], tok: Tokenizer, opt: Options,
                        field_name: str) -> Written:
    """Every conversation, checked and rendered, into its split's shards in ``run``'s staging
    area; the validation split is drawn per conversation by prepare's seeded hash."""
    dtype = token_dtype(tok.vocab_size)
    splits = {s: _SplitOut(s, run, opt.shard_tokens, dtype) for s in ("train", "val")}
    threshold = val_threshold(opt.val_fraction)
    total = split_up = longest = 0
    try:
        for position, (where, messages) in enumerate(conversations(sources, field_name, opt.errors)):
            limit = opt.max_conversation_tokens
            parts = (split_turns(tok, messages, limit, where) if limit else [render(tok, messages)])
            split_up += len(parts) > 1
            out = splits["val" if opt.val_fraction and is_val(position, opt.seed, threshold)
                         else "train"]
            for ids, mask in parts:
                longest = max(longest, len(ids))
                if out.count:  # the separator between two conversations: never trained on
                    ids, mask = [tok.eot_id, *ids], [0, *mask]
                out.append(ids, mask)
            total += 1
        for s in splits.values():
            s.finish()
    except BaseException:
        for s in splits.values():
            s.abort()
        raise
    if not splits["train"].count:
        raise GptforgeError("the inputs hold no conversation for training: pass more, or a "
                            "smaller --val-fraction")
    return Written(splits, total, split_up, longest)


def conversation_meta(written: Written, field_name: str, limit: int | None) -> dict[str, Any]:
    """meta.json's ``conversations`` entry (and ``masks``, its mask shards)."""
    s = written.splits
    return {
        "format": "chatml",
        "field": field_name,
        "layout": LAYOUT,
        "mask": MASK_NOTE,
        "conversations": {"read": written.conversations, "train": s["train"].count,
                          "val": s["val"].count},
        "trained_tokens": {"train": s["train"].trained, "val": s["val"].trained},
        "longest_tokens": written.longest,
        "max_conversation_tokens": limit,
        "split_on_turns": written.split_up,
    }
