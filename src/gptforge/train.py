"""The training loop: one visible loop built from small pure helpers.

    resolve device and precision -> load data -> build model and optimizer -> (resume) ->
    for each step: lr_at(step) -> train_step (accumulate, clip, step) -> log / eval / save

Stops on ``train.max_steps``, on ``train.target_loss``, or on Ctrl-C / SIGTERM / SIGHUP (the
current step finishes, a checkpoint is saved, and the run ends cleanly). The process that writes
the run holds its lock (rundir.RunLock) from start to end.

``plan_run`` decides what a command line does with a run directory: start a new run, continue
one (``--resume``), or either (``--resume auto``, for jobs that are restarted with the same command
after a preemption), or nothing because the run is already complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gptforge.checkpoint import (
    CHECKPOINT_DIR,
    TIED_KEY,
    Checkpoint,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_pretrained,
    load_weights,
    read_optimizer_state,
    remove_incomplete,
    save_best,
    save_checkpoint,
    space_needed,
    tensor_bytes,
)
from gptforge.config import (
    AUTO,
    RESUMABLE_KEYS,
    ConfigError,
    RunConfig,
    apply_overrides,
    config_differences,
    format_config,
    grad_accum_steps,
    resolve,
    set_value,
    validate_run,
)
from gptforge.data import TokenLoader, iter_eval_batches, load_meta, load_split
from gptforge.device import (
    BatchFeeder,
    StepTimer,
    autocast,
    configure_backends,
    eager,
    keep_freed_memory,
    pick_autocast_dtype,
    resolve_for,
)
from gptforge.distributed import (
    DistEnv,
    any_rank,
    barrier,
    full_model_state,
    full_optimizer_state,
    gather_objects,
    grad_sync,
    init_distributed,
    launch_rank,
    load_optimizer_state,
    local_tensor,
    mean_over_ranks,
    rank_seed,
    shutdown,
    sum_over_ranks,
    wrap_model,
)
from gptforge.errors import GptforgeError
from gptforge.hellaswag import HellaSwagResult, load_rendered
from gptforge.hellaswag import score as score_hellaswag
from gptforge.metrics import (
    RUN_FILE,
    TRACKERS,
    MetricsLog,
    Progress,
    RunRecord,
    Trackers,
    format_step,
    read_run_record,
    say,
    truncate_metrics,
    wanted_trackers,
)
from gptforge.model import GPT
from gptforge.optim import (
    build_optimizer,
    lr_at,
    optimizer_state_bytes,
    set_lr,
    skips_on_device,
)
from gptforge.rundir import (
    LOCK_FILE,
    disk_free,
    format_bytes,
    free_space_then_continue,
    guarded_write,
    hold_run_lock,
)

# Why a run ends when it is complete; otherwise a signal stopped it (its name), to be resumed.
FINISHED = ("max_steps", "target_loss", "target_val_loss")


class TrainingDiverged(GptforgeError):
    """The loss or gradient norm stopped being a finite number."""


# ----------------------------------------------------------------------------------------------
# The step


@dataclass
class StepResult:
    """One step's numbers as 0-d tensors on the device. Reading one waits for the step to finish,
    so the loop reads them only on steps that need them (log, save, target loss)."""

    loss: torch.Tensor  # mean over the micro-steps (and the ranks)
    norm: torch.Tensor  # global gradient norm before clipping
    bad: torch.Tensor  # the loss or the norm is not finite: the optimizer skipped the step


def diverged(step: int, loss: float, norm: float) -> TrainingDiverged:
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
    return TrainingDiverged(
        f"the {what} became {value} at step {step}: the run stopped and its last checkpoint is "
        "intact; lower optim.lr or raise optim.warmup_steps, then resume"
    )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    accum_steps: int,
    grad_clip: float,
    amp: Callable[[], contextlib.AbstractContextManager],
    scaler: torch.amp.GradScaler | None = None,
    step: int = 0,
    grad_sync: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext(),
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> StepResult:
    """Forward and backward over ``accum_steps`` micro-batches, clip, and one optimizer step.

    Each micro-step's loss is divided by ``accum_steps`` so the summed gradient equals the
    gradient of the mean loss over the whole batch. A step whose loss or gradient norm is not
    finite never reaches the weights. Where the optimizer can skip a step on the device (fused
    AdamW, our Muon: a ``found_inf`` flag, as GradScaler uses) that costs no host sync, and the
    trainer learns of it from ``StepResult.bad`` when it next looks (DivergenceWatch); with any
    other optimizer the flag is read here and TrainingDiverged raised at once.

    Under DDP/FSDP, ``grad_sync(False)`` skips the gradient all-reduce on all but the last
    micro-step, and ``reduce_mean`` averages the loss over ranks so that every rank takes the
    same decisions (stop at the target, stop on NaN).
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = None
    for micro in range(accum_steps):
        x, y = batches()
        with grad_sync(micro == accum_steps - 1):
            with amp():
                _, loss = model(x, y)
            loss = loss / accum_steps
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    # max_norm=inf measures the norm without changing the gradients.
    norm = local_tensor(torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else float("inf")
    )).detach()
    loss = reduce_mean(loss_sum)
    if scaler is not None:
        # fp16: overflowing gradients are routine, and the scaler skips those steps itself; only
        # a non-finite loss is divergence. (The scaler reads its flag on the host anyway.)
        bad = ~torch.isfinite(loss)
        if bad:
            raise diverged(step, float(loss), float(norm))
        scaler.step(optimizer)
        scaler.update()
        return StepResult(loss, norm, bad)
    bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
    if skips_on_device(optimizer):
        optimizer.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = None
    else:
        if bad:
            raise diverged(step, float(loss), float(norm))
        optimizer.step()
    return StepResult(loss, norm, bad)


