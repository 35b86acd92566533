"""What a run reports: the original notebook's log line, one JSON object per logged step
(metrics.jsonl), run.json, the progress bar, and the experiment trackers (TensorBoard,
W&B, MLflow) that get the same numbers."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import math
import os
import socket
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from gptforge.config import RunConfig, dotted_items
from gptforge.errors import GptforgeError
from gptforge.atomic import write_text
from gptforge.rundir import METRICS_FILE, RUN_FILE, free_space_then_continue, guarded_write


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


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep only records of steps before ``step``: a resumed run re-logs the steps after its
    checkpoint, and a crash may have logged some of them already. Rewritten atomically."""
    p = Path(path)
    if not p.is_file():
        return
    kept = [line for line in p.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and _record_step(line) < step]
    with guarded_write("metrics", p, free_space_then_continue(p.parent)):
        # durable: the run resumes from this file's steps together with its checkpoint
        write_text(p, "".join(kept), durable=True, tmp=p.with_name(p.name + ".tmp"))


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
            # the tracker run ids too: a kill while a tracker starts must not lose them
            # ... and how train.dtype=auto was decided, which a resumed run keeps
            **{k: v for k, v in old.items() if k in ("preset", "command", "trackers", "dtype_auto")},
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
        with guarded_write("run record", self.path, free_space_then_continue(self.path.parent)):
            write_text(self.path, json.dumps({k: _jsonable(v) for k, v in self.data.items()}, indent=2),
                       tmp=self.path.with_name(self.path.name + ".tmp"))


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------------------------
# Experiment trackers (TensorBoard, Weights & Biases, MLflow), each only when asked for


def tracker_key(key: str) -> str:
    """A metrics.jsonl key as every tracker names it, grouped into train/, val/ and hellaswag/
    sections: ``loss`` -> ``train/loss``, ``val_loss`` -> ``val/loss``, ``val_bpb`` -> ``val/bpb``,
    ``hellaswag_acc_norm`` -> ``hellaswag/acc_norm``."""
    if key.startswith("val_"):
        return "val/" + key.removeprefix("val_")
    if key.startswith("hellaswag_"):
        return "hellaswag/" + key.removeprefix("hellaswag_")
    return "train/" + key


@dataclass
class TrackedRun:
    """What a tracker is told about the run it follows."""

    run_dir: Path
    config: RunConfig  # the resolved config, logged as the tracker run's parameters
    name: str  # train.run_name, else the run directory's name
    saved: dict[str, Any]  # this tracker's entry in run.json when the run continues; else empty
    start_step: int  # the first step this session logs (a resumed run's checkpoint step)


class Tracker:
    """One experiment tracker. A new one is a subclass that sets the class attributes below and
    implements ``__init__`` (start, or continue the run in ``run.saved``; log the config),
    ``log`` and ``close``, plus a ``train.<name>`` switch in config.TrainConfig.

    Trackers live on rank 0 only, and get the same records as metrics.jsonl (``log``: a step and
    its numbers under ``tracker_key`` names). They may raise anything: ``Trackers`` turns a
    failure into a warning and goes on without that tracker, so training never stops for one.
    """

    name: ClassVar[str]  # the config switch train.<name>, and the tracker's key in run.json
    title: ClassVar[str]  # for messages
    module: ClassVar[str]  # what is imported
    pip: ClassVar[str]  # the PyPI package behind the gptforge[<name>] extra
    run_files: ClassVar[tuple[str, ...]] = ()  # what it writes inside RUN

    state: dict[str, Any]  # kept in run.json, so that a resumed run continues the same tracker run
    where: str  # one line telling where to look at the run

    @classmethod
    def require(cls) -> Any:
        """The tracker's package, or one line naming the extra to install."""
        try:
            return importlib.import_module(cls.module)
        except ImportError:
            raise GptforgeError(
                f"train.{cls.name}=true needs the {cls.pip} package: pip install "
                f"'gptforge[{cls.name}]' (or pip install {cls.pip}), or leave train.{cls.name} off"
            ) from None

    def __init__(self, run: TrackedRun) -> None:
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:
        """``status`` is run.json's: finished, stopped or crashed."""
        raise NotImplementedError

    @classmethod
    def abandon(cls, saved: dict[str, Any]) -> None:
        """End the tracker run in ``saved`` (run.json's entry) that a restarted run leaves behind,
        where the tracker would otherwise show it running for ever."""


