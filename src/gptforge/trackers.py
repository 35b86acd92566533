"""The experiment trackers (TensorBoard, Weights & Biases, MLflow), each only when asked for: a
``Tracker`` per service, and ``Trackers``, which feeds a run's records to those switched on and
turns a tracker's failure into a warning.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from gptforge.config import RunConfig, dotted_items
from gptforge.console import say
from gptforge.errors import GptforgeError


def is_finite_number(v: Any) -> bool:
    """A value a tracker (or a plot of a run: report.py) can take as a number: an int or a float,
    not a bool, finite (metrics.jsonl writes NaN and infinity as strings)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
