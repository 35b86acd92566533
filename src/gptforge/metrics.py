"""What a run records: the original notebook's log line, one JSON object per logged step
(metrics.jsonl), run.json, and ``RunReport``, which sends every record of a training run to all of
them, to the console (console.py) and to the experiment trackers (trackers.py)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from gptforge.atomic import write_text
from gptforge.config import RunConfig
from gptforge.console import Eta, Progress
from gptforge.errors import GptforgeError
from gptforge.rundir import METRICS_FILE, RUN_FILE, free_space_then_continue, guarded_write
from gptforge.trackers import Trackers
from gptforge.version import __version__


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
    """Appends one JSON object per line to ``RUN/metrics.jsonl`` (rundir.METRICS_FILE), flushed at once so that a
    crashed run still has every line it logged. A failed write (disk full) is one line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self._guard():
            self._f = open(self.path, "a", encoding="utf-8")

    def _guard(self):  # noqa: ANN202
        return guarded_write("metrics", self.path, free_space_then_continue(self.path.parent))

    def write(self, **fields: Any) -> None:
        with self._guard():
            self._f.write(json.dumps({k: _jsonable(v) for k, v in fields.items()}) + "\n")
            self._f.flush()

    def close(self) -> None:
        try:
            self._f.close()  # flushes nothing new: every write was flushed
        except OSError:
            pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def truncate_metrics(path: str | Path, step: int) -> int | None:
    """Keep only records of steps before ``step``: a resumed run re-logs the steps after its
    checkpoint, and a crash may have logged some of them already. Rewritten atomically. Returns
    the last step dropped (what the run had done past ``step``, as far as it logged), or None."""
    p = Path(path)
    if not p.is_file():
        return None
    lines = [line for line in p.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    steps = [_record_step(line) for line in lines]  # each record parsed once
    kept = [line for line, s in zip(lines, steps) if s < step]
    dropped = [s for s in steps if step <= s < float("inf")]
    with guarded_write("metrics", p, free_space_then_continue(p.parent)):
        # durable: the run resumes from this file's steps together with its checkpoint
        write_text(p, "".join(kept), durable=True, tmp=p.with_name(p.name + ".tmp"))
    return int(max(dropped)) if dropped else None


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", float("inf"))
    except json.JSONDecodeError:  # a line cut short by a kill: drop it
        return float("inf")


# ----------------------------------------------------------------------------------------------
# run.json: what produced a run and how it ended


class RunRecord:
    """``RUN/run.json``: the command, preset, gptforge version, host and pid that produced the
    run, its status (running, finished, stopped, crashed) and the latest totals; rewritten
    atomically."""

    def __init__(self, run_dir: str | Path, **fields: Any):
        self.path = Path(run_dir) / RUN_FILE
        old: dict[str, Any] = {}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = {}
        now = time.time()
        self.data: dict[str, Any] = {
            "started": old.get("started", now),
            "sessions": old.get("sessions", 0) + 1,
            "wall_s_before": old.get("wall_s", 0.0),
            # the tracker run ids too: a kill while a tracker starts must not lose them
            # ... and how train.dtype=auto was decided, which a resumed run keeps
            **{k: v for k, v in old.items() if k in ("preset", "command", "trackers", "dtype_auto")},
            **fields,
            "gptforge_version": __version__,  # of this session: a resumed run may be upgraded
            "status": "running", "pid": os.getpid(), "host": socket.gethostname(),
            "session_started": now, "updated": now,
        }
        self._write()

    def update(self, **fields: Any) -> None:
        now = time.time()
        self.data.update(fields, updated=now,
                         wall_s=self.data["wall_s_before"] + now - self.data["session_started"])
        self._write()

    def _write(self) -> None:
        with guarded_write("run record", self.path, free_space_then_continue(self.path.parent)):
            write_text(self.path, json.dumps({k: _jsonable(v) for k, v in self.data.items()}, indent=2),
                       tmp=self.path.with_name(self.path.name + ".tmp"))


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------------------------
# A run's report: where every number and line of a training run goes


def _silent(_: str) -> None:
    pass


class RunReport:
    """Everything a run reports, on the rank that writes the run: log lines (through the progress
    bar once it is drawn), metrics.jsonl, run.json and the trackers, which all get the same
    records. On other ranks (``enabled=False``) it only keeps quiet, so the trainer reports
    without asking which rank it is.
    """

    def __init__(self, run_dir: Path, cfg: RunConfig, log: Callable[[str], None], enabled: bool,
                 info: dict[str, Any] | None = None, saved: dict[str, Any] | None = None,
                 abandoned: dict[str, Any] | None = None, start_step: int = 0):
        self.log = log if enabled else _silent
        self.metrics: MetricsLog | None = None
        self.record: RunRecord | None = None
        self.trackers: Trackers | None = None
        self.progress: Progress | None = None
        if enabled:
            self.metrics = MetricsLog(run_dir / METRICS_FILE)
            self.record = RunRecord(run_dir, **(info or {}))
            self.trackers = Trackers(cfg, run_dir, saved or {}, start_step=start_step, log=log,
                                     abandoned=abandoned)
            self.record.update(trackers=self.trackers.state())
        self.enabled = enabled

    def start_progress(self, total: int, initial: int, target_loss: float) -> None:
        """The bar (on a terminal), from here on redrawn around every log line; and the estimate
        of the run's wall time, logged once after its first few steps."""
        self.progress = Progress(total, initial, enabled=self.enabled, target_loss=target_loss)
        self.log = self.progress.wrap(self.log)
        self.eta = Eta(total)

    def step_done(self, steps_done: int) -> None:
        if self.progress is not None:
            self.progress.update()
        line = self.eta.line(steps_done) if self.enabled else None
        if line:
            self.log(line)

    def write(self, fields: dict[str, Any], steps_done: int, best_val_loss: float | None) -> None:
        """One record (``fields``, keyed as metrics.jsonl, with the ``tokens`` seen) to every
        sink; run.json gets the totals: steps done, tokens, the best validation loss so far."""
        if self.progress is not None and "loss" in fields and "tok_per_s" in fields:
            self.progress.show(fields["loss"], fields["tok_per_s"])
        if self.metrics is not None:
            self.metrics.write(**fields)
        if self.trackers is not None:
            self.trackers.log(**fields)
        if self.record is not None:
            latest = {k: fields[k] for k in ("tok_per_s",) if k in fields}
            if "loss" in fields:
                latest["last_loss"] = fields["loss"]
            self.record.update(step=steps_done, tokens=fields["tokens"], best_val_loss=best_val_loss,
                               **latest)

    def crashed(self, error: BaseException, step: int, tokens: int) -> None:
        if self.trackers is not None:
            self.trackers.close("crashed")
        if self.record is not None:
            # Best effort: when the disk is full, run.json cannot say so either.
            with contextlib.suppress(GptforgeError, OSError):
                self.record.update(status="crashed", error=str(error) or type(error).__name__,
                                   step=step, tokens=tokens)

    def close(self) -> None:
        """The bar and metrics.jsonl (whatever happened)."""
        if self.progress is not None:
            self.progress.close()
        if self.metrics is not None:
            self.metrics.close()

    def finished(self, status: str, **totals: Any) -> None:
        """The run ended (``status``: finished or stopped): the trackers close, run.json says so."""
        if self.trackers is not None:
            self.trackers.close(status)
        if self.record is not None:
            self.record.update(status=status, **totals)
