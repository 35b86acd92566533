"""Generation: a KV cache, stop tokens and strings, streaming, batches of samples.

``generate`` works on token ids and knows nothing of text; ``TextStream`` turns one row's ids
into text as they arrive (whole characters only, cut at a stop string); ``sample`` puts the two
together for a checkpoint or a Hugging Face GPT-2 directory. How each token is drawn (temperature,
top-k, top-p) is sampling.py's ``draw``, the one sampling step the server's engine uses too.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Collection, Sequence

import torch

from gptforge import weights
from gptforge.checkpoint import load_checkpoint, load_model
from gptforge.config import SampleConfig
from gptforge.device import pick_device
from gptforge.errors import GptforgeError
from gptforge.hf import is_hf_dir
from gptforge.model import GPT, KVCache
from gptforge.sampling import Sampling, draw, filter_logits
from gptforge.tokenizer import Tokenizer, stop_ids, tokenizer_from_dict

__all__ = ["OnToken", "SampleEcho", "TextStream", "filter_logits", "generate", "sample"]

# on_token(row, token id) -> True to end that row (a stop string completed), else False/None.
OnToken = Callable[[int, int], "bool | None"]


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    stop_id: int | Collection[int] | None = None,
    top_p: float = 1.0,
    use_cache: bool = True,
    on_token: OnToken | None = None,
) -> list[list[int]]:
    """Continue each row of ``idx`` (B, T) by up to ``max_new_tokens`` sampled tokens.

    Returns the new tokens of each row. A row ends after it samples ``stop_id`` (one id or a
    collection: the end of text, the end of a turn; kept out of the result) or when
    ``on_token(row, token)``, called for every token kept, returns True. ``temperature=0`` or
    ``top_k=1`` is greedy decoding. Logits cover the real vocabulary only, so padded ids never
    appear.

    The context is the last block_size tokens. With ``use_cache`` the prompt is run once and each
    new token then costs one position; once a row outgrows block_size the window slides, and since
    GPT-2's positions are absolute, every later token re-runs the whole window (as without the
    cache), so cached and uncached decoding see the same context and give the same tokens.
    """
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    key = Sampling(temperature=temperature, top_k=top_k, top_p=top_p).draw_key
    stops = set() if stop_id is None else {stop_id} if isinstance(stop_id, int) else set(stop_id)
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
        logits, _ = model(fresh if cache is not None else seq, kv_cache=cache, last_only=True)
        tokens = draw(logits[:, -1, :].float(), [key], [generator])  # B ids
        nxt = torch.tensor(tokens, dtype=seq.dtype, device=seq.device)[:, None]  # (B, 1)
        seq = torch.cat([seq, nxt], dim=1)[:, -block_size:]
        fresh = nxt
        for b, tok in enumerate(tokens):
            if done[b]:
                continue
            if tok in stops:
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
    prompt: str,
    sampling: Sampling,
    num_samples: int = 1,
    device: str = "auto",
    use_cache: bool = True,
    stream: Callable[[int, str], None] | None = None,
    weights_dtype: str = "auto",
    announce: Callable[[str], None] | None = None,
) -> list[str]:
    """Load a checkpoint (or a Hugging Face GPT-2 directory) and return ``num_samples`` texts:
    the prompt and its continuation of up to ``sampling.max_tokens`` tokens, ended by the end of
    text or of a turn, or cut before the first of ``sampling.stops``. ``sampling`` is checked by
    the caller (``Sampling.problem``); a seed of None draws a random one.

    ``stream(row, text)``, if given, receives each row's continuation as it is generated. The
    weights are in ``weights_dtype`` (weights.py; ``auto``: the faster here), and ``announce``,
    if given, receives the line that says which and why.
    """
    weights.check(weights_dtype)
    model, tok_dict = load_model(ckpt_path)
    tok = tokenizer_from_dict(tok_dict)
    dev = pick_device(device)
    model, choice = weights.prepare(model, weights_dtype, dev, rows=num_samples)
    if announce is not None:
        announce(choice.line())
    ids = tok.encode(prompt)
    if not ids:
        if tok.eot_id is None:
            raise GptforgeError("--prompt is empty: give at least one character to continue")
        ids = [tok.eot_id]  # GPT-2's way to sample unconditionally: start after a document end
    block = model.config.block_size
    if len(ids) > block:
        warnings.warn(f"the prompt has {len(ids)} tokens, more than the model's context of "
                      f"{block}: only its last {block} tokens are used")
    streams = [
        TextStream(tok, sampling.stops, None if stream is None else (lambda text, b=b: stream(b, text)))
        for b in range(num_samples)
    ]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(sampling.seed) if sampling.seed is not None else gen.seed()
    generate(model, idx, sampling.max_tokens, sampling.temperature, sampling.top_k, gen,
             stop_ids(tok), top_p=sampling.top_p, use_cache=use_cache,
             on_token=lambda b, t: streams[b].push(t))
    return [prompt + s.finish() for s in streams]


def run_sample_config(path: str) -> SampleConfig | None:
    """The ``[sample]`` section of the run a checkpoint belongs to (a run or checkpoint
    directory), which sets the defaults of ``gptforge sample`` and ``chat`` on it; None for a
    Hugging Face directory. Warnings about the run's checkpoints wait for the load that follows."""
    if is_hf_dir(path):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_checkpoint(path).config.sample
