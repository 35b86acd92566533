"""Tokenizers: every vocabulary gptforge trains with, behind one interface (``Tokenizer``).

- ``gpt2`` (gpt2.py): GPT-2's byte-level BPE through tiktoken, built offline.
- ``char`` (char.py): one token per character of the prepared text.
- ``bpe`` (bpe.py): a byte-level BPE trained on your own corpus with Hugging Face ``tokenizers``.

Each has ``name``, ``vocab_size``, ``eot_id``, ``encode``, ``encode_array``, ``decode``,
``encode_batch``, ``token_bytes`` and ``to_dict``. ``to_dict()`` is what ``prepare`` stores in
meta.json and checkpoints keep, so ``tokenizer_from_dict(meta["tokenizer"])`` rebuilds exactly the
tokenizer that made the data. gpt2 needs nothing more and char's record holds its characters; a
bpe's vocabulary is a file (tokenizer.json) whose sha256 the record holds, so rebuilding it takes
that file's bytes or the directory that holds it.
"""

from __future__ import annotations

import os
from typing import Any

from gptforge.errors import GptforgeError
from gptforge.tokenizer.bpe import (
    BPE_FILE,
    MAX_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    BPETokenizer,
    check_vocab_size,
    hf_tokenizer_files,
    load_bpe,
    train_bpe,
)
from gptforge.tokenizer.char import CharTokenizer
from gptforge.tokenizer.chat import (
    CHAT_RECORD_KEY,
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    is_chat,
    message_problem,
    prompt_ids,
    render,
    require_chat,
)
from gptforge.tokenizer.gpt2 import (
    GPT2_EOT,
    GPT2_CHAT_VOCAB_SIZE,
    GPT2_EOT_ID,
    GPT2_SPLIT_PATTERN,
    GPT2_VOCAB_SIZE,
    GPT2Tokenizer,
    _gpt2_encoding,
    gpt2_vocab_files,
)
from gptforge.tokenizer.interface import Tokenizer

__all__ = [
    "CHAT_RECORD_KEY", "CHATML_TEMPLATE", "GPT2_CHAT_VOCAB_SIZE", "IM_END", "IM_START", "is_chat",
    "message_problem", "prompt_ids", "render", "require_chat",
    "BPE_FILE", "GPT2_EOT", "GPT2_EOT_ID", "GPT2_SPLIT_PATTERN", "GPT2_VOCAB_SIZE",
    "MAX_VOCAB_SIZE", "MIN_VOCAB_SIZE", "SAVED_TOKENIZERS", "TOKENIZERS", "BPETokenizer",
    "CharTokenizer", "GPT2Tokenizer", "Tokenizer", "_gpt2_encoding", "check_vocab_size",
    "describe", "get_tokenizer", "stop_ids", "gpt2_vocab_files", "hf_tokenizer_files", "load_bpe", "tokenizer_from_dict",
    "train_bpe",
]

# What `prepare --tokenizer` builds (bpe: trained on the corpus, or reused from a file).
TOKENIZERS = ("gpt2", "char", "bpe")
# What a saved record (meta.json, a checkpoint) may name.
SAVED_TOKENIZERS = ("gpt2", "char", "bpe")


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called ``name``; only "gpt2" can be built from its name alone."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "gpt2-chat":
        return GPT2Tokenizer(chat=True)
    if name == "char":
        raise GptforgeError(
            "the char tokenizer needs a vocabulary: build it with CharTokenizer.from_text(text) "
            "or load it from a prepared data directory's meta.json"
        )
    if name == "bpe":
        raise GptforgeError(
            "the bpe tokenizer is trained on a corpus: build it with train_bpe(texts, vocab_size) "
            "or load it with load_bpe(path to its tokenizer.json)"
        )
    raise GptforgeError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}")


def stop_ids(tok: Tokenizer) -> set[int]:
    """The ids that end generation: the end of text, and with a chat vocabulary the end of a turn."""
    ids = {tok.eot_id, getattr(tok, "im_end_id", None)}
    return {i for i in ids if i is not None}


def describe(record: dict[str, Any]) -> str:
    """A tokenizer record for a person: which kind, how many tokens, and for a trained BPE the
    start of its sha256 (two BPEs of one size differ only there)."""
    name = record.get("name") if isinstance(record, dict) else None
    chat = " with ChatML's tokens" if record.get(CHAT_RECORD_KEY) is not None else ""
    if name == "gpt2":
        return f"gpt2 tokenizer{chat} ({GPT2_CHAT_VOCAB_SIZE if chat else GPT2_VOCAB_SIZE:,} tokens)"
    if name == "char":
        return f"char tokenizer ({len(record.get('chars') or ''):,} symbols)"
    if name == "bpe":
        return (f"bpe tokenizer{chat} ({record.get('vocab_size', 0):,} tokens, sha256 "
                f"{str(record.get('sha256'))[:12]})")
    return f"{name} tokenizer"


def tokenizer_from_dict(d: dict[str, Any], data: bytes | None = None,
                        directory: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Rebuild a tokenizer from its ``to_dict()`` (as stored in meta.json and checkpoints).

    A bpe record also needs its tokenizer.json: ``data`` (the file's bytes, as a checkpoint
    carries them) or ``directory`` (where the file is); either is checked against its sha256.
    """
    name = d.get("name") if isinstance(d, dict) else None
    if name == "gpt2":
        return GPT2Tokenizer(chat=d.get(CHAT_RECORD_KEY) is not None)
    if name == "char":
        chars = d.get("chars")
        if not isinstance(chars, str) or not chars:
            raise GptforgeError(
                "the saved char tokenizer has no vocabulary ('chars'): re-run gptforge prepare"
            )
        return CharTokenizer(chars)
    if name == "bpe":
        return BPETokenizer.from_dict(d, data=data, directory=directory)
    raise GptforgeError(
        f"unknown saved tokenizer {name!r}: expected one of {', '.join(SAVED_TOKENIZERS)}; "
        "the data or checkpoint may come from a newer gptforge"
    )
