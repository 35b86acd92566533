"""``gptforge bench``: training throughput of one full step, the way ``train`` runs it.

A step is forward + backward over one micro-batch, gradient clipping and the optimizer step, the
same ``train_step`` the trainer uses: AdamW for a model preset, the run preset's own optimizer
(e.g. Muon for ``shakespeare-char-speedrun``) for a run preset. Batches come from the real loader
through the real host-to-device path (int32 ids, pinned buffers on CUDA), over random tokens or a
prepared directory. The defaults are train's own for the device: on CUDA, 64 x 1024 micro-batches,
compiled, the vocabulary padded to 64, bf16; on the CPU, 16 x 64, eager. Under torchrun
(``--nproc N``) every process steps a DDP replica and the figures are for the whole job.

Reported: tokens/s, achieved FLOP/s, MFU against the device's peak (on the CPU a matmul peak
measured here; on CUDA the card's data-sheet bf16 peak, its form factor named, with a measured
8192 x 8192 bf16 matmul beside it), peak memory, and the one-time start-up cost (first steps,
compilation) apart from the steady state.

``plain=True`` measures the baseline every figure is compared with: fp32, eager, glibc's default
allocator, torch's default AdamW. The allocator setting is process-wide, so a baseline in the same
run is measured in a child process (``compare_with_plain``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge.config import AUTO, MODEL_PRESETS, GPTConfig, OptimConfig, RunConfig, TrainConfig
from gptforge.presets import run_preset
from gptforge.data import BatchFeeder, TokenLoader, load_meta, load_split
from gptforge.device import Precision, configure_backends, cpu_auto_dtype, resolve_for
from gptforge.distributed import DistEnv, gather_objects, session
from gptforge.errors import GptforgeError
from gptforge.memory import bench_out_of_memory, is_out_of_memory, keep_freed_memory
from gptforge.model import GPT
from gptforge.optim import build_optimizer, param_groups
from gptforge.probe import ProbeShape
from gptforge.step import Stepper, build_trainable
from gptforge.step import loss_slice as loss_slice_of

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s): (a fragment of
# torch.cuda.get_device_name(), the form factor, the peak), the first match wins. The same chip
# runs slower as a PCIe card (lower clocks and power), so the form factor matters: "NVIDIA H100
# 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" the PCIe one.
CUDA_BF16_PEAKS = [
    ("H100 PCIe", "PCIe", 756e12), ("H100 NVL", "NVL", 835e12), ("H100", "SXM", 989e12),
    ("H200 NVL", "NVL", 835e12), ("H200", "SXM", 989e12),
    ("A100-PCIE", "PCIe", 312e12), ("A100", "SXM", 312e12),
    ("L40S", "PCIe", 362e12), ("L4", "PCIe", 121e12), ("A10G", "PCIe", 70e12),
    ("RTX 4090", "PCIe", 165e12), ("RTX 3090", "PCIe", 71e12), ("V100", "SXM", 125e12),
]


def cuda_card(name: str) -> tuple[str, float | None]:
    """(name with its form factor, data-sheet bf16 peak or None) for a CUDA device name."""
    for fragment, form, peak in CUDA_BF16_PEAKS:
        if fragment in name:
            return f"{name} ({form})", peak
    return name, None


@dataclass
class BenchResult:
    preset: str
    device: str
    precision: str
    batch_size: int
    seq_len: int
    params: int
    flops_per_token: float
    step_ms: float
    tokens_per_s: float
    achieved_tflops: float
    peak_tflops: float
    peak_source: str
    mfu: float
    startup_s: float
    peak_memory_mb: float
    steps: int
    plain: bool
    optimizer: str = "adamw"
    processes: int = 1
    card: str = ""  # the CUDA card, with its form factor
    activation_checkpointing: bool = False
    measured_peak_tflops: float = 0.0  # the matmul measured here (== peak_tflops but on CUDA)
    dtype_auto: str = ""  # how --dtype auto decided, on a CPU
    loss_slice: int = 0  # positions per slice of the head and loss (0: all at once)


def model_for(preset: str, device_type: str = "cpu", plain: bool = False,
              vocab_size: int | None = None) -> GPTConfig:
    """A model shape from a model preset (gpt2, gpt2-medium, ...) or a run preset, its vocabulary
    padded as train pads it on ``device_type`` (never for the plain baseline). The vocabulary is
    ``vocab_size`` where given (that of --data, as train takes it from its data); else run presets
    that take it from the data get GPT-2's, or 65 symbols for char-level ones."""
    run = RunConfig()
    run.model = GPTConfig.preset(preset, pad_vocab_multiple=AUTO) if preset in MODEL_PRESETS else run_preset(preset).model
    if vocab_size:
        run.model.vocab_size = vocab_size
    elif run.model.vocab_size == 0:
        run.model.vocab_size = 65 if "char" in preset else 50257
    run.model.pad_vocab_multiple = 1 if plain else resolve_for(run, device_type).pad_vocab_multiple
    return run.model


