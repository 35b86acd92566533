"""The Trainer: set-up builds the pieces, ``run()`` is the loop.

    train(cfg, RUN) -> check the data and the run directory -> join the processes ->
    Trainer(...): device, precision, model, wrapping, optimizer, resume state, the run's report
    Trainer.run(): for each step: step -> evaluate -> stop? -> report -> save; then the end

The loop says *when* things happen; what they are lives in the module named for each: one
optimizer step in step.py, the held-out loss in evaluate.py, HellaSwag in hellaswag.py, where the
numbers go in metrics.py (RunReport), checkpoints in checkpoint.py, and planning and resuming a
run (and the RNG state exact resume needs) in resume.py.

Stops on ``train.max_steps``, on ``train.target_loss`` or ``train.target_val_loss``, or on Ctrl-C /
SIGTERM / SIGHUP (the current step finishes, a checkpoint is saved, and the run ends cleanly). The
process that writes the run holds its lock (rundir.RunLock) from start to end.

Why a class, where nanoGPT has one flat script: the run's state (step, tokens, best validation
loss, the last losses) is read by several cadences and saved by one; as attributes of one object
with a ``state_dict()`` that state has a single owner, and each cadence is a method with a name,
not a closure that reaches into a 300-line function's locals.
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

# Imported here, not where torch would import it: lazily, under the first optimizer's construction
# (torch.optim's dynamo guard). During that import torch.fx.wrap leaves a frame that refers to
# itself, which keeps every frame then on the stack, the Trainer's with the model and optimizer in
# its locals, alive after train() returns, until a garbage collection.
import torch._dynamo

from gptforge.atomic import write_text
from gptforge.checkpoint import (
    TIED_KEY,
    Checkpoint,
    CheckpointError,
    load_weights,
    read_optimizer_state,
    remove_incomplete,
    save_best,
    save_checkpoint,
    warn_if_disk_is_short,
)
from gptforge.config import (
    AUTO,
    RunConfig,
    format_config,
    grad_accum_steps,
)
from gptforge.console import say
from gptforge.data import BatchFeeder, TokenLoader, iter_eval_batches
from gptforge.data.loader import RowLoader
from gptforge.device import Precision, configure_backends, eager, resolve_for
from gptforge.distributed import (
    DistEnv,
    any_rank,
    barrier,
    full_model_state,
    full_optimizer_state,
    gather_objects,
    load_optimizer_state,
    peer_lost,
    session,
    sum_over_ranks,
)
from gptforge.evaluate import byte_table, heldout_loss
from gptforge.hellaswag import HellaSwagResult, load_rendered
from gptforge.hellaswag import score as score_hellaswag
from gptforge.launch import launch_rank, restart_count
from gptforge.memory import is_out_of_memory, keep_freed_memory
from gptforge.metrics import RunReport, format_step, read_run_record, truncate_metrics
from gptforge.model import GPT
from gptforge.optim import build_optimizer, optimizer_state_bytes
from gptforge.presets import config_line
from gptforge.probe import DtypeChoice
from gptforge.resume import (
    FINISHED,
    Start,
    check_start,
    epochs_warning,
    fit_embedding,
    out_of_memory_stop,
    restart_line,
    restore_rng,
    rng_state,
)
from gptforge.rundir import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    free_space_then_continue,
    guarded_write,
    hold_run_lock,
)
from gptforge.signals import StopFlag
from gptforge.step import (
    DivergenceWatch,
    Stepper,
    StepResult,
    StepTimer,
    Trainable,
    TrainingDiverged,
    build_trainable,
    fit_micro_batch,
    loss_slice,
    settle_dtype,
)
from gptforge.version import __version__

__all__ = ["FINISHED", "StopFlag", "TrainResult", "Trainer", "TrainingDiverged", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    last_loss: float
    val_loss: float | None
    best_val_loss: float | None
    checkpoint: Path | None
    stopped_by: str  # "max_steps", "target_loss", "target_val_loss" or a signal name
    wall_s: float

    def summary(self, run: str) -> list[str]:
        """What ``gptforge train`` says at the end: the totals, and where to look next."""
        lines = [f"done ({self.stopped_by}): {self.step:,} steps, {self.tokens:,} tokens in "
                 f"{self.wall_s:.1f}s; last train loss {self.last_loss:.4f}"
                 + (f", val loss {self.val_loss:.4f}" if self.val_loss is not None else "")
                 + (f", best checkpoint's val loss {self.best_val_loss:.4f}"
                    if self.best_val_loss is not None else "")]
        if self.checkpoint is not None:
            lines.append(f"checkpoint: {self.checkpoint}")
        return lines + [f"metrics:    {Path(run) / METRICS_FILE}", f"sample:     gptforge sample --ckpt {run}"]


@dataclass
class Evals:
    """What a step's evaluations gave (None: not due at this step)."""

    val_loss: float | None = None
    hellaswag: HellaSwagResult | None = None
    val_bpb: float | None = None  # bits per byte of the same validation

    def any(self) -> bool:
        return self.val_loss is not None or self.hellaswag is not None