class TensorBoardLog(Tracker):
    """Scalars under ``RUN/tensorboard``, the config in the HPARAMS tab."""

    name, title, pip = "tensorboard", "TensorBoard", "tensorboard"
    module, run_files = "torch.utils.tensorboard", ("tensorboard",)

    def __init__(self, run: TrackedRun) -> None:
        tb = self.require()
        from torch.utils.tensorboard.summary import hparams

        log_dir = run.run_dir / "tensorboard"
        # purge_step hides what a killed session logged after its last checkpoint: a resumed
        # run logs those steps again
        self.writer = tb.SummaryWriter(log_dir=str(log_dir), purge_step=run.start_step or None)
        params = dotted_items(run.config)
        metrics = {tracker_key(k): float("nan") for k in ("loss", "val_loss", "val_bpb",
                                                            "hellaswag_acc_norm")}
        for summary in hparams(params, metrics):  # experiment, session start and end
            self.writer.file_writer.add_summary(summary)
        self.state, self.where = {}, f"tensorboard --logdir {log_dir}"

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandbLog(Tracker):
    """A Weights & Biases run in project ``train.wandb_project``; its local files under RUN/wandb
    (or under ``WANDB_DIR`` where that is set).
    ``WANDB_MODE=offline`` keeps everything local (``wandb sync`` uploads it later)."""

    name, title, pip = "wandb", "W&B", "wandb"
    module, run_files = "wandb", ("wandb",)  # RUN/wandb unless WANDB_DIR says otherwise

    def __init__(self, run: TrackedRun) -> None:
        wandb = self.require()
        saved_id = run.saved.get("id")
        # W&B's own convention first: WANDB_DIR, where a user has set it, else inside RUN
        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(run.run_dir)}
        self.run = wandb.init(project=run.config.train.wandb_project, name=run.name,
                              id=saved_id, resume="allow" if saved_id else None,
                              config=run.config.to_dict(), **where)
        # A resumed online run knows the steps it has; W&B drops (and warns about) lower ones.
        self.first_step = int(getattr(self.run, "starting_step", 0) or 0)
        self.state = {"id": self.run.id, "project": run.config.train.wandb_project}
        self.where = (getattr(self.run, "url", None)
                      or f"run {self.run.id} in {os.environ.get('WANDB_DIR') or run.run_dir / 'wandb'}")

    def log(self, step: int, values: dict[str, float]) -> None:
        if step >= self.first_step:
            self.run.log(values, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=1 if status == "crashed" else 0)


class MlflowLog(Tracker):
    """An MLflow run at ``MLFLOW_TRACKING_URI``, else in ``./mlruns``, in the experiment
    ``MLFLOW_EXPERIMENT_NAME`` (else gptforge); the config's keys are its parameters."""

    name, title, pip = "mlflow", "MLflow", "mlflow-skinny"
    module = "mlflow"  # its store is outside RUN
    STATUS = {"finished": "FINISHED", "stopped": "KILLED", "crashed": "FAILED"}

    def __init__(self, run: TrackedRun) -> None:
        mlflow = self.require()
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        # A continued run stays in the store it started in, unless the environment names another.
        uri = (os.environ.get("MLFLOW_TRACKING_URI") or run.saved.get("tracking_uri")
               or Path("mlruns").absolute().as_uri())
        self.client = self._client(mlflow, uri)
        self.Metric = Metric
        self.run_id, self.logged_through = run.saved.get("run_id"), -1
        known: dict[str, str] = {}
        if self.run_id:
            try:
                existing = self.client.get_run(self.run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                warnings.warn(f"MLflow run {self.run_id} is not in {uri}: starting a new one")
                self.run_id = None
            else:
                self.client.update_run(self.run_id, status="RUNNING")
                known = existing.data.params
                # what a killed session logged after the checkpoint: the same numbers again
                history = self.client.get_metric_history(self.run_id, tracker_key("loss"))
                self.logged_through = max((m.step for m in history), default=-1)
        if not self.run_id:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "gptforge"
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(
                exp_id, run_name=run.name, tags={"gptforge.run_dir": str(run.run_dir.absolute())}
            ).info.run_id
        # Parameters are write-once in MLflow: a resumed run adds keys it lacks and keeps the
        # values it started with (RUN/config.toml has the current ones).
        params = [Param(k, str(v)) for k, v in dotted_items(run.config).items() if k not in known]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.state = {"run_id": self.run_id, "tracking_uri": uri}
        self.where = f"run {self.run_id} at {uri}"

    def log(self, step: int, values: dict[str, float]) -> None:
        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, self.STATUS.get(status, "FINISHED"))

    @classmethod
    def abandon(cls, saved: dict[str, Any]) -> None:
        if saved.get("run_id") and saved.get("tracking_uri"):
            client = cls._client(cls.require(), saved["tracking_uri"])
            client.set_terminated(saved["run_id"], cls.STATUS["stopped"])

    @staticmethod
    def _client(mlflow: Any, uri: str) -> Any:
        if urllib.parse.urlparse(uri).scheme in ("", "file"):
            # MLflow 3 keeps its file store in maintenance and refuses it unless told otherwise;
            # a local ./mlruns is what we were asked for.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return mlflow.MlflowClient(tracking_uri=uri)