def count_params(cfg: GPTConfig) -> int:
    with torch.device("meta"):
        return GPT(cfg).num_params()


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
    12 * n_layer * n_embd * seq_len (PaLM paper, appendix B). Parameters count the tied
    matrix once: its use as lm_head is a matmul, its use as an embedding is a lookup."""
    return 6.0 * count_params(cfg) + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a large square matmul on this device: the practical peak MFU is judged against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if device.type != "cpu" and reps % 10:
            continue
        _sync(device)
    _sync(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the whole process, weights and optimizer state included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _token_source(data: str | None, vocab_size: int, n_tokens: int) -> Any:
    """The train split of a prepared directory (whose vocabulary the model has: see model_for),
    or uniform random ids (what the step computes does not depend on them)."""
    if data:
        return load_split(data, "train")
    gen = np.random.default_rng(0)
    return gen.integers(0, vocab_size, size=n_tokens, dtype=np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def bench(
    preset: str = "gpt2",
    batch_size: int | None = None,
    seq_len: int | None = None,
    steps: int = 5,
    warmup: int = 2,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool | None = None,
    plain: bool = False,
    peak_seconds: float = 2.0,
    data: str | None = None,
    bucket_mb: int = 25,
    activation_checkpointing: bool = False,
    loss_slice: int | None = None,
) -> BenchResult:
    """Time ``steps`` full training steps after ``warmup`` untimed ones. ``None`` for the shape,
    ``compile`` or ``loss_slice`` (positions per slice of the head and loss, 0: unsliced) means
    train's default on the device. Under torchrun, a DDP job (rank 0's result is the whole job's;
    the others return None). Running out of memory is one line."""
    with session(device, 900) as env:
        try:
            return _bench(env, preset, batch_size, seq_len, steps, warmup, dtype, compile, plain,
                          peak_seconds, data, bucket_mb, activation_checkpointing and not plain,
                          0 if plain else loss_slice_of(TrainConfig()) if loss_slice is None else loss_slice)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            cuda = env.device.type == "cuda"
            shape = f"{batch_size or (64 if cuda else 16)} x {seq_len or (1024 if cuda else 64)}"
            raise bench_out_of_memory(env.device, shape, activation_checkpointing) from None


def _stepper(env: DistEnv, preset: str, cfg: GPTConfig, precision: Precision, compile: bool,
             plain: bool, bucket_mb: int, batches: Any, checkpointing: bool,
             loss_slice: int) -> tuple[Stepper, str]:
    """train's own step on the preset's model, and its optimizer's name: a run preset's optimizer
    (Muon for the speedrun), AdamW's defaults for a model preset, torch's default AdamW for the
    plain baseline."""
    optim = OptimConfig() if preset in MODEL_PRESETS else run_preset(preset).optim
    trainable = build_trainable(cfg, env, precision, seed=0, parallel="ddp", compile=compile,
                                bucket_mb=bucket_mb, activation_checkpointing=checkpointing,
                                loss_slice=loss_slice)
    if plain:
        optimizer = torch.optim.AdamW(param_groups(trainable.model, optim.weight_decay), lr=optim.lr,
                                      betas=(optim.beta1, optim.beta2))
    else:
        optimizer = build_optimizer(trainable.model, optim, env.device.type,
                                    shard=(env.rank, env.world_size))
    return Stepper(trainable, optimizer, batches, 1, optim.grad_clip), "adamw" if plain else optim.name


def _bench(env: Any, preset: str, batch_size: int | None, seq_len: int | None, steps: int,
           warmup: int, dtype: str, compile: bool | None, plain: bool, peak_seconds: float,
           data: str | None, bucket_mb: int, checkpointing: bool,
           loss_slice: int) -> BenchResult | None:
    dev = env.device
    cuda = dev.type == "cuda"
    batch_size = batch_size or (64 if cuda else 16)
    seq_len = seq_len or (1024 if cuda else 64)
    if steps < 1 or warmup < 0 or batch_size < 1 or seq_len < 1:
        raise GptforgeError("--steps, --batch-size and --seq-len must be >= 1, --warmup >= 0")
    cfg = model_for(preset, dev.type, plain, load_meta(data)["vocab_size"] if data else None)
    if seq_len > cfg.block_size:
        raise GptforgeError(f"--seq-len {seq_len} exceeds the preset's context ({cfg.block_size})")
    precision, dtype_auto = _precision(env, cfg, dtype, plain, batch_size, seq_len, checkpointing)
    if compile is None:  # train's own rule for train.compile=auto
        compile = resolve_for(RunConfig(), dev.type).compile
    compile = compile and not plain
    if not plain:
        keep_freed_memory()
        configure_backends(dev)
    tokens_needed = (steps + max(1, warmup)) * batch_size * seq_len * env.world_size + 1
    loader = TokenLoader(_token_source(data, cfg.vocab_size, max(tokens_needed, 1 << 20)),
                         batch_size, seq_len, rank=env.rank, world_size=env.world_size)
    step, optimizer = _stepper(env, preset, cfg, precision, compile, plain, bucket_mb,
                               BatchFeeder(loader.next_batch, dev), checkpointing, loss_slice)

    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        step()
    _sync(dev)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    step_s = (time.perf_counter() - t0) / steps
    startup = max(0.0, first - max(1, warmup) * step_s)
    if not env.is_main:
        return None
    result = _result(env, preset, cfg, precision, compile, plain, batch_size, seq_len, step_s,
                     startup, steps, optimizer, peak_seconds)
    result.activation_checkpointing, result.dtype_auto = checkpointing, dtype_auto
    result.loss_slice = loss_slice
    return result


def _precision(env: DistEnv, cfg: GPTConfig, dtype: str, plain: bool, batch_size: int, seq_len: int,
               checkpointing: bool) -> tuple[Precision, str]:
    """--dtype on this device, as train decides it (on a CPU, ``auto`` is what rank 0 measures
    for this shape, probe.py), and the line saying how ``auto`` decided, if it did."""
    if plain:
        return Precision(env.device, None), ""
    if dtype != AUTO or env.device.type != "cpu":
        return Precision.pick(env.device, dtype), ""
    shape = ProbeShape(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                       vocab=cfg.padded_vocab_size, batch=batch_size, seq_len=seq_len, accum=1,
                       checkpointing=checkpointing, bias=cfg.bias)  # bench keeps freed memory
    choice = gather_objects(cpu_auto_dtype(shape) if env.is_main else None, env)[0]
    return Precision.pick(env.device, choice.dtype), choice.line().replace("train.dtype", "--dtype")


def _result(env: Any, preset: str, cfg: GPTConfig, precision: Precision, compile: bool, plain: bool,
            batch_size: int, seq_len: int, step_s: float, startup: float, steps: int,
            optimizer: str, peak_seconds: float) -> BenchResult:
    """The figures of a timed run: throughput, FLOP/s and MFU against the device's peak."""
    dev, cuda = env.device, env.device.type == "cuda"
    tokens = batch_size * seq_len * env.world_size
    fpt = flops_per_token(cfg, seq_len)
    achieved = fpt * tokens / step_s
    peak_dtype = precision.dtype or torch.float32
    measured_peak = env.world_size * measure_matmul_peak(
        dev, peak_dtype, n=8192 if cuda else 2048, seconds=peak_seconds)
    peak, source, card = measured_peak, f"measured {str(peak_dtype).replace('torch.', '')} matmul", ""
    if cuda:
        card, table = cuda_card(torch.cuda.get_device_name(dev))
        if table is not None and peak_dtype == torch.bfloat16:
            peak = table * env.world_size
            source = (f"data sheet x {env.world_size}, measured matmul "
                      f"{measured_peak / env.world_size / 1e12:.0f} TFLOP/s per GPU")
    return BenchResult(
        preset=preset, device=str(dev), precision=precision.label + (" + compile" if compile else ""),
        batch_size=batch_size, seq_len=seq_len, params=count_params(cfg),
        flops_per_token=fpt, step_ms=step_s * 1000, tokens_per_s=tokens / step_s,
        achieved_tflops=achieved / 1e12, peak_tflops=peak / 1e12, peak_source=source,
        mfu=achieved / peak, startup_s=startup, peak_memory_mb=_peak_memory_mb(dev),
        steps=steps, plain=plain, optimizer=optimizer, processes=env.world_size, card=card,
        measured_peak_tflops=measured_peak / 1e12,
    )