@dataclass
class Stop:
    reason: str  # target_loss, target_val_loss or a signal's name
    message: str


# ----------------------------------------------------------------------------------------------
# The entry point


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: Checkpoint | None = None,
    log: Callable[[str], None] = say,
    preset: str | None = None,
    init_from: str | Path | None = None,
    restart: bool = False,
) -> TrainResult:
    """Train per ``cfg``, writing metrics and checkpoints under ``run_dir``.

    With ``resume``, the weights, optimizer, data cursor and RNG state continue from that
    checkpoint, so the run goes on exactly as if it had never stopped. With ``init_from`` (a
    local Hugging Face GPT-2 directory or a gptforge run/checkpoint), a new run starts from those
    weights, for fine-tuning: the model's shape comes from there, dropout from ``cfg``. With
    ``restart``, a directory holding only the files of a run that never saved starts over.
    The writing process holds the run's lock throughout (re-entrant: the CLI may hold it already).
    """
    t_start = time.time()
    run_dir = Path(run_dir)
    with hold_run_lock(run_dir, enabled=launch_rank() == 0):
        start = check_start(cfg, run_dir, resume, init_from, restart, preset)
        if cfg.train.keep_freed_memory:
            keep_freed_memory()
        with session(cfg.train.device, cfg.train.dist_timeout_s) as env:
            trainer = None
            try:
                trainer = Trainer(cfg, run_dir, env, start, log, t_start)
                return trainer.run()
            except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
                problem = (out_of_memory_stop(e, cfg, env, run_dir, trainer and trainer.step)
                           if is_out_of_memory(e) else peer_lost(e, env))
                if problem is None:
                    raise
                raise problem from None
            finally:
                trainer = None  # released before the session ends: see distributed.shutdown


# ----------------------------------------------------------------------------------------------
# The Trainer


