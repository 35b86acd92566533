"""One set of sampling parameters, its rules, and the one sampling step, for sample, chat and serve.

``Sampling`` holds what decides how a token is drawn and when a reply ends: temperature, top-k,
top-p, the token budget, the seed and the stop texts. Its defaults are the only ones gptforge has:

- temperature 1.0 and top-p 1.0, OpenAI's defaults (its API fixes them, so the server keeps them);
- top-k 50, which OpenAI's API does not have (Hugging Face's ``generate`` uses 50 too): the long
  tail of a small model's distribution is mostly noise;
- 200 new tokens and seed 1337 for the CLI (``sample``, ``chat``), so that a command prints the
  same text twice. The server keeps OpenAI's two defaults instead: ``max_tokens`` 16 for
  completions (and the room left in the context for chat completions), and no seed, i.e. a
  random one per request.

Temperature 0 is greedy decoding everywhere, as ``top_k=1`` is.

``problem()`` is where the values are checked; each boundary words what it finds in its own
shape (a config key, a CLI flag, an OpenAI-style 400) from ``RULES``. This module imports no
gptforge module and imports torch only inside the functions that draw tokens, so that ``config``
can take its defaults and rules without pulling torch in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_TOKENS = 200
DEFAULT_SEED = 1337
MAX_TEMPERATURE = 2.0  # OpenAI's range
MAX_STOPS = 4  # OpenAI's limit
SEED_LIMIT = 2**63

# What each value must be: the words every boundary's error uses.
RULES = {
    "temperature": "a number from 0 to 2 (0: greedy)",
    "top_k": "an integer >= 0 (0: no top-k filtering)",
    "top_p": "a number in (0, 1]",
    "max_tokens": "an integer >= 1",
    "seed": "an integer from 0 to 2**63 - 1",
    "stops": f"non-empty texts, up to {MAX_STOPS} of them",
}


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn and when a reply ends; check it with ``problem()``."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = DEFAULT_SEED  # None: a random seed
    stops: tuple[str, ...] = ()

    def problem(self) -> tuple[str, Any] | None:
        """The first value out of range, as (field, value), or None when all are fine."""
        def number(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        checks = [
            ("temperature", number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE),
            ("top_k", integer(self.top_k) and self.top_k >= 0),
            ("top_p", number(self.top_p) and 0 < self.top_p <= 1),
            ("max_tokens", integer(self.max_tokens) and self.max_tokens >= 1),
            ("seed", self.seed is None or (integer(self.seed) and 0 <= self.seed < SEED_LIMIT)),
            ("stops", len(self.stops) <= MAX_STOPS and all(isinstance(s, str) and s for s in self.stops)),
        ]
        for name, ok in checks:
            if not ok:
                return name, getattr(self, name)
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def draw_key(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) as the sampling step takes them; every greedy setting is
        one key, so rows that decode greedily are drawn together."""
        return (0.0, 1, 1.0) if self.greedy else (self.temperature, self.top_k, self.top_p)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (B, V) logits to -inf outside the top k and outside the nucleus of mass ``top_p``.

    Nucleus sampling (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"):
    keep the smallest set of most likely tokens whose probabilities sum to at least top_p.
    The most likely token always survives.
    """
    import torch

    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V)
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: torch.Tensor, key: tuple[float, int, float],
         generators: Sequence[torch.Generator | None]) -> list[int]:
    """The sampling step: one token per row of float logits (B, V), all rows with one setting
    (``Sampling.draw_key``).

    Greedy rows take the argmax, which is what sampling from the top-1 filter's one-hot
    distribution returns (save for exactly tied logits, where argmax picks the lowest id),
    without its cost: on a CPU ``multinomial`` draws one exponential variate per vocabulary entry
    (~4 ms a row for GPT-2's 50,257 on a 2-core EPYC), more than a small model's forward pass.
    Otherwise: logits / temperature, top-k and top-p filtering, softmax, ``multinomial``. One
    generator draws for the whole batch at once (``gptforge sample``'s samples); one per row
    draws each row from its own (the server's requests, each with its own seed).
    """
    import torch

    temperature, top_k, top_p = key
    if top_k == 1:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)  # (B, V)
    if len(generators) == 1:
        return torch.multinomial(probs, 1, generator=generators[0])[:, 0].tolist()
    assert len(generators) == logits.size(0), "one generator, or one per row"
    return [int(torch.multinomial(probs[i : i + 1], 1, generator=g))
            for i, g in enumerate(generators)]