class DivergenceWatch:
    """The first step whose loss or gradient norm was not finite, remembered on the device.

    ``record`` costs a few tiny kernels and no host sync; ``check`` reads the record (waiting for
    the GPU), so the loop calls it only where it syncs anyway: on steps that log or save, and at
    the end. Until then the skipped steps changed nothing, so the weights saved are never those of
    a non-finite step, and the error names the step where it happened.
    """

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.int64, device=device)
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.norm = torch.zeros((), dtype=torch.float32, device=device)

    def record(self, step: int, result: StepResult) -> None:
        first = result.bad & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, result.loss.float(), self.loss)
        self.norm = torch.where(first, result.norm.float(), self.norm)

    def check(self) -> None:
        step = int(self.step)
        if step >= 0:
            raise diverged(step, float(self.loss), float(self.norm))


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    amp: Callable[[], contextlib.AbstractContextManager],
    max_batches: int = 0,
    shard: tuple[int, int] = (0, 1),
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> float:
    """Mean next-token loss over consecutive windows of a split (all of it unless capped).

    With ``shard=(rank, world)`` each rank takes every world-th batch and ``reduce_sum`` adds
    the ranks' totals, so the result is the same as one process evaluating everything.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens)
    rank, world = shard
    for i, (x, y) in enumerate(iter_eval_batches(tokens, batch_size, seq_len)):
        if max_batches and i >= max_batches:
            break
        if i % world != rank:
            continue
        x, y = x.to(device).long(), y.to(device).long()  # int32 ids, widened on the device
        with amp():
            _, loss = model(x, y)
        sums[0] += loss.double() * y.numel()
        sums[1] += y.numel()
    model.train(was_training)
    total, count = reduce_sum(sums).tolist()
    return total / count if count else float("nan")


# ----------------------------------------------------------------------------------------------
# RNG state, for exact resume


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if device.type == "cuda":
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_from_json(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_json(obj: Any) -> Any:
    return [_to_json(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _from_json(obj: Any) -> Any:
    return tuple(_from_json(o) for o in obj) if isinstance(obj, list) else obj


# ----------------------------------------------------------------------------------------------
# Stopping on a signal


class StopFlag:
    """Turns SIGINT, SIGTERM and SIGHUP (the terminal was closed) into a request to stop after
    the current step. A signal this process was started ignoring stays ignored: under
    ``nohup`` a closed terminal must not stop the run.

    A second Ctrl-C restores the default handler's behaviour (KeyboardInterrupt) for the impatient.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                    if hasattr(signal, name))

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopFlag":
        for sig in self.SIGNALS:
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal_name is not None


