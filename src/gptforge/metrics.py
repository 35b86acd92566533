"""What a run reports: the original notebook's log line and one JSON object per logged step."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from gptforge.errors import GptforgeError
from gptforge.rundir import guarded_write


def format_step(step: int, loss: float, lr: float, norm: float, dt_ms: float, tok_per_s: float) -> str:
    """The original recipe's line: ``step   100 | loss: 6.610000 | lr: 6.06e-05 | norm: 1.6420 | ...``"""
    return (f"step {step:5d} | loss: {loss:.6f} | lr: {lr:.2e} | norm: {norm:.4f} | "
            f"dt: {dt_ms:.2f}ms | tok/sec: {tok_per_s:.2f}")


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _resume_fix(run_dir: Path) -> str:
    return f"free space on that disk, then continue: gptforge train --out {run_dir} --resume"


class MetricsLog:
    """Appends one JSON object per line to ``RUN/metrics.jsonl``, flushed at once so that a
    crashed run still has every line it logged. A failed write (disk full) is one line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self._guard():
            self._f = open(self.path, "a", encoding="utf-8")

    def _guard(self):  # noqa: ANN202
        return guarded_write("metrics", self.path, _resume_fix(self.path.parent))

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


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep only records of steps before ``step``: a resumed run re-logs the steps after its
    checkpoint, and a crash may have logged some of them already. Rewritten atomically."""
    p = Path(path)
    if not p.is_file():
        return
    kept = [line for line in p.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and _record_step(line) < step]
    tmp = p.with_name(p.name + ".tmp")
    with guarded_write("metrics", p, _resume_fix(p.parent)):
        try:
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", float("inf"))
    except json.JSONDecodeError:  # a line cut short by a kill: drop it
        return float("inf")


