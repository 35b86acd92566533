"""The weights' dtype for generation (sample, chat, serve), and what ``auto`` becomes here.

Generating one token at batch 1 reads every weight once and does little arithmetic with it, so
its speed follows the bytes of the weights: GPT-2 124M reads 498 MB a token in fp32. Smaller
weights read less, but whether a CPU turns that into tokens per second depends on its kernels,
not its flags: on an AMX Xeon at batch 1, bf16 weights decoded only 1.03x-1.13x as fast as fp32
(BENCHMARKS.md, "Generation with bf16 and int8 weights"), int8 ones 1.5x-1.8x. So, as for ``train.dtype=auto``
(probe.py), ``auto`` is measured, once per machine and model shape, and cached beside it:

- float32: the checkpoint as it is; what ``eval`` always uses, so reported losses do not move.
- bfloat16: every weight and activation in bf16 (the KV cache too); logits are widened to fp32
  before sampling.
- int8: bf16, with every Linear's weight (the tied head and embedding too) in int8, one scale
  per output row (symmetric, as torchao's ``Int8WeightOnlyConfig`` quantizes; torchao is imported
  only here, ``pip install 'gptforge[int8]'``). CPU only. The matmul is PyTorch's own CPU kernel
  for int8 weights (``torch._weight_int8pack_mm``, what gpt-fast uses on CPU): torchao 0.18's
  eager int8 linear widens the whole weight to the activations' dtype on every call, which made
  a 768 x 3072 matmul at batch 1 2.8x slower than fp32 here, so its quantized weights are kept
  and its matmul is not.

``auto``: on CUDA a rule (bf16 where the GPU has it, as train's autocast); on MPS fp32; on a CPU,
a decode step of the model's own shape (one block, the head and the sampling step, on a KV cache
of about ``DECODE_CONTEXT`` positions, at the command's batch; for the server, rows of different
lengths, as its engine decodes them) timed in each dtype, and the least precise dtype chosen
that is ``MARGIN`` faster than the more precise ones (int8 is timed only where torchao is
installed). In 0.1.0 the step timed the model alone, on rows of one length, and batched
decoding kept fp32 by a rule: that step had bf16 1.18x as fast as fp32 for gpt2-mini at 16 rows
where the server ran it 5x slower, a cost that was in the sampling step (BENCHMARKS.md). The same seed gives the same text for a given dtype; another dtype may
give other text (its logits differ in rounding).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge import probe
from gptforge.config import WEIGHTS_DTYPES, GPTConfig
from gptforge.errors import GptforgeError
from gptforge.model import GPT, KVCache, RaggedKVCache
from gptforge.sampling import Sampling, draw

AUTO = "auto"
PRECISION = ("float32", "bfloat16", "int8")  # most precise first
FLAG = "--weights-dtype"
# A less precise dtype must make a decode step at least this much faster to be chosen: within
# 5% the more precise one is as good, and noise cannot flip the choice (probe.py's margin too).
MARGIN = 1.05
DECODE_CONTEXT = 32  # positions in the KV cache while a decode step is timed
# Each pass runs 3 times in a row and the last is timed, as generation runs one step after
# another: timed right after the other dtypes' passes, gpt2-mini's fp32 step lost the CPU's caches
# and the probe had int8 1.33x as fast where generate() ran it 0.93x (BENCHMARKS.md).
IN_A_ROW = 3
INT8_K_MULTIPLE = 16  # the int8 kernel's inner loop takes 16 inputs at a time (AVX-512)


def check(name: str) -> None:
    """One line naming the problem and the fix, for a value that is not a weights dtype."""
    if name not in WEIGHTS_DTYPES:
        raise GptforgeError(f"{FLAG} {name} is not a weights dtype: give {', '.join(WEIGHTS_DTYPES)}")


def int8_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


# ----------------------------------------------------------------------------------------------
# int8 weights


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with q (N, K) int8 and one scale per output row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # q a (frozen) parameter, so that num_params counts the model's parameters as in fp32
        self.q = nn.Parameter(q, requires_grad=False)  # (N, K) int8
        self.register_buffer("scale", scale)  # (N,) in the activations' dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = x.size(-1)
        if K % INT8_K_MULTIPLE or x.device.type != "cpu":
            # The kernel reads 16 inputs at a time with aligned loads: wrong sums (or a crash)
            # for a K it was not written for (a tiny model's). Widening the weight is correct.
            w = self.q.to(x.dtype) * self.scale[:, None]
            return F.linear(x, w, self.bias)
        x2 = x.reshape(-1, K)  # (B*T, K); a copy only where x is not contiguous
        if x2.data_ptr() % 64:  # aligned loads: a view into the middle of a tensor is copied
            x2 = x2.clone()
        y = torch._weight_int8pack_mm(x2, self.q, self.scale)  # (B*T, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


class Int8Embedding(nn.Module):
    """Rows of the tied head's int8 matrix as token embeddings (GPT-2 ties them: one copy)."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.head = [head]  # a list: not a second registration of the same parameters

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        return F.embedding(idx, head.q).to(head.scale.dtype) * head.scale[idx][..., None]


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Importing torchao 0.18 under a torch it was not built for logs a warning for each of its
    compiled extensions (CUDA and MX kernels, none of which int8 uses) and one of torch's
    deprecations: lines a command's output should not carry."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _to_int8(model: GPT) -> GPT:
    """bf16 with int8 Linear weights, quantized by torchao from the fp32 weights."""
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise GptforgeError(f"{FLAG} int8 needs torchao ({e.name} is missing): pip install "
                            "'gptforge[int8]', or use bfloat16") from None
    model = model.float()
    quantize_(model, Int8WeightOnlyConfig())  # every nn.Linear's weight: an Int8Tensor
    act = torch.bfloat16
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                w = child.weight
                bias = None if child.bias is None else child.bias.detach().to(act)
                setattr(module, name, Int8Linear(w.qdata.contiguous(),
                                                 w.scale.reshape(-1).to(act), bias))
    model.transformer.wte = Int8Embedding(model.lm_head)
    # LayerNorms, positions and biases in bf16: the kernel takes bf16 activations, and with
    # fp32 ones it ran 11x slower than with bf16 here (770 against 68 us for 768 x 3072).
    for p in model.parameters():
        if p.dtype.is_floating_point:
            p.data = p.data.to(act)
    return model