# ----------------------------------------------------------------------------------------------
# The run directory


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


def _silent(_: str) -> None:
    pass


def _warn_if_disk_is_short(run_dir: Path, model: GPT, optimizer: torch.optim.Optimizer) -> None:
    """A save needs room for a whole new checkpoint while the last one is still there."""
    size = space_needed(tensor_bytes({k: v for k, v in model.state_dict().items() if k != TIED_KEY})
                        + optimizer_state_bytes(optimizer))
    free = disk_free(run_dir)
    if free < 2 * size:
        warnings.warn(
            f"{run_dir} has {format_bytes(free)} free, less than two checkpoints of this run "
            f"({format_bytes(2 * size)}): a save may run out of space; free some, or choose an "
            "--out on a larger disk"
        )


# What a run writes at its top level. A directory holding nothing else but no complete checkpoint
# is a run that was stopped before its first save: --resume auto starts it again.
RUN_FILES = {LOCK_FILE, RUN_FILE, "metrics.jsonl", "config.toml", CHECKPOINT_DIR,
             *(name for tracker in TRACKERS for name in tracker.run_files)}


def _run_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE) if run_dir.is_dir() else []


def check_run_dir(run_dir: Path, resuming: bool) -> None:
    """A new run needs an empty (or absent) directory, so one run never overwrites another."""
    if resuming:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise GptforgeError(f"--out {run_dir} is a file: choose a directory for the run")
    if _run_entries(run_dir):
        raise GptforgeError(
            f"--out {run_dir} already holds files: continue that run with --resume, "
            "or choose another --out"
        )


def resolve_model_vocab(cfg: RunConfig, meta: dict[str, Any]) -> None:
    """Take the model's vocabulary from the data where the config leaves it at 0; else check."""
    data_vocab = int(meta["vocab_size"])
    tok_name = meta["tokenizer"]["name"]
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data_vocab
    elif cfg.model.vocab_size != data_vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} does not match the data's {tok_name} "
            f"tokenizer ({data_vocab} tokens): set model.vocab_size={data_vocab} (or 0 to take "
            "it from the data), or prepare the data with the tokenizer the model expects"
        )


# ----------------------------------------------------------------------------------------------
# What a command line does with a run directory


@dataclass
class RunPlan:
    cfg: RunConfig
    resume: Checkpoint | None = None  # continue from this checkpoint
    complete: str | None = None  # the run needs no more steps: why (--resume auto exits 0)
    restart: bool = False  # RUN holds only the files of a start that never saved a checkpoint


def run_complete(ckpt: Checkpoint, cfg: RunConfig) -> str | None:
    """Why the run in ``ckpt`` has nothing left to do under ``cfg``, or None."""
    tc, state = cfg.train, ckpt.trainer
    last, best_val = state.get("last_loss"), state.get("best_val_loss")
    if ckpt.step >= tc.max_steps:
        return f"the run is complete: it reached train.max_steps={tc.max_steps} (step {ckpt.step})"
    # The loop checks the targets after every step (every evaluation), so a checkpoint whose loss
    # is under the target is the one the run stopped at.
    if tc.target_loss > 0 and isinstance(last, (int, float)) and last < tc.target_loss:
        return (f"the run is complete: its training loss {last:.6f} is below "
                f"train.target_loss={tc.target_loss} (step {ckpt.step})")
    if tc.target_val_loss > 0 and isinstance(best_val, (int, float)) and best_val < tc.target_val_loss:
        return (f"the run is complete: its validation loss {best_val:.6f} is below "
                f"train.target_val_loss={tc.target_val_loss} (step {ckpt.step})")
    return None


def refuse_complete(ckpt: Checkpoint, cfg: RunConfig) -> None:
    """Continuing a complete run is a mistake (but for --resume auto, which reports it)."""
    done = run_complete(ckpt, cfg)
    if done:
        raise GptforgeError(
            f"{done}: to train further, raise the limit it reached (e.g. --set "
            f"train.max_steps=N with N > {ckpt.step}), or start a new run"
        )


