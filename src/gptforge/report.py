"""Looking back at runs: ``gptforge runs`` (a table of the runs under a directory) and
``gptforge plot`` (one PNG comparing runs)."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.atomic import replacing
from gptforge.checkpoint import find_checkpoint
from gptforge.errors import GptforgeError
from gptforge.metrics import read_metrics, read_run_record
from gptforge.rundir import CHECKPOINT_DIR, METRICS_FILE, RUN_FILE
from gptforge.trackers import is_finite_number

# "best val" is nats per token, which depends on the tokenizer; "best bpb" (bits per byte of
# the same validation) compares runs whatever their tokenizers
COLUMNS = ("run", "preset", "status", "steps", "tokens", "best val", "best bpb", "last loss",
           "hellaswag", "wall", "tok/s", "latest checkpoint")


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
    for marker in (RUN_FILE, METRICS_FILE):
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


def format_count(n: float) -> str:
    """100000 -> '100k', 1234567 -> '1.23M', 3.4e9 -> '3.4B': counts that stay short and readable
    on an axis or in a table cell (three significant digits at most)."""
    for suffix in ("", "k", "M", "B"):
        if abs(n) < 999.5:
            return f"{n:.3g}{suffix}"
        n /= 1000
    return f"{n:.3g}T"


def describe_run(run: Path, root: Path, compact: bool = False) -> dict[str, str]:
    """One row of the runs table; ``compact`` writes tokens and tok/s as 4.5M, 123k."""
    record = read_run_record(run)
    try:
        metrics = read_metrics(run / METRICS_FILE) if (run / METRICS_FILE).is_file() else []
    except ValueError:  # a line cut short by a kill: the table still shows what it can
        metrics = []
    losses = [m for m in metrics if isinstance(m.get("loss"), (int, float))]
    vals = [m["val_loss"] for m in metrics if isinstance(m.get("val_loss"), (int, float))]
    bpbs = [m["val_bpb"] for m in metrics if is_finite_number(m.get("val_bpb"))]
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
        "tokens": _count(tokens, compact),
        "best val": _fmt_num(min(vals) if vals else None, ".4f"),
        "best bpb": _fmt_num(min(bpbs) if bpbs else None, ".4f"),
        "last loss": _fmt_num(losses[-1]["loss"] if losses else None, ".4f"),
        "hellaswag": _fmt_num(hellaswag[-1] if hellaswag else None, ".4f"),
        "wall": _fmt_time(record.get("wall_s")),
        "tok/s": _count(sum(rates) / len(rates) if rates else None, compact, ",.0f"),
        "latest checkpoint": latest,
    }


def _count(value: Any, compact: bool, spec: str = ",") -> str:
    return format_count(value) if compact and is_finite_number(value) else _fmt_num(value, spec)


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


# ----------------------------------------------------------------------------------------------
# gptforge plot


@dataclass
class Panel:
    """One chart: ``ykey`` of every run against ``xkey``, and ``second`` (dashed) beside it."""

    title: str
    xkey: str  # "step" or "tokens"
    ykey: str
    ylabel: str
    second: str | None = None  # val_loss beside loss
    loss: bool = False  # log-scaled by --log-loss
    sparse: bool = False  # a point per evaluation: markers
    empty: str = ""  # what the panel says when no run has its numbers


def plot_panels(series: list[tuple[str, list[dict[str, Any]]]]) -> tuple[list[Panel], list[Panel]]:
    """The two rows of the plot: how the model learns (loss, validation, its bits per byte and
    HellaSwag when a run has them), then how the optimizer and the machine run (learning rate,
    gradient norm, tokens/s)."""
    has = {key: any(is_finite_number(r.get(key)) for _, records in series for r in records)
           for key in ("val_bpb", "hellaswag_acc_norm")}
    learning = [
        Panel("loss vs steps", "step", "loss", "loss", second="val_loss", loss=True),
        Panel("loss vs tokens", "tokens", "loss", "loss", second="val_loss", loss=True),
        Panel("validation loss", "tokens", "val_loss", "nats per token", loss=True, sparse=True,
              empty="no validation loss in these runs:\nset train.eval_interval,\non data with a val split"),
    ]
    if has["val_bpb"]:  # the one loss that runs with different tokenizers share
        learning.append(Panel("validation bits per byte", "tokens", "val_bpb", "bits per byte",
                              loss=True, sparse=True))
    if has["hellaswag_acc_norm"]:
        learning.append(Panel("HellaSwag acc_norm", "tokens", "hellaswag_acc_norm", "accuracy",
                              sparse=True))
    running = [
        Panel("learning rate", "step", "lr", "learning rate"),
        Panel("gradient norm (before clipping)", "step", "norm", "norm"),
        Panel("throughput", "step", "tok_per_s", "tokens / s"),
    ]
    return learning, running


def read_series(runs: list[str | Path]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(name, metrics.jsonl records) of each run, or one line saying what is wrong with it."""
    series = []
    for run in runs:
        path = Path(run) / METRICS_FILE
        if not path.is_file():
            raise GptforgeError(f"{run} has no metrics.jsonl: pass run directories written by gptforge train")
        try:
            records = read_metrics(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GptforgeError(f"{path} is not valid JSON lines ({e}): is it a gptforge run?") from None
        if not records:
            raise GptforgeError(f"{path} is empty: the run has not logged a step yet")
        series.append((Path(run).absolute().name, records))
    return series


def plot_runs(runs: list[str | Path], out: str | Path, log_loss: bool = False) -> Path:
    """One PNG comparing runs. At the top a table of the runs, whose coloured names are the
    legend; then loss against steps and tokens (train solid, val dashed), validation loss and
    HellaSwag acc_norm against tokens; then learning rate, gradient norm and tokens/s. Counts
    read 100k, 1.2M, 3.4B."""
    try:
        import matplotlib
    except ImportError:
        raise GptforgeError(
            "plotting needs matplotlib: pip install 'gptforge[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    series = read_series(runs)
    learning, running = plot_panels(series)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = [colors[i % len(colors)] for i in range(len(series))]  # run i's colour

    # each row shares its width evenly between its panels; the table's height follows its rows
    table_h = 0.45 + 0.3 * len(series)
    fig = plt.figure(figsize=(17, 1.0 + table_h + 2 * 4.2), layout="constrained")
    grid = fig.add_gridspec(3, 1, height_ratios=[table_h, 4.2, 4.2])
    axes = []
    for row, panels in ((1, learning), (2, running)):
        cells = grid[row].subgridspec(1, len(panels))
        axes += [(fig.add_subplot(cells[0, i]), p) for i, p in enumerate(panels)]

    for ax, panel in axes:
        _draw_panel(ax, panel, series, color, log_loss)

    # line styles, once: the run colours are in the table
    loss_ax = axes[0][0]
    styles = [Line2D([], [], color="0.3", linewidth=1.3, label="train")]
    if any(is_finite_number(r.get("val_loss")) for _, records in series for r in records):
        styles.append(Line2D([], [], color="0.3", linestyle="--", marker="o", markersize=3.5, label="val"))
    loss_ax.legend(handles=styles + [Line2D([], [], color=color[i], linewidth=2.5, label=name)
                                     for i, (name, _) in enumerate(series)][:8], fontsize=8)

    _draw_table(fig.add_subplot(grid[0]), runs, color)
    title = ", ".join(name for name, _ in series)
    fig.suptitle("gptforge: " + (title if len(title) <= 100 else title[:97] + "..."), fontsize=14)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(out, tmp=out.with_name(".tmp-" + out.name)) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out


def _points(records: list[dict[str, Any]], xkey: str, ykey: str) -> list[tuple[float, float]]:
    """(x, y) of the records that hold both as finite numbers."""
    return [(r[xkey], r[ykey]) for r in records
            if is_finite_number(r.get(xkey)) and is_finite_number(r.get(ykey))]


def _draw_panel(ax: Any, panel: Panel, series: list[tuple[str, list[dict[str, Any]]]],
                color: list[str], log_loss: bool) -> None:
    """One panel: each run's line (its second series dashed), axes that read at a glance, and a
    note where no run has the numbers."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    counts = FuncFormatter(lambda x, _: format_count(x))
    for i, (_, records) in enumerate(series):
        pts = _points(records, panel.xkey, panel.ykey)
        if pts:
            ax.plot(*zip(*pts), color=color[i], linewidth=1.3,
                    marker="o" if panel.sparse or len(pts) == 1 else None, markersize=3.5)
        more = _points(records, panel.xkey, panel.second) if panel.second else []
        if more:
            ax.plot(*zip(*more), color=color[i], linestyle="--", marker="o", markersize=3.5,
                    linewidth=1.1)
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel(panel.xkey)
    ax.set_ylabel(panel.ylabel)
    ax.xaxis.set_major_formatter(counts)
    ax.grid(True, alpha=0.3)
    if panel.ykey == "tok_per_s":
        ax.yaxis.set_major_formatter(counts)
    if panel.ykey == "lr":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.3g}"))
    if panel.ykey == "hellaswag_acc_norm":  # 4 endings: guessing scores 0.25
        ax.axhline(0.25, color="0.5", linestyle=":", linewidth=1)
        ax.annotate("chance", (0, 0.25), xycoords=("axes fraction", "data"), xytext=(4, 3),
                    textcoords="offset points", color="0.4", fontsize=8)
    if not ax.has_data() and panel.empty:
        ax.text(0.5, 0.5, panel.empty, ha="center", va="center", color="0.45", fontsize=9,
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("")
        ax.set_ylabel("")
    elif panel.loss and log_loss:
        ax.set_yscale("log")
        # plain 3, 4, 6 rather than 3x10^0: a loss rarely spans more than a decade
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _draw_table(ax: Any, runs: list[str | Path], color: list[str]) -> None:
    """The runs table of ``gptforge runs``, compact, each run's name in its line colour."""
    columns = [c for c in COLUMNS if c != "latest checkpoint"]
    rows = [describe_run(Path(run).absolute(), Path(run).absolute().parent, compact=True) for run in runs]
    for column in ("best bpb", "hellaswag"):  # left out where no run has them
        if all(r[column] == "-" for r in rows):
            columns.remove(column)
    ax.axis("off")
    table = ax.table(cellText=[["■ " + r["run"]] + [r[c] for c in columns[1:]] for r in rows],
                     colLabels=[{"hellaswag": "HellaSwag acc_norm"}.get(c, c) for c in columns],
                     loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.auto_set_column_width(list(range(len(columns))))
    for (row, col), cell in table.get_celld().items():
        cell.set_edgecolor("0.85")
        cell.set_height(0.3 / (0.45 + 0.3 * len(rows)) * 0.95)
        if row == 0:
            cell.set_facecolor("0.93")
            cell.get_text().set_fontweight("bold")
        elif col == 0:
            cell.get_text().set_color(color[row - 1])
            cell.get_text().set_fontweight("bold")
            cell.set_text_props(ha="left")
