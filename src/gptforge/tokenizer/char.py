"""A character-level tokenizer: one token per Unicode character, over a fixed vocabulary."""

from __future__ import annotations

from typing import Any

import numpy as np

from gptforge.errors import GptforgeError
from gptforge.tokenizer.interface import checked_ids, frozen_lengths


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
        self._token_bytes: np.ndarray | None = None

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
        ids = checked_ids(ids, self.vocab_size, "the char vocabulary",
                          "decode with the tokenizer saved with the data or checkpoint")
        return "".join([self.chars[i] for i in ids])

    def token_bytes(self) -> np.ndarray:
        """Bytes of UTF-8 each id decodes to: 1 to 4 (a lone surrogate, which only a JSON escape
        can bring, counts as the 3 bytes "surrogatepass" writes)."""
        if self._token_bytes is None:
            self._token_bytes = frozen_lengths(
                [len(c.encode("utf-8", "surrogatepass")) for c in self.chars])
        return self._token_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chars": self.chars}

