"""Sampling: a KV cache, temperature, top-k, top-p, stop strings, streaming, batches of samples.

``generate`` works on token ids and knows nothing of text; ``TextStream`` turns one row's ids
into text as they arrive (whole characters only, cut at a stop string); ``sample`` puts the two
together for a checkpoint or a Hugging Face GPT-2 directory.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence

import torch

from gptforge.checkpoint import load_model
from gptforge.config import SampleConfig
from gptforge.device import pick_device
from gptforge.errors import GptforgeError
from gptforge.model import GPT, KVCache
from gptforge.tokenizer import Tokenizer, tokenizer_from_dict

# on_token(row, token id) -> True to end that row (a stop string completed), else False/None.
OnToken = Callable[[int, int], "bool | None"]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (B, V) logits to -inf outside the top k and outside the nucleus of mass ``top_p``.

    Nucleus sampling (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"):
    keep the smallest set of most likely tokens whose probabilities sum to at least top_p.
    The most likely token always survives.
    """
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


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    top_p: float = 1.0,
    use_cache: bool = True,
    on_token: OnToken | None = None,
) -> list[list[int]]:
    """Continue each row of ``idx`` (B, T) by up to ``max_new_tokens`` sampled tokens.

    Returns the new tokens of each row. A row ends after it samples ``stop_id`` (kept out of the
    result) or when ``on_token(row, token)``, called for every token kept, returns True. ``top_k=1``
    is greedy decoding. Logits cover the real vocabulary only, so padded ids never appear.

    The context is the last block_size tokens. With ``use_cache`` the prompt is run once and each
    new token then costs one position; once a row outgrows block_size the window slides, and since
    GPT-2's positions are absolute, every later token re-runs the whole window (as without the
    cache), so cached and uncached decoding see the same context and give the same tokens.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    block_size = model.config.block_size
    B = idx.size(0)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    cache: KVCache | None = model.new_kv_cache() if use_cache else None
    seq = idx[:, -block_size:]  # (B, T) the tokens the next step conditions on
    fresh = seq  # tokens not yet in the cache
    for _ in range(max_new_tokens):
        if cache is not None and cache.length + fresh.size(1) > block_size:
            cache.reset()  # the window slid: positions changed, so refill it from scratch
            fresh = seq
        logits, _ = model(fresh if cache is not None else seq, kv_cache=cache)
        logits = logits[:, -1, :].float() / temperature  # (B, V)
        probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
        nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        seq = torch.cat([seq, nxt], dim=1)[:, -block_size:]
        fresh = nxt
        for b, tok in enumerate(nxt[:, 0].tolist()):
            if done[b]:
                continue
            if stop_id is not None and tok == stop_id:
                done[b] = True
                continue
            out[b].append(tok)
            if on_token is not None and on_token(b, tok):
                done[b] = True
        if all(done):
            break
    return out


class TextStream:
    """One row's tokens -> text as they arrive: whole characters only, cut before a stop string.

    GPT-2 BPE tokens are bytes, so one character (an emoji, an accented letter) can span tokens;
    a token whose text ends in an incomplete character is held until the character is complete
    (at most 4 tokens: the longest UTF-8 character). Text that could be the start of a stop string
    is held too, so ``emit`` never receives text past a stop string.
    """

    MAX_CHAR_TOKENS = 4

    def __init__(
        self, tokenizer: Tokenizer, stops: Sequence[str] = (),
        emit: Callable[[str], None] | None = None,
    ):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.emit = emit
        self.text = ""  # emitted so far
        self.stopped = False
        self._ids: list[int] = []  # tokens whose text is not yet whole characters
        self._held = ""  # decoded text that may begin a stop string

    def push(self, token: int) -> bool:
        """Add one token; True when a stop string is complete (the row should end)."""
        if self.stopped:
            return True
        self._ids.append(token)
        piece = self.tok.decode(self._ids)
        if piece.endswith("\ufffd") and len(self._ids) < self.MAX_CHAR_TOKENS:
            return False  # wait for the rest of the character's bytes
        self._ids = []
        self._held += piece
        hits = [i for i in (self._held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._send(self._held[: min(hits)])
            self._held = ""
            self.stopped = True
            return True
        keep = max((n for s in self.stops for n in range(1, len(s))
                    if self._held.endswith(s[:n])), default=0)
        self._send(self._held[: len(self._held) - keep])
        self._held = self._held[len(self._held) - keep:]
        return False

    def finish(self) -> str:
        """Flush what is held (generation ended without a stop string); the whole text."""
        if not self.stopped:
            rest = self._held + (self.tok.decode(self._ids) if self._ids else "")
            self._ids, self._held = [], ""
            self._send(rest)
        return self.text

    def _send(self, piece: str) -> None:
        if piece:
            self.text += piece
            if self.emit is not None:
                self.emit(piece)


class SampleEcho:
    """Writes a streamed sample to stdout as it comes: the prompt first, then each piece."""

    def __init__(self, prompt: str) -> None:
        self.prompt, self.parts = prompt, []

    def __call__(self, _row: int, text: str) -> None:
        if not self.parts:
            self.parts.append(self.prompt)
            sys.stdout.write(self.prompt)
        self.parts.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()


def sample(
    ckpt_path: str,
    cfg: SampleConfig,
    device: str = "auto",
    top_p: float = 1.0,
    stops: Sequence[str] = (),
    use_cache: bool = True,
    stream: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Load a checkpoint (or a Hugging Face GPT-2 directory) and return ``cfg.num_samples`` texts:
    the prompt and its continuation, cut before the first stop string.

    ``stream(row, text)``, if given, receives each row's continuation as it is generated.
    """
    if not 0.0 < top_p <= 1.0:
        raise GptforgeError(f"--top-p {top_p} is out of range: give a probability in (0, 1]")
    if any(not s for s in stops):
        raise GptforgeError("--stop needs a non-empty text to stop at")
    model, tok_dict = load_model(ckpt_path)
    tok = tokenizer_from_dict(tok_dict)
    dev = pick_device(device)
    model = model.to(dev)
    ids = tok.encode(cfg.prompt)
    if not ids:
        if tok.eot_id is None:
            raise GptforgeError("--prompt is empty: give at least one character to continue")
        ids = [tok.eot_id]  # GPT-2's way to sample unconditionally: start after a document end
    block = model.config.block_size
    if len(ids) > block:
        warnings.warn(f"the prompt has {len(ids)} tokens, more than the model's context of "
                      f"{block}: only its last {block} tokens are used")
    streams = [
        TextStream(tok, stops, None if stream is None else (lambda text, b=b: stream(b, text)))
        for b in range(cfg.num_samples)
    ]
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, gen, tok.eot_id,
             top_p=top_p, use_cache=use_cache, on_token=lambda b, t: streams[b].push(t))
    return [cfg.prompt + s.finish() for s in streams]