class Trainer:
    """One run on one rank: ``Trainer(...)`` sets it up, ``run()`` trains it to its end."""

    batch_note: str | None = None  # how train.batch_size=auto chose, where it did
    last_done: int | None = None  # a continued run: the last step logged past its checkpoint
    dtype_choice: DtypeChoice | None = None  # what train.dtype=auto measured, where it did

    def __init__(self, cfg: RunConfig, run_dir: Path, env: DistEnv, start: Start,
                 log: Callable[[str], None], t_start: float):
        tc, device = cfg.train, env.device
        self.cfg, self.run_dir, self.env, self.start, self.t_start = cfg, run_dir, env, start, t_start
        # HellaSwag's examples, read and tokenized once; a bad file stops every rank here, before
        # any collective and before the run directory is written
        self.hellaswag_items = load_rendered(
            tc.hellaswag_data or None, start.meta["tokenizer"], cfg.model.block_size,
            what=f"the data in {cfg.data.path}", option="train.hellaswag_data",
        )[0] if tc.hellaswag_interval else []
        if tc.dtype == AUTO:  # a dtype from here on, kept in the run's config
            tc.dtype, self.dtype_choice = settle_dtype(cfg, env, start.preset)
        precision = Precision.pick(device, tc.dtype)
        configure_backends(device)
        if tc.batch_size == AUTO:  # a number from here on, kept in the run's config
            tc.batch_size, self.batch_note = fit_micro_batch(cfg, env, precision, start.preset)
        self.resolved = resolve_for(cfg, device.type, env.world_size)
        cfg.model.pad_vocab_multiple = self.resolved.pad_vocab_multiple  # the model's shape from now on
        self.accum = grad_accum_steps(tc, env.world_size)
        self.loader = self._loader(start.train_tokens, start.train_mask, "the train split")
        self.val_rows = (None if start.val_mask is None else  # checked now, not at the first eval
                         self._loader(start.val_tokens, start.val_mask, "the val split", True))
        self.t: Trainable = build_trainable(cfg.model, env, precision, tc.seed, tc.parallel,
                                            self.resolved.compile, tc.ddp_bucket_mb, load=self._load_weights,
                                            activation_checkpointing=tc.activation_checkpointing,
                                            loss_slice=loss_slice(tc))
        self.optimizer = build_optimizer(self.t.model, cfg.optim, device.type,
                                         shard=(env.rank, env.world_size) if tc.parallel == "ddp" else (0, 1))
        # where the run stands; state_dict() saves it, load_state_dict() restores it
        self.step, self.tokens, self.best_val = 0, 0, None
        self.trained = 0  # conversation data: tokens the loss was taken on (the mask's 1s)
        self.last_loss: torch.Tensor | float = float("nan")
        self.stopped_by: str | None = None
        if start.resume is not None:
            self._load_optimizer(start.resume)
            self.load_state_dict(start.resume.trainer)
        barrier(env)  # every rank has checked the run directory before rank 0 writes into it
        self.report = self._open_run(log)
        self._log_start()
        self.stepper = Stepper(self.t, self.optimizer, BatchFeeder(self.loader.next_batch, device),
                               self.accum, cfg.optim.grad_clip, schedule=cfg.optim)
        self.timer, self.watch = StepTimer(device), DivergenceWatch(device)
        # DDP evaluates through the bare module, each rank a share of the batches; FSDP must run
        # every forward on every rank (the weights are gathered collectively), so all see all.
        self.eval_model = self.t.wrapped if tc.parallel == "fsdp" else self.t.model
        self.eval_shard = (env.rank, env.world_size) if tc.parallel == "ddp" else (0, 1)
        self.val_bytes = byte_table(start.meta["tokenizer"], cfg.data.path, device)  # for val bpb

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Step, evaluate, stop?, report, save, until a limit, a target or a signal; then the end."""
        tc = self.cfg.train
        self.saved_step = first_step = self.step  # a resumed run's starting point is already on disk
        self.ckpt_path: Path | None = None
        evals = Evals()
        self.t.wrapped.train()
        self.report.start_progress(tc.max_steps, self.step, tc.target_loss)
        try:
            with StopFlag() as signalled:
                while self.step < tc.max_steps:
                    result = self.take_step(first_step)  # lr, micro-batches, clipping, update
                    evals = self.evaluate_due()  # validation loss and HellaSwag at their intervals
                    stop = self.stop_due(result, evals, signalled)  # a target reached, or a signal
                    last = stop is not None or self.step >= tc.max_steps
                    logged = (self.step - 1) % tc.log_interval == 0 or last
                    if logged or evals.any():
                        self.report_step(result, evals, logged)  # the log line, metrics.jsonl, ...
                    if tc.save_interval and self.step % tc.save_interval == 0 and not last:
                        self.save(evals.val_loss)
                    if stop is not None:
                        self.stopped_by = stop.reason
                        self.report.log(stop.message)
                        break
                self.finish(evals)  # a last evaluation and a checkpoint of where the run stopped
        except BaseException as e:
            self.report.crashed(e, self.step, self.tokens)
            raise
        finally:
            self.report.close()
        return self.result()

    # -- the cadences --------------------------------------------------------------------------

    def take_step(self, first_step: int) -> StepResult:
        self.timer.start()
        cursor = self.loader.cursor
        result = self.stepper(self.step)
        self.timer.stop()
        if isinstance(self.loader, RowLoader):
            self.trained += self.loader.trained_between(cursor, self.loader.cursor)
        self.watch.record(self.step, result)
        self.last_loss = result.loss
        self.step += 1
        self.tokens += self.cfg.train.total_batch_tokens
        self.report.step_done(self.step)
        if self.resolved.compile and self.step - 1 == first_step:
            self.report.log(f"torch.compile: the first step took {self.timer.seconds():.1f}s, "
                            "compilation included")
        return result

    def evaluate_due(self) -> Evals:
        tc, evals = self.cfg.train, Evals()
        if tc.eval_interval and self.step % tc.eval_interval == 0:
            evals.val_loss, evals.val_bpb = self.validate()
        if tc.hellaswag_interval and self.step % tc.hellaswag_interval == 0:
            evals.hellaswag = self.hellaswag()
        return evals

    def stop_due(self, result: StepResult, evals: Evals, signalled: StopFlag) -> Stop | None:
        """The recipe's stop rule looks at every step's loss (a host sync, only when asked for)."""
        tc, done = self.cfg.train, self.step - 1
        loss = None
        if tc.target_loss > 0:
            self.watch.check()
            loss = float(result.loss)
        stopping = any_rank(bool(signalled), self.env)  # a signal may reach one rank first
        if loss is not None and loss < tc.target_loss:
            return Stop("target_loss", f"training loss {loss:.6f} is below train.target_loss="
                                       f"{tc.target_loss} at step {done}: stopping")
        if tc.target_val_loss > 0 and evals.val_loss is not None and evals.val_loss < tc.target_val_loss:
            return Stop("target_val_loss", f"validation loss {evals.val_loss:.6f} is below "
                                           f"train.target_val_loss={tc.target_val_loss} at step {done}: stopping")
        if stopping:
            name = signalled.signal_name or "signal"
            return Stop(name, f"{name} received: finished step {done}, saving and stopping")
        return None

    def report_step(self, result: StepResult, evals: Evals, logged: bool) -> None:
        """The step's line (when ``logged``) and evaluations, and one record of them."""
        self.watch.check()
        done, tc = self.step - 1, self.cfg.train
        loss, norm, dt = float(result.loss), float(result.norm), self.timer.seconds()
        tok_per_s = tc.total_batch_tokens / dt
        lr = self.stepper.lr
        chat = isinstance(self.loader, RowLoader)
        if logged:
            self.report.log(format_step(done, loss, lr, norm, dt * 1000, tok_per_s)
                            + (f" | trained tokens: {self.trained:,}" if chat else ""))
        fields: dict[str, Any] = dict(step=done, loss=loss, lr=lr, norm=norm, dt_ms=dt * 1000,
                                      tok_per_s=tok_per_s, tokens=self.tokens,
                                      **({"trained_tokens": self.trained} if chat else {}))
        fields.update(self.val_fields(done, evals))
        if evals.hellaswag is not None:
            fields.update(self.hellaswag_fields(done, evals.hellaswag))
        self.report.write(fields, self.step, self.best_val)

    def finish(self, evals: Evals) -> None:
        """A run that reached its end is evaluated there (unless that step just was), and every
        run saves where it stopped."""
        tc, done = self.cfg.train, self.step - 1
        self.stopped_by = stopped_by = self.stopped_by or "max_steps"
        if evals.val_loss is None and self.step > 0 and stopped_by in ("max_steps", "target_loss"):
            evals.val_loss, evals.val_bpb = self.validate()
            if evals.val_loss is not None:
                self.report.write(dict(step=done, **self.val_fields(done, evals), tokens=self.tokens),
                                  self.step, self.best_val)
        if tc.hellaswag_interval and evals.hellaswag is None and self.step > 0 and stopped_by in FINISHED:
            self.report.write(dict(step=done, tokens=self.tokens, **self.hellaswag_fields(done, self.hellaswag())),
                              self.step, self.best_val)
        self.final_val = evals.val_loss
        if self.step != self.saved_step and self.step > 0:
            self.save(evals.val_loss)

    def validate(self) -> tuple[float | None, float | None]:
        """(nats per token, bits per byte) on the val split; (None, None) without one."""
        tc, val = self.cfg.train, self.start.val_tokens
        if val is None or (self.start.val_mask is None and len(val) < tc.seq_len + 1):
            return None, None
        batches = (iter_eval_batches(val, tc.batch_size, tc.seq_len) if self.val_rows is None
                   else self.val_rows.batches_in_order())
        with eager(self.resolved.compile):
            held = heldout_loss(
                self.eval_model, batches, self.env.device,
                self.t.precision.autocast, tc.eval_max_batches, shard=self.eval_shard,
                reduce_sum=self._sum_over_ranks, token_bytes=self.val_bytes)
        return held.loss, held.bits_per_byte

    def val_fields(self, at_step: int, evals: Evals) -> dict[str, float]:
        """The validation line of the log, and its metrics.jsonl fields (none if not due)."""
        if evals.val_loss is None:
            return {}
        self.report.log(f"step {at_step:5d} | val loss: {evals.val_loss:.6f}"
                        + (f" | val bpb: {evals.val_bpb:.6f}" if evals.val_bpb is not None else ""))
        return {"val_loss": evals.val_loss, "val_bpb": evals.val_bpb}

    def hellaswag(self) -> HellaSwagResult:
        """As validate(): the uncompiled module; under DDP each rank a share of the batches, which
        hold at most a training micro-batch's tokens."""
        tc = self.cfg.train
        with eager(self.resolved.compile):
            return score_hellaswag(self.eval_model, self.hellaswag_items,
                                   batch_size=len(self.hellaswag_items),
                                   max_tokens=tc.batch_size * tc.seq_len, device=self.env.device,
                                   amp=self.t.precision.autocast, shard=self.eval_shard,
                                   reduce_sum=self._sum_over_ranks)

    def hellaswag_fields(self, at_step: int, hs: HellaSwagResult) -> dict[str, float]:
        self.report.log(f"step {at_step:5d} | hellaswag acc: {hs.acc:.4f} | acc_norm: {hs.acc_norm:.4f} "
                        f"({hs.examples:,} examples, {hs.wall_s:.1f}s)")
        return {"hellaswag_acc": hs.acc, "hellaswag_acc_norm": hs.acc_norm}

    def save(self, val_loss: float | None) -> Path:
        """Collective: every rank gathers, rank 0 writes, all wait for it. Never the weights of a
        run that diverged: the watch is read first."""
        self.watch.check()
        self.last_loss = float(self.last_loss)
        is_best = val_loss is not None and (self.best_val is None or val_loss < self.best_val)
        if is_best:
            self.best_val = val_loss
        model_sd = full_model_state(self.t.wrapped, self.env, self.t.parallel)
        optim_sd = full_optimizer_state(self.t.wrapped, self.optimizer, self.env, self.t.parallel)
        trainer = self.state_dict()
        path = self.run_dir / CHECKPOINT_DIR / f"step_{self.step:07d}"
        if self.env.is_main:
            path = save_checkpoint(self.run_dir, model_sd, optim_sd, self.cfg, self.start.meta["tokenizer"],
                                   trainer, keep_last=self.cfg.train.keep_last)
            if is_best:
                save_best(self.run_dir, path)
        barrier(self.env)
        self.saved_step, self.ckpt_path = self.step, path
        return path

    # -- the run's state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the run is (trainer_state.json): with the weights and the optimizer state, all a
        resumed run needs to go on exactly. Collective: every rank's RNG state is gathered."""
        rngs = gather_objects(rng_state(self.env.device), self.env)
        return {
            "step": self.step, "tokens": self.tokens, "loader": self.loader.state_dict(),
            "trained_tokens": self.trained,
            "rng": rngs[0], "rng_ranks": rngs, "world_size": self.env.world_size,
            "best_val_loss": self.best_val, "last_loss": float(self.last_loss),
            "wall_s": time.time() - self.t_start, "stopped_by": self.stopped_by,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.trained = int(state.get("trained_tokens", 0))
        self.best_val = state.get("best_val_loss")
        self.loader.load_state_dict(state["loader"])
        restore_rng(state, self.env, self.cfg.train.seed, self.step)

    def result(self) -> TrainResult:
        last_loss = float(self.last_loss)
        status = "finished" if self.stopped_by in FINISHED else "stopped"
        self.report.finished(status, stopped_by=self.stopped_by, step=self.step, tokens=self.tokens,
                             last_loss=last_loss, best_val_loss=self.best_val, val_loss=self.final_val,
                             checkpoint=str(self.ckpt_path) if self.ckpt_path else None)
        return TrainResult(self.run_dir, self.step, self.tokens, last_loss, self.final_val,
                           self.best_val, self.ckpt_path, self.stopped_by, time.time() - self.t_start)

    # -- set-up helpers ------------------------------------------------------------------------

    def _load_weights(self, model: GPT) -> None:
        if self.start.resume is not None:
            load_weights(model, self.start.resume)
        elif self.start.init_weights is not None:
            weights = fit_embedding(self.start.init_weights, self.start.init_vocab or 0,
                                    model.config.vocab_size, model.transformer.wte.weight.shape[0])
            missing, unexpected = model.load_state_dict(weights, strict=False)
            assert missing == [TIED_KEY] and not unexpected, (missing, unexpected)  # shapes checked on load

    def _load_optimizer(self, ckpt: Checkpoint) -> None:
        try:
            load_optimizer_state(self.t.wrapped, self.optimizer, read_optimizer_state(ckpt), self.env,
                                 self.cfg.train.parallel)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"optimizer state in {ckpt.path} does not fit this model ({e}): "
                "resume with the config the run was started with"
            ) from None

    def _loader(self, tokens: Any, mask: Any, what: str, masked: bool | None = None
                ) -> TokenLoader | RowLoader:
        """Windows of the token stream, or with a mask (conversations) rows of whole ones,
        trained on the mask unless data.mask=false (``masked``: the validation loss always is,
        so runs with and without the mask compare)."""
        tc, env = self.cfg.train, self.env
        if mask is None:
            return TokenLoader(tokens, tc.batch_size, tc.seq_len, mode=self.cfg.data.loader,
                               seed=tc.seed, rank=env.rank, world_size=env.world_size)
        return RowLoader(tokens, mask, self.start.meta["eot_id"], tc.batch_size, tc.seq_len,
                         mode=self.cfg.data.loader, seed=tc.seed, rank=env.rank,
                         world_size=env.world_size, what=f"{what} of {self.cfg.data.path}",
                         use_mask=self.cfg.data.mask if masked is None else masked)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return sum_over_ranks(t, self.env) if self.cfg.train.parallel == "ddp" else t

    def _open_run(self, log: Callable[[str], None]) -> RunReport:
        """On the writing rank: the run directory made ready (a continued run's leftovers past its
        checkpoint cleared), its config written, and the report that every number goes to."""
        start, run_dir, cfg = self.start, self.run_dir, self.cfg
        if not self.env.is_main:
            return RunReport(run_dir, cfg, log, enabled=False)
        run_dir.mkdir(parents=True, exist_ok=True)
        previous = read_run_record(run_dir).get("trackers", {})
        if start.resume is not None or start.restart:
            remove_incomplete(run_dir)
            self.last_done = truncate_metrics(run_dir / METRICS_FILE, self.step)  # restart: all
        if start.restart:
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        with guarded_write("config", run_dir / RUN_CONFIG_FILE, free_space_then_continue(run_dir)):
            write_text(run_dir / RUN_CONFIG_FILE, format_config(cfg))
        info: dict[str, Any] = {"command": ["gptforge", *sys.argv[1:]]}
        if start.preset is not None:
            info["preset"] = start.preset
        if start.init_from is not None:
            info["init_from"] = str(start.init_from)
        if self.dtype_choice is not None:
            info["dtype_auto"] = self.dtype_choice.record()
        # Trackers log the settings that ran: compile and dtype as resolved on this device.
        tracked = copy.deepcopy(cfg)
        tracked.train.compile, tracked.train.dtype = self.resolved.compile, self.resolved.dtype
        # A resumed run continues its tracker runs; a restarted one ends the old ones, starts anew.
        return RunReport(run_dir, tracked, log, enabled=True,
                         info=dict(info, max_steps=cfg.train.max_steps, world_size=self.env.world_size),
                         saved=previous if start.resume is not None else {},
                         abandoned=previous if start.restart else None, start_step=self.step)

    def _log_start(self) -> None:
        cfg, env, start, log = self.cfg, self.env, self.start, self.report.log
        tc, device = cfg.train, env.device
        if not env.is_main:
            return
        log(f"gptforge {__version__} (torch {torch.__version__}, Python {platform.python_version()})")
        log(config_line(cfg, self.start.preset or read_run_record(self.run_dir).get("preset"),
                        self.run_dir / RUN_CONFIG_FILE))
        procs = f" x {env.world_size} processes ({tc.parallel})" if env.distributed else ""
        log(f"device: {device}{procs} ({platform.processor() or platform.machine()}), precision: "
            f"{self.t.precision.label}, threads: {torch.get_num_threads()}")
        n_val = 0 if start.val_tokens is None else len(start.val_tokens)
        log(f"model: {self.t.model.num_params():,} parameters; data: {len(start.train_tokens):,} train "
            f"tokens, {n_val:,} val tokens ({start.meta['tokenizer']['name']})")
        log(f"batch: {tc.batch_size} x {tc.seq_len} tokens x {self.accum} accumulation steps"
            f"{f' x {env.world_size} processes' if env.distributed else ''} = "
            f"{tc.total_batch_tokens:,} tokens per step")
        if self.batch_note:
            log(f"train.batch_size=auto: {self.batch_note}")
        if self.dtype_choice is not None:
            log(self.dtype_choice.line())
        log("resolved: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in self.resolved.table().items()))
        if restart_count():  # torchrun restarted the job: say so, and what it cost
            log(restart_line(restart_count(), start.resume, self.step, self.last_done, tc.log_interval))
        elif start.resume is not None:
            log(f"resuming from {start.resume.path} at step {self.step}")
        if start.restart:
            log(f"{self.run_dir} holds a run that stopped before its first checkpoint: starting it again")
        if start.init_from is not None:
            log(f"starting from the weights of {start.init_from}")
        overfit = epochs_warning(cfg, len(start.train_tokens))
        if overfit:
            warnings.warn(overfit)
        warn_if_disk_is_short(self.run_dir, self.t.model, optimizer_state_bytes(self.optimizer))
