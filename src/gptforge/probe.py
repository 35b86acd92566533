"""What ``train.dtype=auto`` becomes on a CPU, measured on the CPU at hand instead of guessed.

Whether bf16 autocast beats fp32 on a CPU depends on more than its flags: an Intel Xeon with AMX
trains GPT-2 124M 2.3x faster in bf16, while one with AVX512-BF16 and no AMX ran it at 0.62x of
fp32 (issue 30), and on either a narrow model loses to the casts autocast adds. So the first time
a combination is met (the CPU's model and flags, the torch version, the threads, the model's
shape and the micro-batch's), a probe of a few seconds times the run's own shapes both ways:

- one transformer block, forward and backward, on the micro-batch (at most ``PROBE_TOKENS`` of
  its tokens; the time scales with the rest), with activation checkpointing if the run uses it;
- the head: final LayerNorm, the tied output matrix over the whole vocabulary, cross-entropy,
  forward and backward, on ``HEAD_ROWS`` positions;
- the optimizer's update (fp32 in both: the same cost, which dilutes the difference);

under the run's allocator setting (``train.keep_freed_memory``: without it a small model with
GPT-2's vocabulary page-faults its logits in afresh every step, which hides what bf16 gains).

A step's estimate is ``accum x (n_layer x block + head) + update``, each part scaled to the full
micro-batch. A CPU that emulates bf16 would take minutes to time that (its bf16 is ~36x slower):
one matmul of the model's width screens it out first, in milliseconds. bf16 is chosen only if it is faster by ``BF16_MARGIN``, so that noise cannot flip the
choice. The answer is cached in gptforge's cache directory (``probes.json`` beside the named
datasets), keyed by that combination; ``gptforge config --measure`` measures again.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptforge.atomic import write_text
from gptforge.cachedir import default_cache_dir
from gptforge.config import GPTConfig
from gptforge.memory import keep_freed_memory
from gptforge.model import Block

# bf16 autocast must make a step at least this much faster to be chosen: within 5% either dtype
# is as good as the other, so noise there cannot flip the choice to a slower one
BF16_MARGIN = 1.05
PROBE_TOKENS = 1024  # a block is timed on at most this many tokens of the micro-batch (>= 1 row)
HEAD_ROWS = 256  # the head is timed on this many positions
REPEATS = 2  # timed rounds at the least (each times every part in each dtype); the fastest counts
WARMUP_S, TIMED_S, MAX_ROUNDS = 0.3, 0.5, 50  # see _fastest
SCREEN_ROWS = 512  # rows of the screening matmul (see _screen)
SCREEN_SLOWER = 2.0  # bf16 matmuls this much slower than fp32 (emulated, or too small a width
# for bf16 to pay: gpt2-tiny's 16 on an AMX Xeon): fp32 without timing a step
CACHE_FILE = "probes.json"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class ProbeShape:
    """What a step's cost depends on, besides the machine."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab: int  # rows of the output matrix (the padded vocabulary)
    batch: int  # micro-batch rows
    seq_len: int
    accum: int  # micro-batches per optimizer step
    checkpointing: bool = False
    bias: bool = True  # the Linear and LayerNorm layers have biases (GPT-2's do)
    keep_freed: bool = True  # train.keep_freed_memory: glibc keeps freed blocks (memory.py)

    @property
    def label(self) -> str:
        ac = ", activation checkpointing" if self.checkpointing else ""
        return (f"{self.n_layer} layers x {self.n_embd} wide, {self.n_head} heads, vocabulary "
                f"{self.vocab:,}, micro-batch {self.batch} x {self.seq_len} x {self.accum}{ac}")


