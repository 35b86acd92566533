"""A byte-level BPE trained on your own corpus, with Hugging Face ``tokenizers``.

Why that library: its trainer is the Rust one most open models were trained with, and its file,
``tokenizer.json``, is what transformers, llama.cpp's GGUF converter and most runtimes read. So
the file gptforge trains is the file it exports, with nothing converted in between.

The vocabulary is laid out like GPT-2's: ids 0..255 are the 256 bytes (the trainer sorts the
byte-level alphabet by code point, which is GPT-2's byte order), then one id per merge in the
order they were learned, then ChatML's ``<|im_start|>`` and ``<|im_end|>`` (reserved, so that any
model trained on the vocabulary can be fine-tuned on conversations without resizing it: see
chat.py), and ``<|endoftext|>`` last (``eot_id = vocab_size - 1``, as before). What moved when they
were reserved: the merges, two fewer for the same ``--vocab-size`` (the smallest vocabulary is 259).
A tokenizer.json trained before that (no ChatML tokens) still loads and trains base models; it
cannot hold conversations. Text is split
with GPT-2's pre-tokenizer pattern (``GPT2_SPLIT_PATTERN``, tiktoken's possessive form: the
Oniguruma engine inside the ``tokenizers`` wheel accepts it, and the tests check it splits as
tiktoken does) before the byte-level mapping, so any UTF-8 text round-trips with no unknown token.
A file with another split is refused: ``prepare`` cuts long texts where a GPT-2 piece can never
span (before whitespace that follows non-whitespace), and another pattern may span such a cut.

The file is the tokenizer. ``to_dict()`` records the sha256 of the exact bytes of tokenizer.json
as training wrote them; those bytes are never re-serialised (another ``tokenizers`` version may
write the same tokenizer differently), so a checkpoint carries them as they are
(``file_bytes()``), and ``BPETokenizer.from_dict(record, data=...)`` checks them against it.

Determinism: the trainer counts pieces of text in parallel but only sums the counts, assigns
the byte ids in sorted order, and breaks ties between equally frequent pairs by the smaller pair
of ids. So the file depends only on how often each piece occurs (not even on the documents'
order), whatever the number of threads (tested across ``RAYON_RS_NUM_THREADS`` and
``TOKENIZERS_PARALLELISM``). The one order it does not fix is that of
equal entries in its merge queue (hash-map order, random per process); they can only arise when
one token is made by two different merges, which none of the corpora tested ever produced.

Known tokenizers: every ``BPETokenizer`` built in a process (from bytes whose checks passed) is
kept by its sha256, so ``from_dict(record)`` with no file at hand gives the one the record names
once anything in the process has read that file: loading a checkpoint or a prepared directory
reads and checks its tokenizer.json, after which code that only holds the record (sampling,
evaluation, the bits-per-byte table) rebuilds it. Keyed by content, this cache cannot give a
tokenizer other than the one recorded; forked workers inherit it.

Processes: encoding in batches runs on the library's Rust thread pool. A process forked after that
pool started must not use it (its threads do not exist in the child: a deadlock), so a fork
handler turns the pool off in the children of a process that used it, even where
``TOKENIZERS_PARALLELISM`` says otherwise; each worker then encodes on its own thread.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from gptforge.errors import GptforgeError
from gptforge.tokenizer.chat import CHAT_RECORD_KEY, CHATML_TEMPLATE, IM_END, IM_START
from gptforge.tokenizer.gpt2 import GPT2_EOT, GPT2_SPLIT_PATTERN, GPT2_SPLIT_PATTERN_ORIGINAL
from gptforge.tokenizer.interface import checked_ids, frozen_lengths, repair_surrogates

BPE_FILE = "tokenizer.json"
SPECIALS = (IM_START, IM_END, GPT2_EOT)  # after the merges, in this order
MIN_VOCAB_SIZE = 256 + len(SPECIALS)  # the bytes and the special tokens: no merge at all
# 2**17: twice the 65,536 a uint16 shard holds, so wide ids are exercised; a vocabulary this size
# was trained and round-tripped (benchmarks/tokenizer_speed.py). Beyond it the embedding and
# output layers dwarf any model gptforge's presets train.
MAX_VOCAB_SIZE = 2**17
# A merge must be seen at least this often: a pair seen once is a memorised word, not a unit.
MIN_FREQUENCY = 2

_FIX = ("give the tokenizer.json that gptforge prepare --tokenizer bpe wrote, or any byte-level "
        "BPE with GPT-2's split")
# Every kind of text a byte-level BPE must give back exactly; checked on every load.
_PROBE = ("It's 3.14, isn't it?\t\n\n  ünïcödé — 中文字 한국어 العربية हिन्दी 🤖🎉👍🏽 e\u0301 "
          "\x00\x01\x1f\x7f\u200b\u3000\u00a0 <|endoftext|>  end   ")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _byte_chars() -> list[str]:
    """GPT-2's stand-in character for each byte value (index = byte): printable Latin-1 stands for
    itself, the other 68 bytes take U+0100 onwards in byte order, so no token holds a space or a
    control character."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