def compare_with_plain(argv: list[str]) -> BenchResult:
    """The plain baseline for the same preset and shape, in a child process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    with_json = [a for a in argv if a not in ("--compare",)]
    out = subprocess.run([sys.executable, "-m", "gptforge", "bench", *with_json, "--plain",
                          "--json", "-"], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise GptforgeError(f"the plain baseline run failed: {out.stderr.strip().splitlines()[-1:]}")
    return BenchResult(**json.loads(out.stdout.strip().splitlines()[-1]))


def format_results(results: list[BenchResult]) -> str:
    rows = [("run", "tok/s", "step ms", "TFLOP/s", "MFU", "peak (TFLOP/s, source)", "memory MB",
             "start-up s", "vs plain")]
    base = next((r for r in results if r.plain), None)
    for r in results:
        name = "plain fp32 eager" if r.plain else f"gptforge {r.precision}, {r.optimizer}"
        name += ", activation checkpointing" if r.activation_checkpointing else ""
        name += f", loss in slices of {r.loss_slice}" if r.loss_slice else ""
        ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else "-"
        rows.append((name, f"{r.tokens_per_s:,.1f}", f"{r.step_ms:,.1f}", f"{r.achieved_tflops:.3f}",
                     f"{r.mfu:.1%}", f"{r.peak_tflops:.3f} ({r.peak_source})",
                     f"{r.peak_memory_mb:,.0f}", f"{r.startup_s:.1f}", ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    first = results[-1]
    procs = f" x {first.processes} processes (DDP)" if first.processes > 1 else ""
    head = (f"{first.preset}: {first.params:,} parameters, micro-batch {first.batch_size} x "
            f"{first.seq_len}{procs}, {first.flops_per_token / 1e9:.3f} GFLOP/token, device "
            f"{first.card or first.device}")
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines + [r.dtype_auto for r in results if r.dtype_auto])


def result_dict(r: BenchResult) -> dict:
    return asdict(r)