def _is_started_run(run_dir: Path) -> bool:
    """RUN holds only what a run writes, and no complete checkpoint: a start that never saved."""
    entries = _run_entries(run_dir)  # a kill mid-rewrite leaves run.json.tmp and the like
    return bool(entries) and all(e.removesuffix(".tmp") in RUN_FILES for e in entries)


def _check_same_run(ckpt: Checkpoint, started: RunConfig, wanted: RunConfig, skip_model: bool) -> None:
    """The command line must describe the run it continues: one line naming every key that differs."""
    diffs = [(k, a, b) for k, a, b in config_differences(started, wanted)
             if k not in RESUMABLE_KEYS and not (skip_model and k.startswith("model.") and k != "model.dropout")]
    if diffs:
        listed = "; ".join(f"{k} is {a!r} in the run, {b!r} in this command" for k, a, b in diffs)
        raise ConfigError(
            f"this command does not describe the run it continues ({ckpt.path}): {listed}. "
            "Give the run's own settings (its config.toml); only "
            + ", ".join(sorted(k for k in RESUMABLE_KEYS if not k.startswith("sample.")))
            + " and the sample keys may change"
        )


def plan_run(
    out: str | Path,
    resume: str | None,
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    data: str | None = None,
    init_from: str | None = None,
    verify: str = "sha256",
) -> RunPlan:
    """What ``gptforge train`` does with ``--out`` (``resume``: None = a new run; "" = continue
    RUN; "auto" = continue RUN if it holds a checkpoint, else start it; or a checkpoint path).

    Continuing with ``--preset``/``--config`` (or ``auto``) checks that they, with ``--set`` and
    ``--data``, give the run's own config except for RESUMABLE_KEYS, whose new values apply.
    Continuing with ``--set`` alone applies those keys to the run's config, as asked.
    """
    out, overrides = Path(out), list(overrides or [])

    def from_command_line() -> RunConfig:
        cfg = resolve(preset, config_file, overrides)
        if data:
            cfg.data.path = data
        return cfg

    if resume is None:
        return RunPlan(from_command_line())
    auto = resume == "auto"
    if auto:
        try:
            find_checkpoint(out)
        except CheckpointError:
            return RunPlan(from_command_line(), restart=_is_started_run(out))
    ckpt = load_checkpoint(out if resume in ("", "auto") else resume, verify=verify)
    cfg = ckpt.config
    if preset or config_file or auto:
        wanted = from_command_line()
        if wanted.model.vocab_size == 0:
            resolve_model_vocab(wanted, load_meta(wanted.data.path or cfg.data.path))
        if wanted.model.pad_vocab_multiple == AUTO:  # decided when the run started, on its device
            wanted.model.pad_vocab_multiple = cfg.model.pad_vocab_multiple
        _check_same_run(ckpt, cfg, wanted, skip_model=init_from is not None)
        for key in RESUMABLE_KEYS:
            section, name = key.split(".")
            set_value(cfg, key, getattr(getattr(wanted, section), name))
    else:
        apply_overrides(cfg, overrides)
        if data:
            cfg.data.path = data
    validate_run(cfg)
    if not auto:
        refuse_complete(ckpt, cfg)
    return RunPlan(cfg, ckpt, complete=run_complete(ckpt, cfg))


# ----------------------------------------------------------------------------------------------
# The run


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
        return _start(cfg, run_dir, resume, log, preset, init_from, restart, t_start)


