"""``gptforge prepare``: inputs -> documents -> tokens -> shards, in parallel and resumable.

``prepare()`` reads as its steps:

1. expand the inputs into files (sources.py), check the options, and find a tokenizer given by
   path (vocab.py);
2. take DIR's lock (one prepare writes a directory at a time), then look at the output
   directory: the finished result of the same arguments is kept as it is, an unfinished one is
   resumed, anything else needs ``force`` (staging.py); a new run builds its vocabulary (char:
   a pass over the text; bpe: trained on the text or a sample of it, vocab.py) and keeps it in
   the staging area;
3. read the files in order as pieces of documents, tokenize batches of pieces in worker
   processes, and take the tokens back in input order, so the output is the same for any number
   of workers (tokenize.py);
4. append each document's tokens to its split, train or val, each split a series of shards of
   ``shard_tokens`` tokens (splits.py);
5. for a single-document input, move the last ``val_fraction`` of the stream into val (splits.py);
6. publish: move the shards into place, then write meta.json, which marks a complete directory
   (staging.py).

Resuming: a re-run with the same arguments checks the recorded shards' sha256, cuts each partial
shard back to what it held at its checkpoint, and reads on from there. The tokens from a
checkpoint on are the same as the first time (readers restart at safe cuts), so the result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from typing import Any

from gptforge.console import progress_bar
import gptforge.data.conversations as chat
from gptforge.data.shards import DATA_FORMAT, load_meta, shard_count, split_shards
from gptforge.data.sources import ReadOptions, Source, expand_inputs, read_sources
from gptforge.data.splits import (
    cut_tail,
    rule_record,
    split_sizes,
    tokenize_into_splits,
    val_rule,
)
from gptforge.data.staging import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_TOKENIZER_SAMPLE_MB,
    STATE_VERSION,
    Options,
    PrepareInterrupted,
    Staging,
    args_of_meta,
    differs,
    old_result,
    publish_staged,
)
from gptforge.data.shards import file_sha256
from gptforge.data.vocab import resolve_tokenizer, stage_tokenizer, staged_tokenizer, train_tokenizer
from gptforge.errors import GptforgeError
from gptforge.rundir import hold_run_lock
from gptforge.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    get_tokenizer,
    require_chat,
    tokenizer_from_dict,
    train_bpe,
)
from gptforge.version import __version__

PARALLEL_MIN_BYTES = 4 * 1024 * 1024  # smaller inputs are tokenized in this process
SEPARATOR = "<|endoftext|>"

__all__ = ["DEFAULT_SHARD_TOKENS", "PrepareInterrupted", "prepare"]


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


def _meta(run: Staging, sources: list[Source], tok: dict[str, Any], opt: Options, rule: str
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
        "val_split": rule_record(rule, opt),
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
        "prepare_options": opt.record(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gptforge_version": __version__,
    }


def _finished(run: Staging, args: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """The finished result in ``run.out`` if it is what ``args`` would make (and not ``force``);
    refuses one made with other arguments unless ``force``."""
    if not os.path.isfile(os.path.join(run.out, "meta.json")):
        return None
    try:
        meta = load_meta(run.out)
        old_args = args_of_meta(meta)
        why = differs(old_args, args) if old_args else "written by an older gptforge"
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


def _start(run: Staging, args: dict[str, Any], force: bool) -> tuple[bool, list[str]]:
    """Resume the unfinished run of the same arguments, or start afresh (an unfinished run of
    other arguments only with ``force``). Returns (resumed, directories created)."""
    state = run.load()
    if state is not None and state["args"] != args and not force:
        raise GptforgeError(
            f"{run.out} holds an unfinished prepare with other arguments "
            f"({differs(state['args'], args)}): run that command again to finish it, or pass "
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
    vocab_size: int | None = None,
    tokenizer_sample_mb: float | None = None,
    messages_field: str | None = None,
    max_conversation_tokens: int | None = None,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (files, directories, globs, named datasets) into shards in ``out``.

    ``tokenizer``: "gpt2", "char", "bpe" (a byte-level BPE of ``vocab_size`` tokens trained on
    the inputs, or on a sample of about ``tokenizer_sample_mb`` MB of them; 0: all), or the path
    of a tokenizer to reuse (a tokenizer.json, a prepared directory, a run or a checkpoint).

    Conversations (OpenAI's ``messages`` in JSON lines or Parquet, recognised on their own or
    read from ``messages_field``) become ChatML ids plus mask shards (data/conversations.py);
    ``max_conversation_tokens`` splits longer ones on turn boundaries.

    Returns the metadata written to ``out/meta.json`` plus a ``"run"`` entry for this call:
    ``status`` ("done", "resumed" or "unchanged": ``out`` already held this result), ``seconds``
    and ``bytes_read``. A bad input raises ``GptforgeError`` and leaves ``out`` as it was; an
    interrupted run (killed, Ctrl-C, disk full) leaves ``out/.prepare/`` to be resumed by running
    the same call again.
    """
    t0 = time.perf_counter()
    out = os.fspath(out)
    kind, given = resolve_tokenizer(tokenizer)
    if kind == "bpe" and given is None and tokenizer_sample_mb is None:
        tokenizer_sample_mb = DEFAULT_TOKENIZER_SAMPLE_MB
    opt = Options(kind, val_fraction, seed,
                  DEFAULT_SHARD_TOKENS if shard_tokens is None else shard_tokens, max_tokens,
                  format, text_field, errors, vocab_size, tokenizer_sample_mb,
                  None if given is None else given.sha256, messages_field, max_conversation_tokens)
    opt.check()
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers < 1:
        raise GptforgeError(f"--workers must be 1 or more, got {workers}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise GptforgeError(f"output {out} exists and is not a directory: choose another --out")

    # 1. the files, and what identifies this run
    sources = expand_inputs(inputs, format, url, cache_dir, out)
    field = chat.detect(sources, text_field, messages_field)
    if field is None and max_conversation_tokens is not None:
        raise GptforgeError("--max-conversation-tokens is for conversations (a messages field): "
                            "leave it out for documents")
    if field is not None:
        opt = dataclasses.replace(opt, messages_field=field)
    args = {"options": opt.record(), "inputs": [s.identity() for s in sources]}
    # 2. one prepare at a time writes DIR
    with hold_run_lock(out, what="prepare"):
        if field is not None:
            return _prepare_conversations(out, sources, args, opt, given, force, t0)
        return _prepare_locked(out, sources, args, opt, given, force, workers, progress, t0)


def _prepare_locked(out: str, sources: list[Source], args: dict[str, Any], opt: Options,
                    given: BPETokenizer | None, force: bool, workers: int, progress: bool,
                    t0: float) -> dict[str, Any]:
    total_bytes = sum(s.bytes for s in sources)
    rule = val_rule(sources, opt.val_fraction)

    # 2. what the output directory holds: this result already, an unfinished run, other data
    run = Staging(out)
    finished = _finished(run, args, force)
    if finished is not None:
        return {**finished, "run": {"status": "unchanged", "seconds": time.perf_counter() - t0,
                                    "bytes_read": 0}}
    resumed, created = _start(run, args, force)

    try:
        bytes_before = _produce(run, args, sources, opt, rule, workers, resumed, show=progress,
                                given=given)
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
    return {**run.state["meta"], "run": {"status": "resumed" if resumed else "done", "seconds": seconds,
                                         "bytes_read": max(total_bytes - bytes_before, 0)}}


def _chat_tokenizer(sources: list[Source], opt: Options, given: BPETokenizer | None):  # noqa: ANN202
    """The vocabulary of conversation data: GPT-2's grown by the ChatML tokens, a BPE trained on
    the messages' text (it reserves them), or a reused BPE that has them."""
    fix = ("prepare conversations with --tokenizer gpt2 or bpe, or a BPE that gptforge trained "
           "with its chat tokens")
    if opt.tokenizer == "char":
        require_chat(CharTokenizer("x"), "--tokenizer char", fix)
    if opt.tokenizer == "gpt2":
        return GPT2Tokenizer(chat=True)
    if given is not None:
        require_chat(given, f"the tokenizer {given._source}", fix)
        return given
    assert opt.vocab_size is not None
    texts = (m["content"] for _, msgs in chat.conversations(sources, opt.messages_field, opt.errors)
             for m in msgs)
    return train_bpe(texts, opt.vocab_size)


def _prepare_conversations(out: str, sources: list[Source], args: dict[str, Any], opt: Options,
                           given: BPETokenizer | None, force: bool, t0: float) -> dict[str, Any]:
    """Conversations into token and mask shards, published as prepare publishes documents."""
    run = Staging(out)
    finished = _finished(run, args, force)
    if finished is not None:
        return {**finished, "run": {"status": "unchanged", "seconds": time.perf_counter() - t0,
                                    "bytes_read": 0}}
    _, created = _start(run, args, force)
    run.discard()  # never resumed: it starts over (see conversations.py)
    os.makedirs(run.staging)
    try:
        tok = _chat_tokenizer(sources, opt, given)
        record = stage_tokenizer(run, tok) if isinstance(tok, BPETokenizer) else tok.to_dict()
        written = chat.write_conversations(run, sources, tok, opt, opt.messages_field)
    except BaseException:
        run.discard()
        for d in created:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise
    sp = written.splits
    run.state = {"end": {"docs": written.conversations, "empty": 0, "stopped_at_max_tokens": False,
                         "sha256": [None] * len(sources),
                         "splits": {n: {"tokens": x.tokens, "docs": x.count} for n, x in sp.items()}},
                 "shards": {n: x.shards for n, x in sp.items()}}
    for s in sources:  # every file was read to its end
        s.sha256 = s.sha256 or file_sha256(s.path)
    run.state["end"]["sha256"] = [s.sha256 for s in sources]
    meta = _meta(run, sources, record, opt, "documents" if opt.val_fraction else "none")
    meta["masks"] = {n: x.masks for n, x in sp.items()}
    meta["separator"] = f"one <|endoftext|> ({tok.eot_id}) between consecutive conversations"
    meta["conversations"] = chat.conversation_meta(written, opt.messages_field,
                                                   opt.max_conversation_tokens)
    run.state.update(meta=meta, replaces=old_result(out))
    publish_staged(run)
    return {**meta, "run": {"status": "done", "seconds": time.perf_counter() - t0,
                            "bytes_read": sum(s.bytes for s in sources)}}


def _vocabulary(run: Staging, sources: list[Source], opt: Options, given: BPETokenizer | None,
                show: bool) -> dict[str, Any]:
    """The record of the tokenizer this run uses, built (char, a trained BPE) or reused."""
    if opt.tokenizer == "char":
        return _char_tokenizer(sources, opt, show).to_dict()
    if opt.tokenizer != "bpe":
        return get_tokenizer(opt.tokenizer).to_dict()
    if given is None:
        with _bar(sum(s.bytes for s in sources), "tokenizer", show) as bar:
            given = train_tokenizer(sources, opt, bar)
    return stage_tokenizer(run, given)


def _produce(run: Staging, args: dict[str, Any], sources: list[Source], opt: Options, rule: str,
             workers: int, resumed: bool, show: bool, given: BPETokenizer | None = None) -> int:
    """Steps 3 to 6, each resumed where an interrupted run left it (``run.state["phase"]``).
    Returns the input bytes an earlier, interrupted run had already read. ``show``: a progress
    bar (drawn on a terminal only; in a pipe the summary line says it all)."""
    if not resumed:
        run.state = _fresh_state(args, _vocabulary(run, sources, opt, given, show))
        run.save()
    tok = staged_tokenizer(run)
    bytes_before = run.state["checkpoint"]["bytes"]
    total_bytes = sum(s.bytes for s in sources)

    # 3, 4. tokenize into the splits
    if run.state["phase"] == "stream":
        use = workers if total_bytes >= PARALLEL_MIN_BYTES else 1
        with _bar(total_bytes, "prepare", show) as bar:
            tokenize_into_splits(run, sources, tok, opt, rule, use, bar)
        _check_sizes(run, opt, rule)
        run.state["phase"] = "tail" if rule == "tail" else "publish"
        run.save()

    # 5. the tail rule
    if run.state["phase"] == "tail":
        cut_tail(run, opt)

    # 6. publish
    if "meta" not in run.state:
        run.state["meta"] = _meta(run, sources, run.state["tokenizer"], opt, rule)
        run.state["replaces"] = old_result(run.out)
        run.save()
    publish_staged(run)
    return bytes_before


def summary(meta: dict[str, Any], out: str) -> str:
    """prepare's one line: what it wrote, from what, how fast (or that DIR had it already)."""
    run, docs = meta["run"], meta["documents"]
    shards = {s: len(meta["shards"][s]) for s in ("train", "val")}
    if run["status"] == "unchanged":
        return (f"{out} already holds this data (same inputs and options): "
                f"{meta['train_tokens']:,} train tokens, {meta['val_tokens']:,} val tokens")
    if "conversations" in meta:
        c = meta["conversations"]
        split = (f"; {c['split_on_turns']:,} longer than --max-conversation-tokens split on turns"
                 if c["max_conversation_tokens"] else "")
        return (f"wrote {out}: {c['conversations']['train']:,} train and "
                f"{c['conversations']['val']:,} val conversations ({meta['train_tokens']:,} and "
                f"{meta['val_tokens']:,} tokens, {c['trained_tokens']['train']:,} and "
                f"{c['trained_tokens']['val']:,} of them trained on; the longest "
                f"{c['longest_tokens']:,} tokens){split}, {meta['tokenizer']['name']} tokenizer "
                f"({meta['vocab_size']:,} symbols, ChatML); {run['seconds']:.1f} s")
    rate = run["bytes_read"] / max(run["seconds"], 1e-9) / 1e6
    return (f"wrote {out}: {meta['train_tokens']:,} train tokens ({shards['train']} shards), "
            f"{meta['val_tokens']:,} val tokens ({shards['val']} shards) from {docs['read']:,} "
            f"documents ({docs['empty_skipped']:,} empty, skipped), {meta['tokenizer']['name']} "
            f"tokenizer ({meta['vocab_size']:,} symbols); {run['seconds']:.1f} s, {rate:.1f} MB/s"
            + (", resumed" if run["status"] == "resumed" else ""))


def _check_sizes(run: Staging, opt: Options, rule: str) -> None:
    """Enough tokens for training, and a validation split if one was asked for."""
    end = run.state["end"]
    n = end["splits"]["train"]["tokens"] + end["splits"]["val"]["tokens"]
    if rule == "tail":
        n_train, n_val = split_sizes(n, opt.val_fraction)
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