BYTE_CHARS = _byte_chars()
# Token text -> its bytes, with str.translate then latin-1: each stand-in becomes its byte, and the
# few low characters that stand for nothing (space, controls) become one latin-1 cannot encode.
_TO_LATIN1 = {**{x: 0xFFFF for x in range(256)}, **{ord(c): b for b, c in enumerate(BYTE_CHARS)}}


# -----------------------------------------------------------------------------
# training


def check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
            MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE):
        raise GptforgeError(
            f"vocabulary size {vocab_size!r} is out of range for a byte-level BPE: choose "
            f"{MIN_VOCAB_SIZE} (the 256 bytes, {IM_START}, {IM_END} and {GPT2_EOT}) to "
            f"{MAX_VOCAB_SIZE:,}")


def _untrained() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _valid_utf8(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:  # a lone surrogate cannot cross into Rust: the repair encode() makes
        yield repair_surrogates(text) if _SURROGATE.search(text) else text


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = MIN_FREQUENCY,
              show_progress: bool = False) -> BPETokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (bytes, merges, ``<|im_start|>``, ``<|im_end|>``
    and ``<|endoftext|>``) trained on ``texts`` (documents, in order; the same texts give the same
    tokenizer.json)."""
    check_vocab_size(vocab_size)
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise GptforgeError(f"min_frequency {min_frequency!r} must be a whole number of at least 1")
    tok = _untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS),  # the special tokens are added after, last
        min_frequency=min_frequency, show_progress=show_progress, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    _used_thread_pool()
    tok.train_from_iterator(_valid_utf8(texts), trainer)
    reached = tok.get_vocab_size() + len(SPECIALS)
    if reached < vocab_size:
        raise GptforgeError(
            f"the text is too small for a vocabulary of {vocab_size:,} tokens: training stopped "
            f"at {reached:,}, where no pair of adjacent tokens is seen {min_frequency} times or more; give "
            f"more text, or a vocabulary size of {reached:,} or less")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return BPETokenizer(tok.to_str().encode("utf-8"), "the trained tokenizer")


# -----------------------------------------------------------------------------
# the Rust thread pool and fork


_pool_used = False


def _serial_in_forked_child() -> None:
    if _pool_used:  # read by the library at each call, so this takes effect at once
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


@functools.lru_cache(maxsize=1)
def _register_fork_handler() -> None:
    if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
        os.register_at_fork(after_in_child=_serial_in_forked_child)


def _used_thread_pool() -> None:
    global _pool_used
    _register_fork_handler()
    _pool_used = True


# -----------------------------------------------------------------------------
# reading and checking a tokenizer.json


def _type(part: Any) -> Any:
    return part.get("type") if isinstance(part, dict) else None


def _is_gpt2_split(pre: Any) -> bool:
    """GPT-2's split then bytes: HF's ByteLevel with its built-in GPT-2 regex, or a Split by
    either spelling of GPT-2's pattern followed by ByteLevel without one. Never a prefix space."""
    if _type(pre) == "ByteLevel":
        return pre.get("use_regex", True) is True and pre.get("add_prefix_space") is False
    parts = pre.get("pretokenizers") if _type(pre) == "Sequence" else None
    if not isinstance(parts, list) or len(parts) != 2:
        return False
    split, byte_level = parts
    return (_type(split) == "Split" and split.get("behavior") == "Isolated"
            and split.get("invert") is False
            and split.get("pattern") in [{"Regex": p} for p in
                                         (GPT2_SPLIT_PATTERN, GPT2_SPLIT_PATTERN_ORIGINAL)]
            and _type(byte_level) == "ByteLevel" and byte_level.get("use_regex") is False
            and byte_level.get("add_prefix_space") is False)


