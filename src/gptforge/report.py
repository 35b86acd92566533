"""``gptforge runs``: a table of the training runs under a directory."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from gptforge.checkpoint import CHECKPOINT_DIR, find_checkpoint
from gptforge.errors import GptforgeError
from gptforge.metrics import RUN_FILE, read_metrics, read_run_record

COLUMNS = ("run", "preset", "status", "steps", "tokens", "best val", "last loss", "hellaswag",
           "wall", "tok/s", "latest checkpoint")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def run_status(record: dict[str, Any]) -> str:
    """running, finished, stopped or crashed; a 'running' run whose process is gone was killed."""
    status = record.get("status", "unknown")
    if status == "running" and record.get("host") == socket.gethostname():
        pid = record.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return "crashed"
    return status


def find_runs(root: str | Path) -> list[Path]:
    """Directories under ``root`` (itself included) that hold a run.json or a metrics.jsonl."""
    root = Path(root)
    if not root.is_dir():
        raise GptforgeError(f"{root} is not a directory: pass the directory that holds your runs")
    found = set()
    for marker in (RUN_FILE, "metrics.jsonl"):
        for path in root.rglob(marker):
            if CHECKPOINT_DIR not in path.parts[len(root.parts):]:
                found.add(path.parent)
    return sorted(found)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and value == value else "-"


def describe_run(run: Path, root: Path) -> dict[str, str]:
    record = read_run_record(run)
    try:
        metrics = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    except ValueError:  # a line cut short by a kill: the table still shows what it can
        metrics = []
    losses = [m for m in metrics if isinstance(m.get("loss"), (int, float))]
    vals = [m["val_loss"] for m in metrics if isinstance(m.get("val_loss"), (int, float))]
    # the last HellaSwag acc_norm (train.hellaswag_interval)
    hellaswag = [m["hellaswag_acc_norm"] for m in metrics
                 if isinstance(m.get("hellaswag_acc_norm"), (int, float))]
    rates = [m["tok_per_s"] for m in losses[-10:] if isinstance(m.get("tok_per_s"), (int, float))]
    try:
        latest = find_checkpoint(run).name if (run / CHECKPOINT_DIR).is_dir() else "-"
    except GptforgeError:
        latest = "-"
    steps = record.get("step", losses[-1]["step"] + 1 if losses else None)
    tokens = record.get("tokens", losses[-1].get("tokens") if losses else None)
    return {
        "run": str(run.relative_to(root)) if run != root else run.name,
        "preset": str(record.get("preset", "-")),
        "status": run_status(record) if record else "unknown",
        "steps": _fmt_num(steps, ","),
        "tokens": _fmt_num(tokens, ","),
        "best val": _fmt_num(min(vals) if vals else None, ".4f"),
        "last loss": _fmt_num(losses[-1]["loss"] if losses else None, ".4f"),
        "hellaswag": _fmt_num(hellaswag[-1] if hellaswag else None, ".4f"),
        "wall": _fmt_time(record.get("wall_s")),
        "tok/s": _fmt_num(sum(rates) / len(rates) if rates else None, ",.0f"),
        "latest checkpoint": latest,
    }


def runs_table(root: str | Path) -> str:
    root = Path(root)
    rows = [describe_run(r, root) for r in find_runs(root)]
    if not rows:
        return f"no runs under {root} (a run is a directory written by gptforge train)"
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines.append("  ".join("-" * widths[c] for c in COLUMNS))
    for r in rows:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in COLUMNS))
    return "\n".join(lines)