def _start(
    cfg: RunConfig, run_dir: Path, resume: Checkpoint | None, log: Callable[[str], None],
    preset: str | None, init_from: str | Path | None, restart: bool, t_start: float,
) -> TrainResult:
    tc = cfg.train

    # 1. data, and the model's vocabulary from it (every rank checks the same things, so a
    #    mistake stops all of them before any collective)
    meta = load_meta(cfg.data.path)
    if resume is not None and meta["tokenizer"] != resume.tokenizer:
        raise CheckpointError(
            f"checkpoint {resume.path} was trained with a different tokenizer than the data in "
            f"{cfg.data.path}: resume with the data the run was started with"
        )
    init_weights = None
    if init_from is not None:
        if resume is not None:
            raise GptforgeError("--init-from starts a new run and --resume continues one: use one of them")
        source_cfg, init_weights, source_tokenizer = load_pretrained(init_from)
        if source_tokenizer != meta["tokenizer"]:
            raise CheckpointError(
                f"{init_from} was trained with the {source_tokenizer.get('name')} tokenizer, other "
                f"than the data's ({meta['tokenizer']['name']}): prepare the data with the "
                "tokenizer of the model you start from"
            )
        cfg.model = dataclasses.replace(source_cfg, dropout=cfg.model.dropout)
    resolve_model_vocab(cfg, meta)
    validate_run(cfg)
    if resume is not None:
        refuse_complete(resume, cfg)
    check_run_dir(run_dir, resuming=resume is not None or restart)
    wanted_trackers(cfg)  # a missing package stops the run here, before RUN is written
    train_tokens = load_split(cfg.data.path, "train")
    val_tokens = load_split(cfg.data.path, "val") if meta["val_tokens"] > 0 else None

    # 2. processes, device and precision
    if tc.keep_freed_memory:
        keep_freed_memory()
    env = init_distributed(tc.device, tc.dist_timeout_s)
    try:
        result = _train(cfg, run_dir, resume, log, env, meta, train_tokens, val_tokens, t_start,
                        preset, init_from, init_weights, restart)
    except BaseException:
        shutdown(env, clean=False)
        raise
    shutdown(env)
    return result