@dataclass(frozen=True)
class DtypeChoice:
    """A measured answer: which dtype, and the times it was decided on."""

    dtype: str  # "bfloat16" or "float32"
    fp32_s: float  # the estimated optimizer step in fp32, seconds
    bf16_s: float  # ... in bf16 autocast
    measured: str  # when (UTC, ISO 8601)
    probe_s: float  # what the probe itself took
    cached: bool = False  # read from the cache rather than measured by this process
    note: str = ""  # why it was not cached, where it could not be
    timed: str = "step"  # what the times are of: "step", or "matmul" where the screen decided

    @property
    def speedup(self) -> float:
        """How much faster bf16 autocast made a step (below 1: slower)."""
        return self.fp32_s / self.bf16_s

    def line(self) -> str:
        """Why, in one line (train's start-up log, `gptforge config`)."""
        how = (f"cached, measured {self.measured[:10]}" if self.cached
               else f"measured now in {self.probe_s:.1f}s")
        verdict = ("bf16 autocast is chosen" if self.dtype == "bfloat16"
                   else f"fp32 is kept (bf16 must be {BF16_MARGIN:.2f}x)")
        note = f"; {self.note}" if self.note else ""
        what = ("a step" if self.timed == "step"
                else "the model's MLP matmul (so much slower that no step was timed)")
        return (f"train.dtype=auto -> {self.dtype}: on this CPU bf16 autocast made {what} "
                f"{self.speedup:.2f}x as fast as fp32, so {verdict} ({how}{note})")

    def record(self) -> dict:
        """What run.json keeps of the decision."""
        return {"dtype": self.dtype, "bf16_speedup": round(self.speedup, 3), "timed": self.timed,
                "margin": BF16_MARGIN, "fp32_step_s": round(self.fp32_s, 4),
                "bf16_step_s": round(self.bf16_s, 4), "measured": self.measured,
                "cached": self.cached}


# ----------------------------------------------------------------------------------------------
# The combination a measurement holds for


def cpu_identity() -> tuple[str, str]:
    """(the CPU's model name, a digest of its feature flags), from /proc/cpuinfo where there is
    one (Linux); elsewhere what the platform module says, and no flags."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "CPU part") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return model, hashlib.sha256(flags.encode()).hexdigest()[:12]


# Settings that hold torch's, oneDNN's or MKL's kernels to fewer instructions than the CPU has:
# what is fast under them is another question (BENCHMARKS.md uses them as stand-ins for slower CPUs).
ISA_SETTINGS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine_key() -> str:
    """What any measurement on this CPU depends on besides the shapes timed: the CPU's model and
    flags, settings that hold its kernels to fewer instructions, torch and its threads."""
    model, flags = cpu_identity()
    held = "".join(f" | {k}={os.environ[k]}" for k in ISA_SETTINGS if os.environ.get(k))
    return f"{model} | flags {flags}{held} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def probe_key(shape: ProbeShape) -> str:
    s = shape
    return (f"{machine_key()} | L{s.n_layer} C{s.n_embd} H{s.n_head} V{s.vocab} | "
            f"{s.batch}x{s.seq_len}x{s.accum}{' ac' if s.checkpointing else ''}"
            f"{'' if s.bias else ' no-bias'}{'' if s.keep_freed else ' malloc-trim'}")


# ----------------------------------------------------------------------------------------------
# The cache


def cache_path() -> str:
    return os.path.join(default_cache_dir(), CACHE_FILE)


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measured again and rewritten
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if data.get("format") == CACHE_FORMAT and isinstance(entries, dict) else {}


def _from_entry(entry: object) -> DtypeChoice | None:
    try:
        return DtypeChoice(**{**entry, "cached": True, "note": ""})  # type: ignore[arg-type]
    except TypeError:
        return None  # an entry of another version's shape: measured again


def cached_choice(shape: ProbeShape) -> DtypeChoice | None:
    """The cached answer for ``shape`` on this machine, or None (never measured here)."""
    return _from_entry(_read_cache(cache_path()).get(probe_key(shape)))


@contextlib.contextmanager
def _cache_lock(path: str) -> Iterator[str]:
    """Hold the cache's lock (so that processes starting together, test workers or the ranks of
    several runs, measure once and the others read), or yield a reason it cannot be written."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        yield (f"not cached: {os.path.dirname(path)} is not writable ({e.strerror}); set "
               "GPTFORGE_CACHE to a writable directory")
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield ""
    finally:
        os.close(fd)