def _byte_level_problem(spec: dict[str, Any]) -> str | None:
    """Why this tokenizer.json is not a byte-level BPE that encodes and decodes text exactly."""
    model = spec["model"]
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')!r}, not BPE"
    if model.get("dropout"):
        return "it has BPE dropout, which makes encoding random"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "it marks word pieces with a prefix or suffix"
    if spec.get("normalizer") is not None:
        return f"its normalizer ({_type(spec['normalizer'])}) changes the text"
    if not _is_gpt2_split(spec.get("pre_tokenizer")):
        return "its pre-tokenizer is not GPT-2's split followed by the byte-level mapping"
    if _type(spec.get("decoder")) != "ByteLevel":
        return "its decoder is not byte-level"
    if _type(spec.get("post_processor")) not in (None, "ByteLevel"):
        return f"it adds tokens to every text (post-processor {_type(spec['post_processor'])})"
    if spec.get("truncation") or spec.get("padding"):
        return "it truncates or pads what it encodes"
    return None


def _parsed(data: bytes, source: str) -> HFTokenizer:
    """The library's tokenizer for the file, after the structural checks."""
    if not data.strip():
        raise GptforgeError(f"{source} is empty, not a tokenizer: {_FIX}")
    try:
        text = data.decode("utf-8")
        spec = json.loads(text)
    except UnicodeDecodeError:
        raise GptforgeError(f"{source} is not a tokenizer file (not UTF-8 text): {_FIX}") from None
    except json.JSONDecodeError as e:
        raise GptforgeError(f"{source} is not a tokenizer file (invalid JSON: {e.msg} at line "
                            f"{e.lineno}, column {e.colno}): {_FIX}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise GptforgeError(f"{source} is JSON but not a tokenizer (it has no \"model\"): {_FIX}")
    problem = _byte_level_problem(spec)
    if problem:
        raise GptforgeError(f"{source} is not a byte-level BPE that gptforge can use: {problem}; "
                            f"{_FIX}")
    try:
        return HFTokenizer.from_str(text)
    except Exception as e:  # the library raises plain Exception with the serde error
        reason = " ".join(str(e).split())
        raise GptforgeError(f"{source} could not be read as a tokenizer ({reason}): {_FIX}") from None


def _pieces(tok: HFTokenizer, source: str) -> tuple[list[bytes], np.ndarray, int]:
    """Per id: the bytes it decodes to, their number (0 for special tokens), and eot's id (the
    ChatML tokens' ids, if any, come from ``_chat_ids``)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    n = len(vocab)
    missing = [b for b, c in enumerate(BYTE_CHARS) if c not in vocab]
    if missing:
        raise GptforgeError(f"{source} has no token for byte {missing[0]} ({len(missing)} bytes "
                            f"missing), so some text cannot be encoded: {_FIX}")
    if sorted(vocab.values()) != list(range(n)):
        raise GptforgeError(f"{source} does not number its tokens 0..{n - 1} without gaps: {_FIX}")
    pieces: list[bytes] = [b""] * n
    lengths = [0] * n
    for token, i in vocab.items():
        if i in added:
            if not added[i].special:  # would be matched inside documents' text
                raise GptforgeError(f"{source} adds the non-special token {token!r}: {_FIX}")
            pieces[i] = token.encode("utf-8")  # decodes to its name, as GPT-2's eot does
            continue
        try:
            pieces[i] = token.translate(_TO_LATIN1).encode("latin-1")
        except UnicodeEncodeError:
            raise GptforgeError(f"{source} has a token that is not byte-level ({token!r}, id {i})"
                                f": {_FIX}") from None
        lengths[i] = len(pieces[i])
    eot = vocab.get(GPT2_EOT)
    if eot is None or eot not in added:
        raise GptforgeError(f"{source} has no special {GPT2_EOT} token, which separates "
                            f"documents: {_FIX}")
    return pieces, frozen_lengths(lengths), eot


def _chat_ids(tok: HFTokenizer) -> tuple[int | None, int | None]:
    """The ids of the special tokens <|im_start|> and <|im_end|>, or (None, None)."""
    vocab, added = tok.get_vocab(with_added_tokens=True), tok.get_added_tokens_decoder()
    ids = [vocab.get(t) for t in (IM_START, IM_END)]
    if all(i is not None and i in added for i in ids):
        return ids[0], ids[1]
    return None, None


# -----------------------------------------------------------------------------
# the tokenizer


class BPETokenizer:
    """A byte-level BPE read from the bytes of a tokenizer.json (``source`` names it in errors).

    ``encode`` is ordinary encoding, as GPT-2's: ``<|endoftext|>`` written in a document is text,
    and only ``prepare`` puts the real separator (``eot_id``) between documents.
    """

    name = "bpe"

    def __new__(cls, data: bytes, source: str = BPE_FILE) -> BPETokenizer:
        known = _KNOWN.get(hashlib.sha256(data).hexdigest())
        return known if known is not None else super().__new__(cls)

    def __init__(self, data: bytes, source: str = BPE_FILE) -> None:
        if getattr(self, "_data", None) is not None:
            return  # a known tokenizer (``__new__``): these bytes were checked when first read
        self._data = bytes(data)
        self._source = source
        self._hf = _parsed(self._data, source)
        self._pieces, self._token_bytes, eot = _pieces(self._hf, source)
        self.eot_id: int | None = eot
        self.im_start_id, self.im_end_id = _chat_ids(self._hf)
        self.vocab_size = len(self._pieces)
        self.sha256 = hashlib.sha256(self._data).hexdigest()
        self._hf.encode_special_tokens = True  # special tokens' names in the text are text
        if self.decode(self.encode(_PROBE)) != _PROBE:
            raise GptforgeError(f"{source} does not give back the text it encodes: {_FIX}")
        _KNOWN[self.sha256] = self

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as the file (for spawned worker processes); rebuilt and checked on arrival.
        return (BPETokenizer, (self._data, self._source))

    @classmethod
    def from_dict(cls, record: dict[str, Any], data: bytes | None = None,
                  directory: str | os.PathLike[str] | None = None) -> BPETokenizer:
        """The tokenizer ``record`` (a ``to_dict()``) describes, from the file's bytes or from the
        directory holding the file; its sha256 must be the one recorded."""
        file, sha = record.get("file"), record.get("sha256")
        if not isinstance(file, str) or not isinstance(sha, str):
            raise GptforgeError("the saved bpe tokenizer has no file name or sha256: re-run "
                                "gptforge prepare")
        source = file
        if data is None and directory is None and sha in _KNOWN:
            data = _KNOWN[sha].file_bytes()
        if data is None:
            if directory is None:
                raise GptforgeError(f"the bpe tokenizer's vocabulary is in its {file}: rebuild it "
                                    "from the directory that holds that file")
            source = os.path.join(os.fspath(directory), os.path.basename(file))
            data = _read(source)
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise GptforgeError(
                f"{source} is not the tokenizer recorded with this data or checkpoint (sha256 "
                f"{got[:12]}... instead of {sha[:12]}...): restore that tokenizer.json, or prepare "
                "the data again")
        tok = cls(data, source)
        if (tok.vocab_size, tok.eot_id) != (record.get("vocab_size"), record.get("eot_id")):
            raise GptforgeError(f"the saved bpe tokenizer record does not describe {source} "
                                f"(vocab_size {record.get('vocab_size')} against "
                                f"{tok.vocab_size}): re-run gptforge prepare")
        return tok

    def _encodings(self, texts: list[str]) -> list[Any]:
        _used_thread_pool()
        try:
            return self._hf.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:  # a lone surrogate cannot cross into Rust: U+FFFD, as GPT-2 does
            return self._hf.encode_batch_fast([repair_surrogates(t) for t in texts],
                                              add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return self._encodings([text])[0].ids

    def encode_array(self, text: str) -> np.ndarray:
        """``encode(text)`` as a uint32 array."""
        return np.array(self._encodings([text])[0].ids, dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, encoded on the library's thread pool (see the module's note)."""
        return [e.ids for e in self._encodings(list(texts))]

    def decode(self, ids: list[int]) -> str:
        ids = checked_ids(ids, self.vocab_size, "this BPE vocabulary",
                          f"sample only from the first {self.vocab_size} logits")
        # A sequence can end inside a multi-byte character: U+FFFD, as tiktoken does for GPT-2.
        return b"".join([self._pieces[i] for i in ids]).decode("utf-8", "replace")

    def token_bytes(self) -> np.ndarray:
        """Bytes each id decodes to (special tokens: 0); a token may hold part of a character."""
        return self._token_bytes

    def file_bytes(self) -> bytes:
        """The tokenizer.json, byte for byte: what a checkpoint or data directory stores, with
        ``to_dict()["sha256"]`` as its hash."""
        return self._data

    def to_dict(self) -> dict[str, Any]:
        chat = {CHAT_RECORD_KEY: CHATML_TEMPLATE} if self.im_start_id is not None else {}
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "file": BPE_FILE, "sha256": self.sha256, **chat}


