"""``gptforge eval``: loss, bits per byte and perplexity over all of a split or a text file, not
an estimate; with ``--task hellaswag``, HellaSwag's acc and acc_norm (the scoring is in
``hellaswag.py``).

The tokens are cut into consecutive, non-overlapping windows of seq_len (``data.iter_eval_batches``)
plus one shorter window for the remainder, so every token but the first is predicted exactly
once, each from the tokens before it in its window. The loss is the mean next-token
cross-entropy in nats over those predictions; perplexity is exp(loss).
(Training's periodic val loss drops the remainder window, so it can differ in the last digits.)

Bits per byte (bpb) = (sum of those cross-entropies in nats) / ln 2 / (UTF-8 bytes the predicted
tokens decode to), the bytes of each id being the tokenizer's ``token_bytes()``. A loss per token
depends on how much text a token holds (GPT-2's BPE ~3.3 bytes of English, a char vocabulary 1);
a loss per byte of text does not, so bpb compares runs with different tokenizers on the same text.

The special ``<|endoftext|>`` that ``prepare`` puts between documents is not text: it counts 0
bytes, but the nats spent predicting it stay in the sum. So bpb * bytes * ln 2 is exactly the
loss * tokens that the loss reports (bpb is the same loss rescaled, and ranks checkpoints the
same way), and where a document ends is information the model pays for, as a char vocabulary
(which has no separator) pays for it in the first characters of the next document. nanochat
instead drops 0-byte targets from both sums: the two differ by the nats of one token per
document, which shows only on short documents.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from gptforge import weights
from gptforge.checkpoint import load_model
from gptforge.console import progress_bar
from gptforge.data import count_eval_windows, iter_eval_batches, load_meta, load_split
from gptforge.device import pick_device
from gptforge.errors import GptforgeError
from gptforge.hellaswag import HellaSwagResult, load_rendered, score
from gptforge.model import GPT
from gptforge.tokenizer import describe, tokenizer_from_dict

SPLITS = ("val", "train")


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per predicted token, nats
    perplexity: float  # exp(loss)
    tokens: int  # predicted tokens: all but the first
    bits_per_byte: float | None  # see the module doc; None when no token_bytes were given
    bytes: int | None  # UTF-8 bytes the predicted tokens decode to
    windows: int  # full windows of seq_len
    seq_len: int
    tail: int  # tokens predicted in the last, shorter window (0 if none)
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, what: str) -> str:
        """``gptforge eval``'s result line for ``what`` was scored."""
        tail = f" + 1 of {self.tail}" if self.tail else ""
        bpb = f" | bits/byte {self.bits_per_byte:.4f}" if self.bits_per_byte is not None else ""
        return (f"{what}: loss {self.loss:.4f}{bpb} | perplexity {self.perplexity:.2f} | "
                f"{self.tokens:,} tokens in {self.windows:,} windows of {self.seq_len}{tail} | "
                f"{self.wall_s:.1f}s")


@dataclass
class HeldOut:
    """What ``heldout_loss`` adds up: cross-entropy, predicted tokens and the bytes they stand for."""

    nats: float  # summed next-token cross-entropy
    tokens: int  # predicted tokens
    bytes: int | None  # UTF-8 bytes those tokens decode to; None without token_bytes

    @property
    def loss(self) -> float:
        """Mean nats per predicted token (NaN if none)."""
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float | None:
        """nats / ln 2 / bytes (the module doc says why, and what a separator counts)."""
        if self.bytes is None:
            return None
        return self.nats / math.log(2) / self.bytes if self.bytes else float("nan")


def byte_counts(token_bytes: np.ndarray | None, device: torch.device | str) -> torch.Tensor | None:
    """A tokenizer's ``token_bytes()`` as a lookup table on ``device`` (int64, for indexing)."""
    if token_bytes is None:
        return None
    # a copy: the tokenizer's array is read-only and shared
    return torch.from_numpy(np.array(token_bytes, dtype=np.int64)).to(device)