def remembered(key: str, measure_now: Callable[[], dict], again: bool = False) -> tuple[dict, str]:
    """The cache's entry for ``key`` (marked ``"cached": True``), or, where there is none or
    ``again``, a new one from ``measure_now()``, cached. Returns (entry, note): the note says why
    the entry could not be cached ("" otherwise). Other measurements than train's (generation's
    weights dtype, weights.py) keep their answers here too, under keys of their own."""
    path = cache_path()
    with _cache_lock(path) as problem:
        entries = {} if problem else _read_cache(path)
        if not again and isinstance(entries.get(key), dict):
            return {**entries[key], "cached": True}, ""
        entry = measure_now()
        if problem:
            return entry, problem
        entries[key] = entry
        try:
            write_text(path, json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1))
        except OSError as e:
            return entry, f"not cached: {e.strerror}"
        return entry, ""


def measured_choice(shape: ProbeShape, again: bool = False) -> DtypeChoice:
    """The cached answer for ``shape``, or (none, or ``again``) a new measurement, cached."""
    def measure_now() -> dict:
        return {k: v for k, v in asdict(measure(shape)).items() if k not in ("cached", "note")}

    entry, note = remembered(probe_key(shape), measure_now, again)
    found = _from_entry(entry) if entry.get("cached") else None
    if found is not None:
        return found
    entry = {k: v for k, v in entry.items() if k != "cached"}
    try:
        return DtypeChoice(**{**entry, "note": note})
    except TypeError:  # an entry of another version's shape: measured again
        return measured_choice(shape, again=True)


# ----------------------------------------------------------------------------------------------
# The measurement


def _fastest(passes: dict[str, Callable[[], None]], warmup_s: float = WARMUP_S,
             timed_s: float = TIMED_S, in_a_row: int = 1) -> dict[str, float]:
    """Each pass's fastest timed run. Untimed rounds first, for at least ``warmup_s`` (oneDNN
    builds its kernels and the thread pool wakes on first use: the first passes in a process ran
    up to 10x slower here); then at least ``REPEATS`` timed rounds, more while they add up to
    less than ``timed_s``. The passes alternate, so that a change in the machine's load or clock
    affects every pass alike. With ``in_a_row`` > 1 a round runs each pass that many times in a
    row and times the last, as a loop that runs one pass over and over finds the CPU's caches
    (weights.py: a small model's fp32 decode step ran 1.6x faster so than after the other dtypes'
    passes had taken the caches)."""
    t0 = time.perf_counter()
    for n in range(MAX_ROUNDS):
        for run in passes.values():
            run()
        if time.perf_counter() - t0 >= warmup_s:
            break
    best = {name: float("inf") for name in passes}
    t0 = time.perf_counter()
    for n in range(MAX_ROUNDS):
        for name, run in passes.items():
            for _ in range(in_a_row - 1):
                run()
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
        if n + 1 >= REPEATS and time.perf_counter() - t0 >= timed_s:
            break
    return best