TRACKERS: tuple[type[Tracker], ...] = (TensorBoardLog, WandbLog, MlflowLog)


def wanted_trackers(cfg: RunConfig) -> list[type[Tracker]]:
    """The trackers the config switches on, each checked to be installed (one line if not)."""
    wanted = [t for t in TRACKERS if getattr(cfg.train, t.name)]
    for tracker in wanted:
        tracker.require()
    return wanted


class Trackers:
    """The trackers of a run, fed the records of metrics.jsonl. A tracker that fails (its server
    is down, its disk is full, its login is missing) costs one warning, and the run goes on
    without it: an experiment tracker must never stop a training run."""

    def __init__(self, cfg: RunConfig, run_dir: Path, saved: dict[str, Any], start_step: int,
                 log: Callable[[str], None] = say, abandoned: dict[str, Any] | None = None):
        self.saved = dict(saved)  # a tracker switched off now keeps its run for a later session
        self.active: list[Tracker] = []
        name = cfg.train.run_name or run_dir.absolute().name
        for cls in TRACKERS:  # the runs of a start that never saved: ended, not left "running"
            if (abandoned or {}).get(cls.name):
                try:
                    cls.abandon(abandoned[cls.name])
                except Exception as e:
                    _tracker_failed(cls, "could not end the restarted run's old one", e, going_on=False)
        for cls in wanted_trackers(cfg):
            try:
                tracker = cls(TrackedRun(run_dir, cfg, name, dict(self.saved.get(cls.name) or {}),
                                         start_step))
            except Exception as e:  # whatever the tracker's library raises
                _tracker_failed(cls, "could not start", e)
                continue
            self.active.append(tracker)
            log(f"{cls.title}: {tracker.where}")

    def state(self) -> dict[str, Any]:
        """run.json's ``trackers``: each tracker's run, so that a resumed run continues it."""
        return {**self.saved, **{t.name: t.state for t in self.active}}

    def log(self, **fields: Any) -> None:
        step = fields.get("step", 0)
        values = {tracker_key(k): float(v) for k, v in fields.items() if k != "step" and is_finite_number(v)}
        for tracker in list(self.active):
            try:
                tracker.log(step, values)
            except Exception as e:
                self.active.remove(tracker)
                _tracker_failed(tracker, f"failed at step {step}", e)
                with contextlib.suppress(Exception):  # marked failed, where it can still be told
                    tracker.close("crashed")

    def close(self, status: str) -> None:
        active, self.active = self.active, []
        for tracker in active:
            try:
                tracker.close(status)
            except Exception as e:
                _tracker_failed(tracker, "could not close its run", e, going_on=False)


def _tracker_failed(tracker: Tracker | type[Tracker], what: str, e: Exception,
                    going_on: bool = True) -> None:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:300]
    reason = reason or type(e).__name__
    warnings.warn(f"{tracker.title} {what} ({reason})"
                  + (f": training goes on without {tracker.title}" if going_on else ""))


# ----------------------------------------------------------------------------------------------
# A run's report: where every number and line of a training run goes


def _silent(_: str) -> None:
    pass


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 95 -> '1m35s', 7.5 -> '7.5s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Eta:
    """The run's expected wall time, said once, early: after MIN_STEPS steps and MIN_SECONDS
    counted from the end of the session's first step (which pays start-up and compilation).
    Host clock only: no wait for the GPU (the host runs a few steps ahead at most)."""

    MIN_STEPS, MIN_SECONDS = 5, 3.0

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.start: tuple[int, float] | None = None
        self.said = False

    def line(self, steps_done: int) -> str | None:
        now = time.perf_counter()
        if self.said:
            return None
        if self.start is None:
            self.start = (steps_done, now)
            return None
        n, elapsed = steps_done - self.start[0], now - self.start[1]
        if n < self.MIN_STEPS or elapsed < self.MIN_SECONDS:
            return None
        self.said = True
        left = self.max_steps - steps_done
        if left <= 0:
            return None
        per_step = elapsed / n
        until = datetime.datetime.now() + datetime.timedelta(seconds=per_step * left)
        when = until.strftime("%H:%M" if per_step * left < 20 * 3600 else "%Y-%m-%d %H:%M")
        return (f"estimate: {per_step:.3g} s per step, so the {left:,} steps left to "
                f"train.max_steps={self.max_steps:,} take about {format_duration(per_step * left)} "
                f"(until about {when})")


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
