"""What every tokenizer kind implements, and the checks they share.

A tokenizer is a vocabulary of ``vocab_size`` ids plus ``to_dict()``, the record that meta.json
and checkpoints keep of it. ``token_bytes()`` says how many bytes of UTF-8 each id stands for:
bits per byte divides a summed cross-entropy by the bytes of the predicted tokens, which is what
makes losses comparable across vocabularies.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from gptforge.errors import GptforgeError


class Tokenizer(Protocol):
    """What the rest of gptforge needs from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int | None  # the document separator token, if the tokenizer has one

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def token_bytes(self) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


def checked_ids(ids: list[int], vocab_size: int, vocab: str, fix: str) -> list[int]:
    """Plain ints, each a valid id; otherwise one line naming the first bad id."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise GptforgeError(f"token id {bad[0]} is outside {vocab} (0..{vocab_size - 1}): {fix}")
    return ids


def frozen_lengths(lengths: list[int]) -> np.ndarray:
    """``token_bytes()``'s array: int32 (a token is never 2 GB), read-only because it is cached
    and shared by every caller."""
    out = np.asarray(lengths, dtype=np.int32)
    out.flags.writeable = False
    return out


def repair_surrogates(text: str) -> str:
    """Lone surrogates (a JSON "\\ud800" escape) cannot be UTF-8: U+FFFD instead, the repair
    tiktoken's encode_ordinary makes for GPT-2, so that every kind treats them alike."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
