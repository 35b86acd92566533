"""Fitting the memory there is: which micro-batches keep a step's tokens, the largest of them that
fits (by trial steps), running out of memory said as one line, and the allocator's habits.

- ``micro_batch_candidates``: the micro-batches that keep ``train.total_batch_tokens`` per step.
- ``MemoryTrial`` and ``largest_that_fits``: ``train.batch_size=auto``'s search on CUDA, a trial
  forward and backward per size, bisected, under ``HEADROOM`` of the GPU's memory.
- ``is_out_of_memory`` and the messages (``out_of_memory`` for train, ``bench_out_of_memory``,
  ``nothing_fits`` for the search): every out-of-memory line gptforge prints is written here, on
  one frame (``_ran_out``), with the peak ``memory_line`` measured.
- ``release_memory`` and ``keep_freed_memory``: handing cached memory back, or keeping it.

Why this sits below device.py, not beside it: what ``train.batch_size=auto`` becomes on each
device (device.resolve_for) describes this search, its candidates and its headroom; the trials
need only a device and an autocast context, not device.py's Precision.
"""

from __future__ import annotations

import contextlib
import gc
import resource
from collections.abc import Callable

import torch

from gptforge.config import ConfigError, TrainConfig
from gptforge.errors import GptforgeError

# ----------------------------------------------------------------------------------------------
# train.batch_size=auto: the micro-batches that keep the step, and the largest that fits

HEADROOM = 0.9  # a trial micro-batch must peak under this share of the GPU's memory


def micro_batch_candidates(t: TrainConfig, world_size: int = 1) -> list[int]:
    """The micro-batches that keep ``train.total_batch_tokens`` per step: the divisors of
    total_batch_tokens / (seq_len x processes), smallest first."""
    per_sequence = t.seq_len * world_size
    if t.total_batch_tokens % per_sequence:
        procs = f" x {world_size} processes" if world_size > 1 else ""
        raise ConfigError(
            f"train.batch_size=auto keeps train.total_batch_tokens={t.total_batch_tokens}, which "
            f"must then be a multiple of train.seq_len{procs} = {per_sequence}: change one of them"
        )
    n = t.total_batch_tokens // per_sequence
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_that_fits(sizes: list[int], trial: Callable[[int], None]) -> tuple[int | None, list[tuple[int, bool]]]:
    """The largest of ``sizes`` (ascending) for which ``trial(size)`` does not run out of memory,
    by bisection (memory grows with the micro-batch), and every (size, fitted) tried, in order.
    None if not even the smallest fits. ``trial`` signals "does not fit" by raising
    torch.cuda.OutOfMemoryError, as the allocator does."""
    lo, hi, best = 0, len(sizes) - 1, None
    tried: list[tuple[int, bool]] = []
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            trial(sizes[mid])
            fits = True
        except torch.cuda.OutOfMemoryError:
            fits = False
        tried.append((sizes[mid], fits))
        if fits:
            best, lo = sizes[mid], mid + 1
        else:
            hi = mid - 1
    return best, tried


def release_memory(device: torch.device) -> None:
    """Hand the allocator's cached blocks back and start the peak statistics afresh."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class MemoryTrial:
    """``trial(b)``: one training forward and backward of a (b, seq_len) micro-batch of random
    tokens through ``model`` on ``device`` under ``amp`` (the run's autocast, as train_step takes
    it), with ``reserve_bytes`` held aside for the optimizer's state (created at the first real
    step). On CUDA a trial that peaks above ``HEADROOM`` of the GPU's memory counts as out of
    memory too: what barely fits in one trial fails later, when the allocator's cache is
    fragmented or evaluation needs its share."""

    def __init__(self, model: torch.nn.Module, device: torch.device,
                 amp: Callable[[], contextlib.AbstractContextManager], seq_len: int, vocab_size: int,
                 reserve_bytes: int = 0):
        self.model, self.device, self.amp, self.seq_len = model, device, amp, seq_len
        self.vocab_size, self.reserve_bytes = vocab_size, reserve_bytes
        self.budget = (HEADROOM * torch.cuda.get_device_properties(device).total_memory
                       if device.type == "cuda" else None)

    def __call__(self, b: int) -> None:
        device = self.device
        release_memory(device)  # what an earlier trial (or its exception) held is gone by now
        try:
            self._step(b, device)
        finally:
            self.model.zero_grad(set_to_none=True)

    def _step(self, b: int, device: torch.device) -> None:
        reserve = torch.empty(self.reserve_bytes, dtype=torch.uint8, device=device)
        tokens = torch.randint(0, self.vocab_size, (b, self.seq_len + 1), device=device)
        with self.amp():
            _, loss = self.model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        del reserve
        if self.budget is not None:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_reserved(device)
            if peak > self.budget:
                raise torch.cuda.OutOfMemoryError(
                    f"the trial peaked at {peak / 2**30:.1f} GiB, over {HEADROOM:.0%} of the GPU's memory")


# ----------------------------------------------------------------------------------------------
# Running out of memory as one line


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU's and MPS's allocation failures (plain RuntimeErrors)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "MPS backend out of memory" in text)


def memory_line(device: torch.device) -> str:
    """The peak memory of this process on ``device``, for a message."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        return f"peak {peak:.1f} GiB allocated of the GPU's {total:.1f} GiB"
    # ru_maxrss is in KiB on Linux: the whole process
    return f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB of process memory"