def byte_table(tokenizer: dict[str, Any], data_dir: str | os.PathLike[str],
               device: torch.device | str) -> torch.Tensor:
    """Bytes per id of the tokenizer that prepared ``data_dir`` (a trained BPE's file is there),
    on ``device``: what training's validation needs for bits per byte."""
    return byte_counts(tokenizer_from_dict(tokenizer, directory=data_dir).token_bytes(), device)


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    max_batches: int = 0,
    shard: tuple[int, int] = (0, 1),
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    on_batch: Callable[[int], object] | None = None,
    token_bytes: np.ndarray | torch.Tensor | None = None,
) -> HeldOut:
    """Summed next-token cross-entropy in nats, predicted tokens and (with ``token_bytes``, the
    tokenizer's bytes per id) the UTF-8 bytes of those targets, over ``batches`` of (x, y).

    The one computation of a held-out loss: ``gptforge eval`` and training's validation both
    call it. Each batch's mean loss (the model's own, in float32) times its tokens is added up in
    float64 on the device, so nothing waits for the device until the end; the bytes are the
    targets looked up in ``token_bytes`` (also on the device). ``max_batches`` caps the batches
    (0: all). With ``shard=(rank, world)`` each rank takes every world-th batch and
    ``reduce_sum`` adds the ranks' sums, so the result equals one process doing all of them.
    ``on_batch`` is told each batch's token count (a progress bar).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # (loss * tokens, tokens, bytes)
    table = token_bytes if isinstance(token_bytes, torch.Tensor) else byte_counts(token_bytes, device)
    rank, world = shard
    for i, (x, y) in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        if i % world != rank:
            continue
        x, y = x.to(device).long(), y.to(device).long()  # int32 ids, widened on the device
        with amp():
            _, loss = model(x, y)
        scored = y >= 0  # -1: not scored (a conversation's context: data/conversations.py)
        count = scored.sum()
        sums[0] += loss.double() * count
        sums[1] += count
        if table is not None:
            sums[2] += (table[y.clamp(min=0)] * scored).sum()
        if on_batch is not None:
            on_batch(y.numel())
    model.train(was_training)
    total, count, nbytes = reduce_sum(sums).tolist()
    return HeldOut(total, int(count), int(nbytes) if table is not None else None)


def evaluate(
    model: GPT,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: bool = False,
    token_bytes: np.ndarray | None = None,
) -> EvalResult:
    """Mean next-token loss of ``model`` over every token of ``tokens`` (1-D ids), and with
    ``token_bytes`` (the tokenizer's) its bits per byte; see the module doc."""
    if not 1 <= seq_len <= model.config.block_size:
        raise GptforgeError(
            f"--seq-len {seq_len} is out of range: give 1 to the model's context "
            f"{model.config.block_size}"
        )
    if batch_size < 1:
        raise GptforgeError(f"--batch-size {batch_size} is out of range: give 1 or more")
    n = len(tokens)
    if n < 2:
        raise GptforgeError(f"only {n} token(s) to evaluate: give at least two tokens of text")
    start = time.perf_counter()
    windows = count_eval_windows(tokens, seq_len)
    tail_start = windows * seq_len  # the remainder window predicts tokens[tail_start+1 : n]
    tail: list[tuple[torch.Tensor, torch.Tensor]] = []
    if tail_start < n - 1:
        rest = torch.from_numpy(np.asarray(tokens[tail_start:n], dtype=np.int32))
        tail.append((rest[:-1].view(1, -1), rest[1:].view(1, -1)))  # (1, n - 1 - tail_start)
    batches = itertools.chain(iter_eval_batches(tokens, batch_size, seq_len), tail)
    with progress_bar(total=n - 1, desc="eval", unit="tok", unit_scale=True,
                      disable=not progress, leave=False) as bar:
        held = heldout_loss(model, batches, device, on_batch=bar.update, token_bytes=token_bytes)
    assert held.tokens == n - 1, (held.tokens, n)
    loss = held.loss
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=held.tokens,
                      bits_per_byte=held.bits_per_byte, bytes=held.bytes,
                      windows=windows, seq_len=seq_len, tail=n - 1 - windows * seq_len,
                      wall_s=time.perf_counter() - start)