# ----------------------------------------------------------------------------------------------
# The progress bar


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar on stderr, drawn only where stderr is a terminal. In a pipe or a log file a bar
    is a stream of carriage returns, so there it stays silent and the command's own summary line
    says what happened. Pass ``disable=True`` to turn it off on a terminal too."""
    from tqdm import tqdm

    disable = kwargs.pop("disable", False) or not sys.stderr.isatty()
    if not disable:
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
            known = size.columns > 0 and size.lines > 0
        except (OSError, ValueError):
            known = False
        # A terminal that reports no size (some emulators, pty wrappers) would get a zero-width
        # bar, and tqdm draws nothing at all for 0 rows: assume 100 x 20 there.
        kwargs.setdefault("dynamic_ncols", known)
        kwargs.setdefault("ncols", None if known else 100)
        kwargs.setdefault("nrows", None if known else 20)
    return tqdm(file=sys.stderr, disable=disable, **kwargs)


_output_gone = False


def say(line: str = "") -> None:
    """print(line), unless stdout has gone away (terminal closed: SIGHUP; a pipe's reader quit).
    Then output stops instead of the run: a training job must still save and exit cleanly."""
    global _output_gone
    if _output_gone:
        return
    try:
        print(line, flush=True)
    except OSError:  # EIO from a hung-up terminal, EPIPE from a closed pipe
        _output_gone = True
        # What is still buffered would fail again at exit (and turn the exit code into 120):
        # send stdout to /dev/null from here on.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


class Progress:
    """A bar with step / max steps, ETA, loss and tokens/s, on a terminal only.

    Log lines go through ``write`` so the bar is cleared before and redrawn after each of them and
    never garbles them. Where stderr is not a terminal (CI, log files, nohup) there is no bar and
    the periodic log lines are the whole display.
    """

    def __init__(self, total: int, initial: int, enabled: bool, target_loss: float = 0.0):
        self.bar = None
        self.target_loss = target_loss
        if enabled and sys.stderr.isatty():
            self.bar = progress_bar(total=total, initial=initial, unit="step", mininterval=0.25,
                                    leave=False)

    def wrap(self, log: Callable[[str], None]) -> Callable[[str], None]:
        if self.bar is None:
            return log

        def write(line: str) -> None:
            from tqdm import tqdm

            try:
                tqdm.write(line, file=sys.stdout)
            except OSError:  # the terminal is gone (SIGHUP): keep training, stop drawing
                self.close()

        return write

    def update(self) -> None:
        """One more step (the bar's rate and ETA come from its own clock: no device sync)."""
        if self.bar is None:
            return
        try:
            self.bar.update(1)
        except OSError:
            self.close()

    def show(self, loss: float, tok_per_s: float) -> None:
        """The latest logged loss and throughput, beside the bar."""
        if self.bar is None:
            return
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tok_per_s:,.0f}"}
        if self.target_loss:
            post["target"] = f"{self.target_loss:g}"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        bar, self.bar = self.bar, None
        if bar is not None:
            try:
                bar.close()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------
# run.json: what produced a run and how it ended


RUN_FILE = "run.json"


class RunRecord:
    """``RUN/run.json``: the command, preset, host and pid that produced the run, its status
    (running, finished, stopped, crashed) and the latest totals; rewritten atomically."""

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
            **{k: v for k, v in old.items() if k in ("preset", "command")},
            **fields,
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
        tmp = self.path.with_name(self.path.name + ".tmp")
        with guarded_write("run record", self.path, _resume_fix(self.path.parent)):
            try:
                tmp.write_text(json.dumps({k: _jsonable(v) for k, v in self.data.items()}, indent=2),
                               encoding="utf-8")
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------------------------
# Plots


def plot_runs(runs: list[str | Path], out: str | Path, log_loss: bool = False) -> Path:
    """One PNG comparing runs: loss against steps and against tokens (train solid, val dashed),
    learning rate, gradient norm and tokens/s against steps, and HellaSwag acc_norm (solid) and
    acc (dotted) against steps where a run has them."""
    try:
        import matplotlib
    except ImportError:
        raise GptforgeError(
            "plotting needs matplotlib: pip install 'gptforge[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    series = []
    for run in runs:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise GptforgeError(f"{run} has no metrics.jsonl: pass run directories written by gptforge train")
        try:
            records = read_metrics(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GptforgeError(f"{path} is not valid JSON lines ({e}): is it a gptforge run?") from None
        if not records:
            raise GptforgeError(f"{path} is empty: the run has not logged a step yet")
        series.append((Path(run).name or str(run), records))

    # A run that scored HellaSwag (train.hellaswag_interval) gets a third row: acc_norm and acc.
    hellaswag = any(_is_num(r.get("hellaswag_acc_norm")) for _, records in series for r in records)
    n_rows = 3 if hellaswag else 2
    fig = plt.figure(figsize=(16, 4.5 * n_rows), constrained_layout=True)
    grid = fig.add_gridspec(n_rows, 3)
    axes = {(r, c): fig.add_subplot(grid[r, c]) for r in range(2) for c in range(3)}
    panels = [
        (axes[0, 0], "step", "loss", "loss", "loss vs steps"),
        (axes[0, 1], "tokens", "loss", "loss", "loss vs tokens"),
        (axes[1, 0], "step", "lr", "learning rate", "learning rate"),
        (axes[1, 1], "step", "norm", "gradient norm (before clipping)", "gradient norm"),
        (axes[1, 2], "step", "tok_per_s", "tokens / s", "throughput"),
    ]
    if hellaswag:
        panels.append((fig.add_subplot(grid[2, :]), "step", "hellaswag_acc_norm", "accuracy",
                       "HellaSwag: acc_norm (solid), acc (dotted)"))
    # the series drawn second in a panel: key, line style, label
    second = {"loss": ("val_loss", "--", "val"), "hellaswag_acc_norm": ("hellaswag_acc", ":", "acc")}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, records) in enumerate(series):
        color = colors[i % len(colors)]
        for ax, xkey, ykey, _, _ in panels:
            pts = [(r[xkey], r[ykey]) for r in records if _is_num(r.get(xkey)) and _is_num(r.get(ykey))]
            sparse = ykey.startswith("hellaswag")  # a point per evaluation, not per step
            if pts:
                ax.plot(*zip(*pts), color=color, label={"loss": f"{name} train"}.get(ykey, name),
                        linewidth=1.2, marker="o" if sparse else None, markersize=3)
            if ykey in second:
                key, style, label = second[ykey]
                more = [(r[xkey], r[key]) for r in records
                        if _is_num(r.get(xkey)) and _is_num(r.get(key))]
                if more:
                    ax.plot(*zip(*more), color=color, linestyle=style, marker="o", markersize=3,
                            label=f"{name} {label}")
    for ax, xkey, _, ylabel, title in panels:
        ax.set_title(title)
        ax.set_xlabel("tokens" if xkey == "tokens" else "step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    for ax in (axes[0, 0], axes[0, 1]):
        if log_loss:
            ax.set_yscale("log")
    # The last panel: a summary table of the runs.
    axes[0, 2].axis("off")
    rows = []
    for name, records in series:
        losses = [r["loss"] for r in records if _is_num(r.get("loss"))]
        vals = [r["val_loss"] for r in records if _is_num(r.get("val_loss"))]
        rows.append([name, str(max(r.get("step", 0) for r in records) + 1),
                     f"{losses[-1]:.4f}" if losses else "-", f"{min(vals):.4f}" if vals else "-"])
    table = axes[0, 2].table(cellText=rows, colLabels=["run", "steps", "last loss", "best val"],
                             loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    fig.suptitle("gptforge: " + ", ".join(name for name, _ in series), fontsize=13)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp-" + out.name)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------------------------
# TensorBoard, only when asked for


def require_tensorboard() -> type:
    """torch's SummaryWriter, or one clear line when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise GptforgeError(
            "train.tensorboard=true needs the tensorboard package: pip install "
            "'gptforge[tensorboard]' (or pip install tensorboard), or leave train.tensorboard off"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """The same numbers as metrics.jsonl, as TensorBoard scalars under ``RUN/tensorboard``."""

    def __init__(self, run_dir: str | Path):
        self.writer = require_tensorboard()(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, **fields: Any) -> None:
        step = fields.get("step", 0)
        for key, value in fields.items():
            if key != "step" and _is_num(value):
                self.writer.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
