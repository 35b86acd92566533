"""What a run reports: the original notebook's log line and one JSON object per logged step."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def format_step(step: int, loss: float, lr: float, norm: float, dt_ms: float, tok_per_s: float) -> str:
    """The original recipe's line: ``step   100 | loss: 6.610000 | lr: 6.06e-05 | norm: 1.6420 | ...``"""
    return (f"step {step:5d} | loss: {loss:.6f} | lr: {lr:.2e} | norm: {norm:.4f} | "
            f"dt: {dt_ms:.2f}ms | tok/sec: {tok_per_s:.2f}")


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends one JSON object per line to ``RUN/metrics.jsonl``, flushed at once so that a
    crashed run still has every line it logged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, **fields: Any) -> None:
        self._f.write(json.dumps({k: _jsonable(v) for k, v in fields.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep only records of steps before ``step``: a resumed run re-logs the steps after its
    checkpoint, and a crash may have logged some of them already. Rewritten atomically."""
    p = Path(path)
    if not p.is_file():
        return
    kept = [line for line in p.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and _record_step(line) < step]
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, p)


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", float("inf"))
    except json.JSONDecodeError:  # a line cut short by a kill: drop it
        return float("inf")