def _train(
    cfg: RunConfig, run_dir: Path, resume: Checkpoint | None, log: Callable[[str], None],
    env: DistEnv, meta: dict[str, Any], train_tokens: np.ndarray, val_tokens: np.ndarray | None,
    t_start: float, preset: str | None, init_from: str | Path | None,
    init_weights: dict[str, torch.Tensor] | None, restart: bool,
) -> TrainResult:
    tc, oc = cfg.train, cfg.optim
    if not env.is_main:
        log = _silent
    device = env.device
    accum = grad_accum_steps(tc, env.world_size)
    loader = TokenLoader(train_tokens, tc.batch_size, tc.seq_len, mode=cfg.data.loader,
                         seed=tc.seed, rank=env.rank, world_size=env.world_size)
    # HellaSwag's examples, read and tokenized once; a bad file stops every rank here, before
    # any collective and before the run directory is written
    hellaswag_items = load_rendered(
        tc.hellaswag_data or None, meta["tokenizer"], cfg.model.block_size,
        what=f"the data in {cfg.data.path}", option="train.hellaswag_data",
    )[0] if tc.hellaswag_interval else []
    resolved = resolve_for(cfg, device.type, env.world_size)
    cfg.model.pad_vocab_multiple = resolved.pad_vocab_multiple  # the model's shape from now on
    amp_dtype = pick_autocast_dtype(device, tc.dtype)
    configure_backends(device)

    def amp() -> contextlib.AbstractContextManager:
        return autocast(device, amp_dtype)

    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    # 3. model and optimizer (seeded, so the same seed gives the same initial weights on every
    #    rank); a checkpoint's weights go in before wrapping, so FSDP shards the loaded values
    random.seed(tc.seed)
    np.random.seed(tc.seed % 2**32)
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)
    if resume is not None:
        load_weights(model, resume)
    elif init_weights is not None:
        missing, unexpected = model.load_state_dict(init_weights, strict=False)
        assert missing == [TIED_KEY] and not unexpected, (missing, unexpected)  # shapes checked on load
    # Training steps run through the wrapped (compiled, DDP/FSDP) module; evaluation, checkpoints
    # and the optimizer use the bare one, which shares its parameters.
    wrapped = wrap_model(model, env, tc.parallel, compile=resolved.compile, amp_dtype=amp_dtype,
                         bucket_mb=tc.ddp_bucket_mb)
    if env.distributed:  # same initial weights everywhere, but each rank its own dropout masks
        torch.manual_seed(rank_seed(tc.seed, env.rank))
    optimizer = build_optimizer(model, oc, device.type,
                                shard=(env.rank, env.world_size) if tc.parallel == "ddp" else (0, 1))

    step, tokens_seen, best_val = 0, 0, None
    if resume is not None:
        try:
            load_optimizer_state(wrapped, optimizer, read_optimizer_state(resume), env, tc.parallel)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"optimizer state in {resume.path} does not fit this model ({e}): "
                "resume with the config the run was started with"
            ) from None
        state = resume.trainer
        step, tokens_seen = int(state["step"]), int(state["tokens"])
        best_val = state.get("best_val_loss")
        loader.load_state_dict(state["loader"])
        # Each rank continues its own random stream when the world size is unchanged.
        per_rank = state.get("rng_ranks") or [state["rng"]]
        set_rng_state(per_rank[env.rank] if len(per_rank) == env.world_size else per_rank[0], device)
        if len(per_rank) != env.world_size and env.distributed:  # new ranks: their own dropout
            torch.manual_seed(rank_seed(tc.seed + step, env.rank))

    barrier(env)  # every rank has checked the run directory before rank 0 writes into it
    metrics = record = trackers = None
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None or restart:
            remove_incomplete(run_dir)
            truncate_metrics(run_dir / "metrics.jsonl", step)  # restart: step 0, all of it
        # A resumed run continues its tracker runs; a restarted one starts new ones.
        saved = read_run_record(run_dir).get("trackers", {}) if resume is not None else {}
        if restart:
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        with guarded_write("config", run_dir / "config.toml", free_space_then_continue(run_dir)):
            (run_dir / "config.toml").write_text(format_config(cfg), encoding="utf-8")
        metrics = MetricsLog(run_dir / "metrics.jsonl")
        info = {"command": ["gptforge", *sys.argv[1:]]}
        if preset is not None:
            info["preset"] = preset
        if init_from is not None:
            info["init_from"] = str(init_from)
        record = RunRecord(run_dir, **info, max_steps=tc.max_steps, world_size=env.world_size)
        trackers = Trackers(cfg, run_dir, saved, start_step=step, log=log)
        record.update(trackers=trackers.state())
    tokenizer = meta["tokenizer"]

    log(format_config(cfg).rstrip())
    prec = {None: "float32", torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast"}
    procs = f" x {env.world_size} processes ({tc.parallel})" if env.distributed else ""
    log(f"device: {device}{procs} ({platform.processor() or platform.machine()}), precision: "
        f"{prec[amp_dtype]}, threads: {torch.get_num_threads()}")
    log(f"model: {model.num_params():,} parameters; data: {len(train_tokens):,} train tokens, "
        f"{0 if val_tokens is None else len(val_tokens):,} val tokens ({tokenizer['name']})")
    log(f"batch: {tc.batch_size} x {tc.seq_len} tokens x {accum} accumulation steps"
        f"{f' x {env.world_size} processes' if env.distributed else ''} = "
        f"{tc.total_batch_tokens:,} tokens per step")
    log("resolved: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in resolved.table().items()))
    if resume is not None:
        log(f"resuming from {resume.path} at step {step}")
    if restart:
        log(f"{run_dir} holds a run that stopped before its first checkpoint: starting it again")
    if init_from is not None:
        log(f"starting from the weights of {init_from}")
    if env.is_main:
        _warn_if_disk_is_short(run_dir, model, optimizer)

    def trainer_state(last_loss: float, stopped_by: str | None) -> dict[str, Any]:
        """Where the run is; saving reads the device, so the divergence check comes first."""
        rngs = gather_objects(rng_state(device), env)
        return {
            "step": step, "tokens": tokens_seen, "loader": loader.state_dict(),
            "rng": rngs[0], "rng_ranks": rngs, "world_size": env.world_size,
            "best_val_loss": best_val, "last_loss": last_loss, "wall_s": time.time() - t_start,
            "stopped_by": stopped_by,
        }

    def save(last_loss: torch.Tensor | float, val_loss: float | None, stopped_by: str | None = None) -> Path:
        """Collective: every rank gathers, rank 0 writes, all wait for it. Never the weights of a
        run that diverged: the watch is read first."""
        nonlocal best_val
        watch.check()
        last_loss = float(last_loss)
        is_best = val_loss is not None and (best_val is None or val_loss < best_val)
        if is_best:
            best_val = val_loss
        model_sd = full_model_state(wrapped, env, tc.parallel)
        optim_sd = full_optimizer_state(wrapped, optimizer, env, tc.parallel)
        trainer = trainer_state(last_loss, stopped_by)
        path = run_dir / CHECKPOINT_DIR / f"step_{step:07d}"
        if env.is_main:
            path = save_checkpoint(run_dir, model_sd, optim_sd, cfg, tokenizer, trainer,
                                   keep_last=tc.keep_last)
            if is_best:
                save_best(run_dir, path)
        barrier(env)
        return path

    # DDP evaluates through the bare module, each rank a share of the batches; FSDP must run
    # every forward on every rank (the weights are gathered collectively), so all see all.
    eval_model = wrapped if tc.parallel == "fsdp" else model
    eval_shard = (env.rank, env.world_size) if tc.parallel == "ddp" else (0, 1)

    def validate() -> float | None:
        if val_tokens is None or len(val_tokens) < tc.seq_len + 1:
            return None
        with eager(resolved.compile):
            return evaluate_loss(eval_model, val_tokens, tc.batch_size, tc.seq_len, device, amp,
                                 tc.eval_max_batches, shard=eval_shard,
                                 reduce_sum=lambda t: sum_over_ranks(t, env) if tc.parallel == "ddp" else t)

    def hellaswag() -> HellaSwagResult:
        """As validate(): the uncompiled module; under DDP each rank a share of the batches, which
        hold at most a training micro-batch's tokens."""
        with eager(resolved.compile):
            return score_hellaswag(eval_model, hellaswag_items, batch_size=len(hellaswag_items),
                                   max_tokens=tc.batch_size * tc.seq_len, device=device, amp=amp,
                                   shard=eval_shard,
                                   reduce_sum=lambda t: sum_over_ranks(t, env) if tc.parallel == "ddp" else t)

    def log_hellaswag(at_step: int, hs: HellaSwagResult) -> dict[str, float]:
        log(f"step {at_step:5d} | hellaswag acc: {hs.acc:.4f} | acc_norm: {hs.acc_norm:.4f} "
            f"({hs.examples:,} examples, {hs.wall_s:.1f}s)")
        return {"hellaswag_acc": hs.acc, "hellaswag_acc_norm": hs.acc_norm}

    def write_metrics(**fields: Any) -> None:
        if metrics is not None:
            metrics.write(**fields)
        if trackers is not None:
            trackers.log(**fields)
        if record is not None:
            latest = {k: fields[k] for k in ("tok_per_s",) if k in fields}
            if "loss" in fields:
                latest["last_loss"] = fields["loss"]
            record.update(step=step, tokens=tokens_seen, best_val_loss=best_val, **latest)

    # 4. the loop. Nothing in it waits for the GPU except on steps that log, evaluate or save
    #    (and every step when train.target_loss asks to compare each step's loss).
    next_batch = BatchFeeder(loader.next_batch, device)
    timer, watch = StepTimer(device), DivergenceWatch(device)
    wrapped.train()
    last_loss: torch.Tensor | float = float("nan")
    val_loss, ckpt_path = None, None
    hs: HellaSwagResult | None = None
    stopped_by = "max_steps"
    saved_step = first_step = step  # a resumed run's starting point is already on disk
    progress = Progress(tc.max_steps, step, enabled=env.is_main, target_loss=tc.target_loss)
    log = progress.wrap(log)
    try:
        with StopFlag() as stop:
            while step < tc.max_steps:
                lr = lr_at(step, oc)
                set_lr(optimizer, lr)
                timer.start()
                result = train_step(
                    wrapped, optimizer, next_batch, accum, oc.grad_clip, amp, scaler, step,
                    grad_sync=lambda last: grad_sync(wrapped, env, tc.parallel, last),
                    reduce_mean=lambda t: mean_over_ranks(t, env))
                timer.stop()
                watch.record(step, result)
                last_loss = result.loss
                done_step = step
                step += 1
                tokens_seen += tc.total_batch_tokens
                progress.update()
                if resolved.compile and done_step == first_step:
                    log(f"torch.compile: the first step took {timer.seconds():.1f}s, compilation included")

                val_loss = None
                if tc.eval_interval and step % tc.eval_interval == 0:
                    val_loss = validate()
                hs = None
                if tc.hellaswag_interval and step % tc.hellaswag_interval == 0:
                    hs = hellaswag()
                loss = None
                if tc.target_loss > 0:  # the recipe's stop rule looks at every step's loss
                    watch.check()
                    loss = float(result.loss)
                reached_target = loss is not None and loss < tc.target_loss
                reached_val = (tc.target_val_loss > 0 and val_loss is not None
                               and val_loss < tc.target_val_loss)
                stopping = any_rank(bool(stop), env)  # a signal may reach one rank first
                last = step >= tc.max_steps or reached_target or reached_val or stopping
                logged = done_step % tc.log_interval == 0 or last
                if logged or val_loss is not None or hs is not None:
                    watch.check()
                    loss, norm, dt = float(result.loss), float(result.norm), timer.seconds()
                    tok_per_s = tc.total_batch_tokens / dt
                    progress.show(loss, tok_per_s)
                    if logged:
                        log(format_step(done_step, loss, lr, norm, dt * 1000, tok_per_s))
                    if val_loss is not None:
                        log(f"step {done_step:5d} | val loss: {val_loss:.6f}")
                    fields = dict(step=done_step, loss=loss, lr=lr, norm=norm,
                                  dt_ms=dt * 1000, tok_per_s=tok_per_s, tokens=tokens_seen)
                    if val_loss is not None:
                        fields["val_loss"] = val_loss
                    if hs is not None:
                        fields.update(log_hellaswag(done_step, hs))
                    write_metrics(**fields)
                if tc.save_interval and step % tc.save_interval == 0 and not last:
                    ckpt_path = save(last_loss, val_loss)
                    saved_step = step
                if reached_target:
                    stopped_by = "target_loss"
                    log(f"training loss {loss:.6f} is below train.target_loss="
                        f"{tc.target_loss} at step {done_step}: stopping")
                    break
                if reached_val:
                    stopped_by = "target_val_loss"
                    log(f"validation loss {val_loss:.6f} is below train.target_val_loss="
                        f"{tc.target_val_loss} at step {done_step}: stopping")
                    break
                if stopping:
                    stopped_by = stop.signal_name or "signal"
                    log(f"{stopped_by} received: finished step {done_step}, saving and stopping")
                    break

            # 5. the end: a final evaluation and a checkpoint of where the run stopped
            if val_loss is None and step > 0 and stopped_by in ("max_steps", "target_loss"):
                val_loss = validate()
                if val_loss is not None:
                    log(f"step {step - 1:5d} | val loss: {val_loss:.6f}")
                    write_metrics(step=step - 1, val_loss=val_loss, tokens=tokens_seen)
            if (tc.hellaswag_interval and hs is None and step > 0
                    and stopped_by in FINISHED):
                write_metrics(step=step - 1, tokens=tokens_seen,
                              **log_hellaswag(step - 1, hellaswag()))
            if step != saved_step and step > 0:
                ckpt_path = save(last_loss, val_loss, stopped_by)
    except BaseException as e:
        if trackers is not None:
            trackers.close("crashed")
        if record is not None:
            # Best effort: when the disk is full, run.json cannot say so either.
            with contextlib.suppress(GptforgeError, OSError):
                record.update(status="crashed", error=str(e) or type(e).__name__, step=step,
                              tokens=tokens_seen)
        raise
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    last_loss = float(last_loss)
    status = "finished" if stopped_by in FINISHED else "stopped"
    if trackers is not None:
        trackers.close(status)
    if record is not None:
        record.update(status=status,
                      stopped_by=stopped_by, step=step, tokens=tokens_seen, last_loss=last_loss,
                      best_val_loss=best_val, val_loss=val_loss,
                      checkpoint=str(ckpt_path) if ckpt_path else None)

    wall = time.time() - t_start
    return TrainResult(run_dir, step, tokens_seen, last_loss, val_loss, best_val, ckpt_path,
                       stopped_by, wall)
