"""Where and in what precision to compute: device choice and autocast."""

from __future__ import annotations

import contextlib

import torch

from gptforge.config import ConfigError


def pick_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available: use auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device={name} but only {torch.cuda.device_count()} CUDA devices exist"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name} but MPS is not available: use auto or cpu")
    return dev


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16).

    Without it oneDNN emulates bf16 and autocast is slower than fp32, so ``auto`` stays in fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set()
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. ``auto``: bf16 where the hardware has it."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if name == "float16" and device.type == "cpu":
        raise ConfigError("train.dtype=float16 is not supported on the CPU: use bfloat16 or float32")
    return None if name == "float32" else DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