def cast(model: GPT, dtype: str) -> GPT:
    """``model`` (fp32, on the CPU or its device) with its weights in ``dtype``, in eval mode."""
    if dtype == "bfloat16":
        return model.to(torch.bfloat16).eval()
    if dtype == "int8":
        return _to_int8(model).eval()
    return model.float().eval()


# ----------------------------------------------------------------------------------------------
# What auto becomes


@dataclass(frozen=True)
class WeightsChoice:
    """The dtype generation uses, and why."""

    dtype: str
    how: str  # "asked", "rule" (CUDA, MPS), "measured" or "cached"
    device: str = "cpu"
    step_s: dict[str, float] = field(default_factory=dict)  # a decode step's estimate per dtype
    measured: str = ""  # when (UTC, ISO 8601)
    probe_s: float = 0.0
    note: str = ""

    def speedups(self) -> dict[str, float]:
        """Each dtype's decode speed as a multiple of fp32's."""
        base = self.step_s.get("float32")
        return {d: base / s for d, s in self.step_s.items() if base and s}

    def line(self) -> str:
        """The start-up line of sample, chat and serve."""
        if self.how == "asked":
            return f"weights: {self.dtype} ({FLAG} {self.dtype})"
        if self.how == "rule":
            why = "bf16 where the GPU has it" if self.device.startswith("cuda") else "fp32 off the CPU and CUDA"
            return f"weights: {self.dtype} ({FLAG} auto on {self.device}: {why})"
        rates = ", ".join(f"{d} {x:.2f}x" for d, x in self.speedups().items() if d != "float32")
        how = (f"cached, measured {self.measured[:10]}" if self.how == "cached"
               else f"measured now in {self.probe_s:.1f}s")
        note = f"; {self.note}" if self.note else ""
        return (f"weights: {self.dtype} ({FLAG} auto: on this CPU a decode step of this model "
                f"ran {rates} as fast as float32; a less precise dtype must be {MARGIN:.2f}x "
                f"faster to be chosen; {how}{note})")

    def record(self) -> dict:
        """What serve's /v1/models says of it."""
        return {"dtype": self.dtype, "how": self.how,
                "speedup_vs_float32": {d: round(x, 3) for d, x in self.speedups().items()}}


def decide(step_s: dict[str, float]) -> str:
    """The least precise dtype that is MARGIN faster than every more precise one timed."""
    best = "float32"
    for d in PRECISION[1:]:
        if d in step_s and step_s[best] >= MARGIN * step_s[d]:
            best = d
    return best