# sha256 -> the tokenizer read from those bytes (see the module's note on known tokenizers)
_KNOWN: dict[str, BPETokenizer] = {}


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise GptforgeError(f"{path} does not exist: give a {BPE_FILE} file or the directory "
                            "that holds one") from None
    except OSError as e:
        raise GptforgeError(f"cannot read {path} ({e.strerror}): check its permissions") from None


def load_bpe(path: str | os.PathLike[str]) -> BPETokenizer:
    """The byte-level BPE in a tokenizer.json file, or in a directory that holds one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, BPE_FILE)
        if not os.path.isfile(inside):
            raise GptforgeError(f"{path} holds no {BPE_FILE}: give a {BPE_FILE} file, or a data "
                                "directory prepared with --tokenizer bpe")
        path = inside
    return BPETokenizer(_read(path), path)


# -----------------------------------------------------------------------------
# Hugging Face files


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def hf_tokenizer_files(tok: BPETokenizer, model_max_length: int | None = None
                       ) -> dict[str, bytes]:
    """The files (name -> bytes) ``transformers.AutoTokenizer.from_pretrained(DIR)`` loads as a
    fast tokenizer giving gptforge's ids: tokenizer.json as it is, the special tokens, and for a
    chat vocabulary the ChatML template.

    ``PreTrainedTokenizerFast`` takes tokenizer.json as it is; GPT2TokenizerFast would rebuild
    the pipeline from vocab and merges files with its own pre-tokenizer.
    """
    eot = GPT2_EOT
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_prefix_space": False,
        # transformers would otherwise "clean" decoded text (" ." -> "."): not a round trip
        "clean_up_tokenization_spaces": False,
        **special,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if tok.im_start_id is not None:  # transformers' apply_chat_template renders this (chat.py)
        config["chat_template"] = CHATML_TEMPLATE
    return {
        BPE_FILE: tok.file_bytes(),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special),
    }

