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


def draw(logits: torch.Tensor, keys: Sequence[tuple[float, int, float]],
         generators: Sequence[torch.Generator | None]) -> list[int]:
    """The sampling step: one token per row of float logits (B, V), the whole batch at once.

    ``keys`` holds each row's ``Sampling.draw_key``, or one key for every row; ``generators``
    one generator per row (the server's requests, each with its own seed) or one for the whole
    batch (``gptforge sample``'s samples; None: torch's global one).

    Greedy rows take the argmax (the lowest id among exactly tied logits) and draw nothing.
    Every other row draws one float64 uniform u from its generator and takes the token where u
    falls in the cumulative distribution of its filtered softmax, laid out in vocabulary order
    (``choose``): inverse-transform sampling, the same distribution as ``multinomial`` for one
    random number a row. ``multinomial`` drew one exponential variate per vocabulary entry
    (torch's single-sample path is the exponential race, argmax(p / q)): ~0.9 ms a row for
    GPT-2's 50,257 on a 2-core Xeon, 14 ms a step for 16 rows, three times gpt2-mini's forward
    pass (BENCHMARKS.md, "Serving: batching that scales").
    """
    import torch

    B = logits.size(0)
    if len(keys) == 1:
        keys = list(keys) * B
    assert len(keys) == B and len(generators) in (1, B), "one key and generator, or one per row"
    sampled = [b for b, key in enumerate(keys) if key[1] != 1]  # draw_key gives greedy top_k 1
    if len(sampled) < B:
        tokens = logits.argmax(dim=-1)  # (B,)
    if not sampled:
        return tokens.tolist()
    if len(generators) == 1:
        u = torch.rand(len(sampled), dtype=torch.float64, generator=generators[0],
                       device=logits.device)
    else:
        u = torch.cat([torch.rand(1, dtype=torch.float64, generator=generators[b],
                                  device=logits.device) for b in sampled])
    if len(sampled) == B:
        return choose(logits, keys, u).tolist()
    tokens[sampled] = choose(logits[sampled], [keys[b] for b in sampled], u)
    return tokens.tolist()


def choose(logits: torch.Tensor, keys: Sequence[tuple[float, int, float]], u: torch.Tensor,
           take: int = 0) -> torch.Tensor:
    """Tokens (B,) for uniforms ``u`` (B,) in [0, 1): row b's is the lowest vocabulary id t with
    F_b(t) > u_b, F_b being the cumulative (in vocabulary order, float64) distribution of
    softmax(logits_b / temperature_b) filtered as ``filter_logits`` filters it (top-k keeping
    ties with the k-th logit; the nucleus of mass top_p). A row's token depends on its own
    logits, settings and u only, never on the rows beside it.

    Only the K + 1 best logits of each row take part (``topk``, sorted), K being the largest
    top-k in the batch: every token outside them has probability 0; all V when a row has no
    top-k. When the (K + 1)-th ties a row's k-th logit, a tie that may go on past it, the logits
    at least as high as any row's k-th take part, and one more (``take``). Such ties are rare in
    float32 logits and common in logits computed in bfloat16 (8 bits of mantissa), where taking
    all V instead sorted 50,257 logits a row: bf16 served 16 clients ~6x slower than fp32.
    """
    import torch

    B, V = logits.shape
    dev = logits.device
    temperature = torch.tensor([k[0] for k in keys], dtype=logits.dtype, device=dev)
    top_k = [k[1] if 0 < k[1] < V else V for k in keys]
    K = min(take or max(top_k) + 1, V)
    # Dividing by a temperature > 0 keeps the order, so only the K taken are divided. Two logits
    # that round to one value once divided lie next to each other, so the check of ties below
    # still sees every tie of the divided values.
    vals, idx = torch.topk(logits, K, dim=-1)  # (B, K) descending
    vals = vals / temperature[:, None]
    kth = vals.gather(-1, torch.tensor(top_k, device=dev)[:, None] - 1)  # (B, 1) k-th logit
    if K < V and bool((vals[:, -1:] == kth).any()):
        # (logits / t >= kth) divides as ``vals`` was divided; past the most such logits of any
        # row, every row's next logit is below its k-th, so the check passes the second time.
        at_least = int((logits / temperature[:, None] >= kth).sum(-1).max())
        return choose(logits, keys, u, take=at_least + 1)
    w = torch.exp((vals - vals[:, :1]).double()).masked_fill_(vals < kth, 0.0)  # (B, K)
    top_p = torch.tensor([k[2] for k in keys], dtype=torch.float64, device=dev)
    if bool((top_p < 1).any()):
        # Nucleus (Holtzman et al. 2019): drop a token once the tokens ranked above it reach top_p.
        cum = w.cumsum(-1)
        w.masked_fill_((cum - w) / cum[:, -1:] >= top_p[:, None], 0.0)
    if K == V:  # back to vocabulary order
        w = torch.zeros_like(w).scatter_(-1, idx, w)  # (B, V)
    else:
        order = idx.argsort(dim=-1)  # (B, K) the candidates by vocabulary id
        w, idx = w.gather(-1, order), idx.gather(-1, order)
    cdf = w.cumsum(-1)  # float64: 50,257 terms lose ~1e-12 of the mass at most
    total = cdf[:, -1:]
    # u * total < total, so the entry chosen has a weight > 0 (nextafter guards the rounding).
    v = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    j = torch.searchsorted(cdf, v, right=True)  # (B, 1) the first entry with F > v
    return (j if K == V else idx.gather(-1, j))[:, 0]