def _decode_passes(cfg: GPTConfig, dtype: str, rows: int, ragged: bool) -> dict[str, Callable[[], None]]:
    """A decode step of a one-block model of ``cfg``'s shape in ``dtype`` (embedding, block,
    head and the sampling step at the default settings), and of its block alone, for ``rows``
    rows on a KV cache of about DECODE_CONTEXT positions: one length for every row (``generate``),
    or, ``ragged``, lengths that differ (the server's engine: its attention takes a mask)."""
    context = max(1, min(DECODE_CONTEXT, cfg.block_size - 1))
    model = cast(GPT(dataclasses.replace(cfg, n_layer=1)), dtype)
    lengths = [max(1, context - (b % 8 if ragged else 0)) for b in range(rows)]
    with torch.inference_mode():
        if ragged:  # one prompt's keys in every row, each row cut to its own length
            cache = RaggedKVCache(1, rows, cfg.block_size)
            prompt = KVCache(1, context)
            model(torch.zeros(1, context, dtype=torch.long), kv_cache=prompt)
            for b in range(rows):
                cache.load(b, prompt)
        else:
            cache = model.new_kv_cache()
            model(torch.zeros(rows, context, dtype=torch.long), kv_cache=cache)
    token = torch.zeros(rows, 1, dtype=torch.long)
    block = model.transformer.h[0]
    x = torch.randn(rows, 1, cfg.n_embd).to(model.transformer.wpe.weight.dtype)
    key = [Sampling().draw_key]
    generators = [torch.Generator().manual_seed(b) for b in range(rows)]

    def rewind() -> None:  # the same positions every time: the step's cost stays put
        if ragged:
            cache.lengths[:] = lengths
        else:
            cache.length = context

    @torch.inference_mode()
    def step() -> None:
        rewind()
        logits, _ = model(token, kv_cache=cache)
        draw(logits[:, -1, :].float(), key, generators)

    @torch.inference_mode()
    def block_step() -> None:
        rewind()
        cache.prepare(rows, 1, x.device)
        block(x, cache)

    return {f"step {dtype}": step, f"block {dtype}": block_step}


def measure(cfg: GPTConfig, rows: int, dtypes: tuple[str, ...], ragged: bool = False) -> dict:
    """Time a decode step of ``cfg`` in each of ``dtypes`` on this CPU: the cache's entry."""
    t0 = time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with torch.random.fork_rng(devices=[]):  # the caller's random numbers stay as they were
        torch.manual_seed(0)
        passes: dict[str, Callable[[], None]] = {}
        for d in dtypes:
            passes.update(_decode_passes(cfg, d, rows, ragged))
        best = probe._fastest(passes, in_a_row=IN_A_ROW)
    step_s = {d: best[f"step {d}"] + (cfg.n_layer - 1) * best[f"block {d}"] for d in dtypes}
    return {"step_s": step_s, "measured": now, "probe_s": time.perf_counter() - t0}


def decode_key(cfg: GPTConfig, rows: int, dtypes: tuple[str, ...], ragged: bool = False) -> str:
    # "and sampling": 0.1.0 timed the model alone, and its cached answers are not reused
    return (f"{probe.machine_key()} | decode and sampling L{cfg.n_layer} C{cfg.n_embd} "
            f"H{cfg.n_head} V{cfg.padded_vocab_size} T{cfg.block_size}{'' if cfg.bias else ' no-bias'} | "
            f"batch {rows}{' ragged' if ragged else ''} | {' '.join(dtypes)}")


def resolve(name: str, cfg: GPTConfig, device: torch.device, rows: int = 1,
            again: bool = False, ragged: bool = False) -> WeightsChoice:
    """What ``name`` (checked) becomes for a model of ``cfg`` on ``device`` at batch ``rows``
    (``ragged``: rows of different lengths, as the server decodes them)."""
    check(name)
    if name == "int8" and device.type != "cpu":
        raise GptforgeError(f"{FLAG} int8 runs on the CPU only: use bfloat16 on {device.type}, "
                            "or --device cpu")
    if name != AUTO:
        return WeightsChoice(name, "asked", str(device))
    if device.type == "cuda":
        return WeightsChoice("bfloat16" if torch.cuda.is_bf16_supported() else "float32", "rule", "cuda")
    if device.type != "cpu":
        return WeightsChoice("float32", "rule", device.type)
    dtypes = PRECISION if int8_available() else PRECISION[:2]
    entry, note = probe.remembered(decode_key(cfg, rows, dtypes, ragged),
                                   lambda: measure(cfg, rows, dtypes, ragged), again)
    step_s = entry["step_s"]
    return WeightsChoice(decide(step_s), "cached" if entry.get("cached") else "measured", "cpu",
                         step_s, entry["measured"], entry["probe_s"], note)


def prepare(model: GPT, name: str, device: torch.device, rows: int = 1,
            ragged: bool = False) -> tuple[GPT, WeightsChoice]:
    """``model`` (fp32, as loaded) on ``device`` with its weights in the dtype ``name`` becomes."""
    choice = resolve(name, model.config, device, rows, ragged=ragged)
    return cast(model, choice.dtype).to(device), choice
