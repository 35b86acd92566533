"""``gptforge bench``: training throughput of one full step, the way ``train`` runs it.

A step is forward + backward over one micro-batch, gradient clipping and the optimizer step, the
same ``train_step`` the trainer uses: AdamW for a model preset, the run preset's own optimizer
(e.g. Muon for ``shakespeare-char-speedrun``) for a run preset. Reported: tokens/s, achieved FLOP/s, MFU against the device's
peak (on the CPU a matmul peak measured here; on CUDA a table of known peaks, with the measured
matmul rate beside it), peak memory, and the one-time start-up cost (first steps, compilation)
apart from the steady state.

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

import torch

from gptforge.config import MODEL_PRESETS, GPTConfig, OptimConfig, run_preset
from gptforge.device import autocast, keep_freed_memory, pick_autocast_dtype, pick_device
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.optim import build_optimizer, param_groups
from gptforge.train import train_step

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), by a name fragment of
# torch.cuda.get_device_name(). SXM parts; PCIe parts are lower, so MFU there reads low.
CUDA_BF16_PEAKS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
    "A10G": 70e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
}


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


def model_for(preset: str) -> GPTConfig:
    """A model shape from a model preset (gpt2, gpt2-medium, ...) or a run preset. Run presets
    that take the vocabulary from the data get GPT-2's, or 65 symbols for char-level ones."""
    if preset in MODEL_PRESETS:
        return GPTConfig.preset(preset)
    cfg = run_preset(preset).model
    if cfg.vocab_size == 0:
        cfg.vocab_size = 65 if "char" in preset else 50257
    return cfg


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


def bench(
    preset: str = "gpt2",
    batch_size: int = 16,
    seq_len: int = 64,
    steps: int = 5,
    warmup: int = 2,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    plain: bool = False,
    peak_seconds: float = 2.0,
) -> BenchResult:
    """Time ``steps`` full training steps after ``warmup`` untimed ones."""
    if steps < 1 or warmup < 0 or batch_size < 1 or seq_len < 1:
        raise GptforgeError("--steps, --batch-size and --seq-len must be >= 1, --warmup >= 0")
    cfg = model_for(preset)
    if seq_len > cfg.block_size:
        raise GptforgeError(f"--seq-len {seq_len} exceeds the preset's context ({cfg.block_size})")
    dev = pick_device(device)
    amp_dtype = None if plain else pick_autocast_dtype(dev, dtype)
    if not plain:
        keep_freed_memory()
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    # A run preset's own optimizer (Muon for the speedrun), AdamW's defaults for a model preset.
    optim = OptimConfig() if preset in MODEL_PRESETS else run_preset(preset).optim
    if plain:
        optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                                      betas=(optim.beta1, optim.beta2))
    else:
        optimizer = build_optimizer(model, optim, dev.type)
    step_model = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=dev)
    y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=dev)

    def one_step() -> None:
        train_step(step_model, optimizer, lambda: (x, y), 1, optim.grad_clip,
                   lambda: autocast(dev, amp_dtype))

    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        one_step()
    _sync(dev)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    _sync(dev)
    step_s = (time.perf_counter() - t0) / steps
    startup = max(0.0, first - max(1, warmup) * step_s)

    tokens = batch_size * seq_len
    fpt = flops_per_token(cfg, seq_len)
    achieved = fpt * tokens / step_s
    peak_dtype = amp_dtype or torch.float32
    measured_peak = measure_matmul_peak(dev, peak_dtype, seconds=peak_seconds)
    peak, source = measured_peak, f"measured {str(peak_dtype).replace('torch.', '')} matmul"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        table = next((v for k, v in CUDA_BF16_PEAKS.items() if k in name), None)
        if table is not None and peak_dtype == torch.bfloat16:
            peak, source = table, f"{name} data sheet (measured matmul {measured_peak / 1e12:.0f} TFLOP/s)"
    prec = "float32" if amp_dtype is None else str(amp_dtype).replace("torch.", "") + " autocast"
    return BenchResult(
        preset=preset, device=str(dev), precision=prec + (" + compile" if compile else ""),
        batch_size=batch_size, seq_len=seq_len, params=count_params(cfg),
        flops_per_token=fpt, step_ms=step_s * 1000, tokens_per_s=tokens / step_s,
        achieved_tflops=achieved / 1e12, peak_tflops=peak / 1e12, peak_source=source,
        mfu=achieved / peak, startup_s=startup, peak_memory_mb=_peak_memory_mb(dev),
        steps=steps, plain=plain, optimizer="adamw" if plain else optim.name,
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
        ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else "-"
        rows.append((name, f"{r.tokens_per_s:,.1f}", f"{r.step_ms:,.1f}", f"{r.achieved_tflops:.3f}",
                     f"{r.mfu:.1%}", f"{r.peak_tflops:.3f} ({r.peak_source})",
                     f"{r.peak_memory_mb:,.0f}", f"{r.startup_s:.1f}", ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    first = results[0]
    head = (f"{first.preset}: {first.params:,} parameters, micro-batch {first.batch_size} x "
            f"{first.seq_len}, {first.flops_per_token / 1e9:.3f} GFLOP/token, device {first.device}")
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def result_dict(r: BenchResult) -> dict:
    return asdict(r)