def _parts(shape: ProbeShape, bf16: bool, g: torch.Generator) -> dict[str, Callable[[], None]]:
    """The block and head passes of ``shape`` in one dtype, on the CPU."""
    cfg = GPTConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                    block_size=shape.seq_len, vocab_size=shape.vocab, bias=shape.bias)
    block = Block(cfg)
    rows = max(1, min(shape.batch, PROBE_TOKENS // shape.seq_len))
    x = torch.randn(rows, shape.seq_len, shape.n_embd, generator=g, requires_grad=True)
    ln_f = torch.nn.LayerNorm(shape.n_embd, bias=shape.bias)
    head = torch.randn(shape.vocab, shape.n_embd, generator=g).mul_(0.02).requires_grad_()
    h = torch.randn(HEAD_ROWS, shape.n_embd, generator=g, requires_grad=True)
    targets = torch.randint(0, shape.vocab, (HEAD_ROWS,), generator=g)
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def block_pass() -> None:
        with cast:
            y = checkpoint(block, x, use_reentrant=False) if shape.checkpointing else block(x)
        y.float().sum().backward()

    def head_pass() -> None:
        with cast:
            logits = F.linear(ln_f(h), head)
        F.cross_entropy(logits.float(), targets).backward()

    return {"block": block_pass, "head": head_pass}


def _update_s(shape: ProbeShape, g: torch.Generator) -> float:
    """One AdamW update of a whole model of ``shape`` (a block's parameters times n_layer, and
    the output matrix), which costs the same in either dtype."""
    cfg = GPTConfig(n_layer=1, n_head=shape.n_head, n_embd=shape.n_embd, vocab_size=shape.vocab,
                    bias=shape.bias)
    times = []
    for params in (list(Block(cfg).parameters()),
                   [torch.randn(shape.vocab, shape.n_embd, generator=g, requires_grad=True)]):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt = torch.optim.AdamW(params, lr=1e-4)
        times.append(_fastest({"update": opt.step})["update"])
    return shape.n_layer * times[0] + times[1]


def _screen(shape: ProbeShape, g: torch.Generator) -> dict[str, float]:
    """The MLP's first matmul of ``shape`` (at most SCREEN_ROWS of its rows) in fp32 and under
    bf16 autocast: milliseconds where the whole probe of a CPU that emulates bf16 would take
    minutes (36x slower under AVX2 alone, BENCHMARKS.md)."""
    x = torch.randn(min(SCREEN_ROWS, shape.batch * shape.seq_len), shape.n_embd, generator=g)
    w = torch.randn(4 * shape.n_embd, shape.n_embd, generator=g)

    def matmul(bf16: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                F.linear(x, w)
        return run

    return _fastest({"32": matmul(False), "16": matmul(True)}, warmup_s=0.1, timed_s=0.1)


def measure(shape: ProbeShape) -> DtypeChoice:
    """Time ``shape``'s step both ways on the CPU, here and now (see the module's docstring).
    Where bf16 matmuls alone are SCREEN_SLOWER times slower than fp32 (no native bf16), fp32
    is kept on that screen's evidence: autocast makes nothing but matmuls faster."""
    if shape.keep_freed:  # as the run will: a step's time depends on it (2x for small models)
        keep_freed_memory()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with torch.random.fork_rng(devices=[]):  # a run's own random numbers stay as they were
        torch.manual_seed(0)
        screen = _screen(shape, g)
        if screen["16"] >= SCREEN_SLOWER * screen["32"]:
            return DtypeChoice(dtype="float32", fp32_s=screen["32"], bf16_s=screen["16"],
                               probe_s=time.perf_counter() - t0, measured=now, timed="matmul")
        fp32, bf16 = _parts(shape, False, g), _parts(shape, True, g)
        best = _fastest({"block32": fp32["block"], "block16": bf16["block"],
                         "head32": fp32["head"], "head16": bf16["head"]})
        update = _update_s(shape, g)
    rows = max(1, min(shape.batch, PROBE_TOKENS // shape.seq_len))
    block_scale = shape.n_layer * shape.batch / rows
    head_scale = shape.batch * shape.seq_len / HEAD_ROWS

    def step(d: str) -> float:
        return shape.accum * (block_scale * best[f"block{d}"] + head_scale * best[f"head{d}"]) + update

    fp32_s, bf16_s = step("32"), step("16")
    return DtypeChoice(
        dtype="bfloat16" if fp32_s >= BF16_MARGIN * bf16_s else "float32",
        fp32_s=fp32_s, bf16_s=bf16_s, probe_s=time.perf_counter() - t0, measured=now,
    )