def out_of_memory(e: BaseException, device: torch.device, t: TrainConfig, world_size: int,
                  when: str, then: str) -> GptforgeError:
    """Running out of memory as one line: where, the micro-batch, the peak, and what to change.
    ``when`` says at what point ("after 120 steps"), ``then`` what becomes of the run."""
    import re

    asked = re.search(r"[Tt]ried to allocate [0-9.]+ [KMGT]?i?B", str(e))
    tried = f"; t{asked.group(0)[1:]}" if asked else ""
    b = t.batch_size
    fixes = []
    smaller = [s for s in micro_batch_candidates(t, world_size) if s < b] if isinstance(b, int) else []
    if smaller:
        s = smaller[-1]
        accum = t.total_batch_tokens // (s * t.seq_len * world_size)
        fixes.append(f"a smaller train.batch_size (e.g. {s}: {accum} accumulation steps keep the "
                     f"step at {t.total_batch_tokens:,} tokens)")
    if not t.activation_checkpointing:
        fixes.append("train.activation_checkpointing=true")
    if not fixes:
        fixes.append("a shorter train.seq_len or a smaller model")
    return _ran_out(device, f"{b} x {t.seq_len}", f"set {' or '.join(fixes)}; {then}", when, tried)


def bench_out_of_memory(device: torch.device, shape: str, activation_checkpointing: bool) -> GptforgeError:
    """``gptforge bench`` running out of memory on a micro-batch of ``shape`` ("16 x 64"): the
    same line, with bench's own options to change."""
    return _ran_out(device, shape, "try a smaller --batch-size"
                    + ("" if activation_checkpointing else " or --activation-checkpointing"))


def nothing_fits(device: torch.device, t: TrainConfig, smallest: int, sharded: bool) -> GptforgeError:
    """``train.batch_size=auto``'s search found no micro-batch that fits, not even ``smallest``.
    ``sharded``: the run shards with FSDP over several processes, which the trials do not."""
    return GptforgeError(
        f"train.batch_size=auto: not even a micro-batch of {smallest} x {t.seq_len} tokens fits "
        f"on {device} ({memory_line(device)}): set "
        + ("" if t.activation_checkpointing else "train.activation_checkpointing=true, ")
        + "a shorter train.seq_len or a smaller model"
        + ("; the trials run unsharded, so with train.parallel=fsdp a model that fits only "
           "sharded needs train.batch_size set by hand" if sharded else ""))


def _ran_out(device: torch.device, shape: str, fixes: str, when: str = "", tried: str = "") -> GptforgeError:
    """The frame of every out-of-memory line: where (and ``when``), the micro-batch, the peak
    (and what the allocator ``tried``), then ``fixes``: what to change."""
    when = f" {when}" if when else ""
    return GptforgeError(f"out of memory on {device}{when} with a micro-batch of {shape} tokens "
                         f"({memory_line(device)}{tried}): {fixes}")


# ----------------------------------------------------------------------------------------------
# The allocator


def keep_freed_memory() -> bool:
    """Stop glibc from returning large freed blocks to the OS (Linux only; returns success).

    By default glibc serves every allocation above ~128 KB-32 MB with its own mmap and unmaps it
    on free, so each training step page-faults its activation buffers in afresh. Raising the
    mmap and trim thresholds keeps them in the heap for reuse (mallopt(3)). Measured here:
    2.1-2.5x on a small model with GPT-2's vocabulary, 1.09x on 124M (BENCHMARKS.md). Memory
    then stays at the run's peak, which a training process reaches every step anyway.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # 1 GiB: above the largest activation of a 124M step (the 16 x 64 x 50,257 fp32 logits are
    # 206 MB), the value measured in BENCHMARKS.md. mallopt returns 1 on success.
    ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return bool(ok)