def eval_tokens(data: str, split: str, tokenizer: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The tokens to score and what they are: a prepared directory's split (its tokenizer must be
    the model's) or a text file tokenized with the model's tokenizer."""
    if os.path.isdir(data):
        if split not in SPLITS:
            raise GptforgeError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
        meta = load_meta(data)
        if meta["tokenizer"] != tokenizer:
            raise GptforgeError(
                f"{data} was prepared with the {describe(meta['tokenizer'])}, not the model's "
                f"{describe(tokenizer)}: prepare the text again with the model's tokenizer "
                "(--tokenizer with the run), or pass the text file"
            )
        tokens = load_split(data, split, verify="sha256")  # eval reads it all anyway
        if len(tokens) == 0:
            raise GptforgeError(
                f"{data} has no {split} tokens: pass --split train, or prepare with --val-fraction > 0"
            )
        return tokens, f"{data} ({split} split)"
    if not os.path.isfile(data):
        raise GptforgeError(f"--data {data} does not exist: give a prepared directory or a text file")
    try:
        with open(data, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise GptforgeError(
            f"{data} is not UTF-8 text (byte offset {e.start}): convert it to UTF-8"
        ) from None
    except OSError as e:
        raise GptforgeError(f"cannot read {data} ({e.strerror}): check the path") from None
    ids = tokenizer_from_dict(tokenizer).encode(text)
    return np.asarray(ids, dtype=np.int64), data


def evaluate_path(
    ckpt_path: str,
    data: str,
    split: str = "val",
    batch_size: int = 4,
    seq_len: int = 0,
    device: str = "auto",
    progress: bool = False,
    weights_dtype: str = "float32",
) -> tuple[EvalResult, str]:
    """Evaluate a checkpoint (or Hugging Face GPT-2 directory) on ``data``; seq_len 0 means the
    model's whole context; the weights in ``weights_dtype`` (float32: as stored). Returns the
    result and a description of what was scored."""
    model, tokenizer = load_model(ckpt_path)
    tokens, what = eval_tokens(data, split, tokenizer)
    # a trained BPE's vocabulary file is in its prepared directory (eval_tokens checked it is the model's)
    token_bytes = tokenizer_from_dict(tokenizer, directory=data if os.path.isdir(data) else None
                                      ).token_bytes()
    dev = pick_device(device)
    model = _on(model, dev, weights_dtype)
    result = evaluate(model, tokens, seq_len or model.config.block_size, batch_size, dev, progress,
                      token_bytes=token_bytes)
    return result, what


def evaluate_hellaswag_path(
    ckpt_path: str,
    data: str | None = None,
    limit: int = 0,
    batch_size: int = 4,
    device: str = "auto",
    progress: bool = False,
    weights_dtype: str = "float32",
) -> tuple[HellaSwagResult, str]:
    """HellaSwag acc and acc_norm of a checkpoint (or Hugging Face GPT-2 directory) on ``data``
    (a HellaSwag .jsonl file; None: the validation set, downloaded once). Returns the result and
    the path of the file scored."""
    model, tokenizer = load_model(ckpt_path)
    items, path = load_rendered(data, tokenizer, model.config.block_size, what=ckpt_path,
                                limit=limit)
    dev = pick_device(device)
    return score(_on(model, dev, weights_dtype), items, batch_size=batch_size, device=dev,
                 progress=progress), path


def _on(model: GPT, device: torch.device, weights_dtype: str) -> GPT:
    """The loaded (float32) model on ``device``, its weights cast only when asked: the losses
    ``eval`` reports stay those of the checkpoint as stored."""
    if weights_dtype == "float32":
        return model.to(device)
    return weights.prepare(model, weights_dtype, device)[0]
