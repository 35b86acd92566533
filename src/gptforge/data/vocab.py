"""The vocabulary a prepare tokenizes with, when it is not GPT-2's: a byte-level BPE trained on
the corpus (``--tokenizer bpe``), or one reused from elsewhere (``--tokenizer PATH``).

Training reads the inputs as ``prepare`` does (every format, in order) and gives the trainer
either all their text or, when the inputs hold more than ``--tokenizer-sample-mb``, a sample of
their pieces (documents, or ~2 MB parts of long ones) chosen by a hash of each piece's position
in reading order: spread over the whole corpus rather than its first files, and the same for the
same inputs on every run and for any ``--workers`` (reading is sequential). The fraction is
taken from the inputs' sizes on disk, so for compressed inputs the sample holds about that many
megabytes compressed. The trained file is written to the staging area first and published with
the shards, so a run killed later resumes with that very file; one killed while training trains
again (the result is the same).

A reused tokenizer is recorded in the options by its file's sha256: re-running with the same
file finds the result unchanged, with another file it is other data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

from gptforge.atomic import write_bytes
from gptforge.data.shards import load_meta
from gptforge.data.sources import ReadOptions, Source, read_sources
from gptforge.data.staging import Options, Staging
from gptforge.errors import GptforgeError
from gptforge.rundir import CHECKPOINT_DIR, LATEST
from gptforge.tokenizer import BPE_FILE, TOKENIZERS, BPETokenizer, load_bpe, tokenizer_from_dict, train_bpe

CHECKPOINT_CONFIG = "config.json"  # a checkpoint's own record, tokenizer included


def _sampled(position: int, keep: float) -> bool:
    h = hashlib.blake2b(f"tokenizer:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < int(keep * (1 << 64))


def sample_texts(sources: list[Source], opt: Options, bar: Any) -> Iterator[str]:
    """The text the BPE is trained on: every piece, or a deterministic sample of them."""
    total = sum(s.bytes for s in sources)
    budget = (opt.tokenizer_sample_mb or 0) * 1_000_000
    keep = 1.0 if budget == 0 or total <= budget else budget / total
    done_before = [sum(s.bytes for s in sources[:i]) for i in range(len(sources))]
    pieces = read_sources(sources, ReadOptions(opt.text_field, opt.errors))
    for position, (i, piece) in enumerate(pieces):
        bar.update(done_before[i] + piece.done - bar.n)
        if piece.text and (keep == 1.0 or _sampled(position, keep)):
            yield piece.text


def train_tokenizer(sources: list[Source], opt: Options, bar: Any) -> BPETokenizer:
    assert opt.vocab_size is not None
    try:
        return train_bpe(sample_texts(sources, opt, bar), opt.vocab_size)
    except GptforgeError as e:
        if "too small" not in str(e) or not opt.tokenizer_sample_mb:
            raise
        total = sum(s.bytes for s in sources) / 1e6
        if total <= opt.tokenizer_sample_mb:
            raise
        raise GptforgeError(f"{e}, or a larger --tokenizer-sample-mb (it trained on about "
                            f"{opt.tokenizer_sample_mb:g} of the inputs' {total:,.0f} MB; 0 for "
                            "all)") from None


def stage_tokenizer(run: Staging, tok: BPETokenizer) -> dict[str, Any]:
    """Keep the tokenizer's file in the staging area (published with the shards); its record."""
    path = run.path(BPE_FILE)
    write_bytes(path, tok.file_bytes(), durable=True, tmp=path + ".tmp")
    return tok.to_dict()


def staged_tokenizer(run: Staging) -> Any:
    """The tokenizer a started run recorded: a bpe's file from the staging area, or from DIR
    once publishing has moved it there (a run killed while publishing); sha256-checked."""
    record = run.state["tokenizer"]
    staged = isinstance(record.get("file"), str) and os.path.isfile(run.path(record["file"]))
    return tokenizer_from_dict(record, directory=run.staging if staged else run.out)


# -----------------------------------------------------------------------------
# --tokenizer PATH


def _latest_checkpoint(run_dir: str) -> str | None:
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as f:
            name = f.read().strip()
        if name and os.path.isfile(os.path.join(root, name, CHECKPOINT_CONFIG)):
            return os.path.join(root, name)
    except OSError:
        pass
    steps = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else [])
                   if d.startswith("step_") and os.path.isfile(os.path.join(root, d, CHECKPOINT_CONFIG)))
    return os.path.join(root, steps[-1]) if steps else None


def _named(record: Any, where: str, directory: str) -> tuple[str, BPETokenizer | None]:
    name = record.get("name") if isinstance(record, dict) else None
    if name == "gpt2":
        return "gpt2", None
    if name == "bpe":
        tok = tokenizer_from_dict(record, directory=directory)
        assert isinstance(tok, BPETokenizer)
        return "bpe", tok
    if name == "char":
        raise GptforgeError(f"{where} uses a char vocabulary, which --tokenizer PATH does not "
                            "reuse: pass --tokenizer char (one token per character of this text)")
    raise GptforgeError(f"{where} records no tokenizer gptforge knows ({name!r}): give a "
                        f"{BPE_FILE} file instead")


def _checkpoint_record(ckpt: str) -> Any:
    try:
        with open(os.path.join(ckpt, CHECKPOINT_CONFIG), encoding="utf-8") as f:
            return json.load(f).get("tokenizer")
    except (OSError, ValueError, AttributeError) as e:
        raise GptforgeError(f"cannot read the tokenizer of checkpoint {ckpt} ({e}): give its "
                            f"{BPE_FILE} or another checkpoint") from None


def resolve_tokenizer(arg: str) -> tuple[str, BPETokenizer | None]:
    """``--tokenizer``'s value as (kind, the reused BPE or None): a name, or the path of a
    tokenizer.json, a prepared data directory, a run directory or a checkpoint directory."""
    if arg in TOKENIZERS:
        return arg, None
    if not os.path.exists(arg):
        raise GptforgeError(
            f"--tokenizer {arg!r} is neither a tokenizer ({', '.join(TOKENIZERS)}) nor a path "
            f"that exists: give a name, a {BPE_FILE}, a prepared directory or a run directory")
    if os.path.isfile(arg):
        return "bpe", load_bpe(arg)
    if os.path.isfile(os.path.join(arg, "meta.json")):
        return _named(load_meta(arg)["tokenizer"], f"the prepared directory {arg}", arg)
    ckpt = arg if os.path.isfile(os.path.join(arg, CHECKPOINT_CONFIG)) else _latest_checkpoint(arg)
    record = None if ckpt is None else _checkpoint_record(ckpt)
    if record is not None:  # (a Hugging Face directory's config.json has none)
        return _named(record, f"the checkpoint {ckpt}", ckpt)
    if os.path.isfile(os.path.join(arg, BPE_FILE)):
        return "bpe", load_bpe(arg)
    raise GptforgeError(
        f"--tokenizer {arg}: this directory holds no {BPE_FILE}, no prepared data (meta.json) and "
        "no checkpoint: give one of those")
