"""The machine line every benchmark prints beside its figures: the CPU's model, its cores, and the
flags that change what it computes fast (AVX2, AVX-512, AVX512-BF16, AMX), so figures from
different CPUs are never compared unawares."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu() -> str:
    """``MODEL, N cores, flags: avx2 avx512f ...`` (Linux's /proc/cpuinfo; elsewhere less)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    field = {}
    for line in lines:
        key, _, value = line.partition(":")
        field.setdefault(key.strip(), value.strip())
    model = field.get("model name") or platform.processor() or platform.machine()
    flags = set(field.get("flags", "").split())
    shown = " ".join(f for f in FLAGS if f in flags) or "none of " + "/".join(FLAGS)
    return f"{model}, {os.cpu_count()} cores, flags: {shown}"


if __name__ == "__main__":
    print(cpu())
