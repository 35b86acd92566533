"""One optimizer step, and what it runs on.

- ``Trainable``: the model as training steps run it: the bare module (evaluation, checkpoints and
  the optimizer use it), the module the steps run through (compiled, DDP or FSDP2), the precision
  and fp16's GradScaler. ``build_trainable`` makes one, for ``train`` and for ``bench`` alike.
- ``train_step``: forward and backward over the micro-batches, clipping, one optimizer step.
- ``Stepper``: ``train_step`` bound to a Trainable and its optimizer, with the learning rate of
  each step set from the schedule.
- ``DivergenceWatch``: a non-finite loss or norm, noticed without waiting for the GPU.
- ``StepTimer``: how long a step took, without stalling the GPU.
- ``fit_micro_batch``: what ``train.batch_size=auto`` becomes, by trial steps on CUDA.
- ``settle_dtype``: what ``train.dtype=auto`` becomes, measured on a CPU (probe.py).

Why a step is its own module: the loop in train.py only says *when* to step; *what* a step does
(the arithmetic the seed's recipe fixes: accumulation, clipping at 1.0, AdamW) is tested here on
its own, with nothing of a run around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from gptforge.config import AUTO, GPTConfig, OptimConfig, RunConfig, TrainConfig
from gptforge.device import (
    Precision,
    cpu_auto_dtype,
    dtype_name,
    preset_micro_batch,
    probe_shape,
    resolve_for,
)
from gptforge.distributed import (
    DistEnv,
    checkpoint_blocks,
    gather_objects,
    grad_sync,
    local_tensor,
    mean_over_ranks,
    min_over_ranks,
    rank_seed,
    wrap_model,
)
from gptforge.errors import GptforgeError
from gptforge.memory import (
    MemoryTrial,
    largest_that_fits,
    micro_batch_candidates,
    nothing_fits,
    release_memory,
)
from gptforge.model import GPT
from gptforge.optim import build_optimizer, lr_at, optimizer_state_bytes, set_lr, skips_on_device
from gptforge.presets import DEFAULT_PRESET
from gptforge.probe import DtypeChoice

Batches = Callable[[], "tuple[torch.Tensor, torch.Tensor]"]


class TrainingDiverged(GptforgeError):
    """The loss or gradient norm stopped being a finite number."""


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
    batches: Batches,
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


# ----------------------------------------------------------------------------------------------
# Timing without stalling the GPU


class StepTimer:
    """Seconds per training step, read only when a step is logged.

    On CUDA a pair of events brackets every step (recording them costs nothing); reading one waits
    for that step's end event, which only the steps that log do. Elsewhere, the wall clock.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        self._t0 = self._t1 = 0.0

    def start(self) -> None:
        if self.cuda:
            self._start.record(torch.cuda.current_stream(self.device))
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._end.record(torch.cuda.current_stream(self.device))
        else:
            self._t1 = time.perf_counter()

    def seconds(self) -> float:
        """The last step's duration (on CUDA, waits for that step to finish)."""
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0
        return self._t1 - self._t0


# ----------------------------------------------------------------------------------------------
# What a step runs on, built once for train and bench


@dataclass
class Trainable:
    model: GPT  # the bare module: evaluation, checkpoints and the optimizer use it
    wrapped: nn.Module  # compiled / DDP / FSDP2: what training steps run through (shares parameters)
    env: DistEnv
    parallel: str  # ddp or fsdp (with one process: neither)
    precision: Precision
    scaler: torch.amp.GradScaler | None  # fp16 only

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return grad_sync(self.wrapped, self.env, self.parallel, last)

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return mean_over_ranks(t, self.env)


def loss_slice(t: TrainConfig) -> int:
    """Positions per slice of the head and loss (model.SlicedHeadLoss) for a run; 0: unsliced."""
    return t.loss_slice_tokens if t.sliced_loss else 0


def build_trainable(
    model_cfg: GPTConfig,
    env: DistEnv,
    precision: Precision,
    seed: int,
    parallel: str = "ddp",
    compile: bool = False,
    bucket_mb: int = 25,
    load: Callable[[GPT], None] | None = None,
    activation_checkpointing: bool = False,
    loss_slice: int = 0,
) -> Trainable:
    """The model, seeded (the same seed gives the same initial weights on every rank), ``load``
    applied to the bare module (a checkpoint's weights go in before wrapping, so FSDP shards the
    loaded values), then checkpointed per block if asked, compiled/wrapped. Afterwards each rank
    gets its own seed, for its own dropout masks. ``loss_slice``: the head and loss in slices of
    this many positions (``loss_slice(train_config)``), 0 all at once."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model = GPT(model_cfg, loss_slice).to(env.device)
    if load is not None:
        load(model)
    wrapped = wrap_model(model, env, parallel, compile=compile, amp_dtype=precision.dtype,
                         bucket_mb=bucket_mb, activation_checkpointing=activation_checkpointing)
    if env.distributed:
        torch.manual_seed(rank_seed(seed, env.rank))
    return Trainable(model, wrapped, env, parallel, precision, precision.grad_scaler())


class Stepper:
    """``train_step`` on a Trainable: ``stepper(step)`` runs optimizer step ``step``. With a
    schedule, the learning rate of that step is set first (and kept in ``lr``)."""

    def __init__(self, trainable: Trainable, optimizer: torch.optim.Optimizer, batches: Batches,
                 accum_steps: int, grad_clip: float, schedule: OptimConfig | None = None):
        self.t, self.optimizer, self.batches = trainable, optimizer, batches
        self.accum_steps, self.grad_clip, self.schedule = accum_steps, grad_clip, schedule
        self.lr = float("nan")

    def __call__(self, step: int = 0) -> StepResult:
        if self.schedule is not None:
            self.lr = lr_at(step, self.schedule)
            set_lr(self.optimizer, self.lr)
        t = self.t
        return train_step(t.wrapped, self.optimizer, self.batches, self.accum_steps, self.grad_clip,
                          t.precision.autocast, t.scaler, step, grad_sync=t.grad_sync,
                          reduce_mean=t.reduce_mean)


# ----------------------------------------------------------------------------------------------
# train.batch_size=auto


def fit_micro_batch(cfg: RunConfig, env: DistEnv, precision: Precision, preset: str | None = None,
                    search: bool | None = None) -> tuple[int, str]:
    """What ``train.batch_size=auto`` becomes for this run, and a line saying how it was chosen.

    On CUDA (or wherever ``search`` says), every rank tries micro-batches that keep
    ``train.total_batch_tokens`` (memory.largest_that_fits) on a model of the run's shape with the
    run's activation checkpointing, built for the search and dropped after it, with the
    optimizer's state held aside; the smallest result over the ranks wins. The trials compute the
    head and loss as the run will (sliced or not, ``train.sliced_loss``): slices lower the peak,
    so the search finds the larger micro-batch they allow. The trials run eagerly
    and unsharded: compiled steps and FSDP's shards need no more memory than that, so what fits
    there fits in the run (and a model that fits only when FSDP shards it needs a batch size
    given by hand). The random generators are restored afterwards, so the run that follows
    is the one a numeric batch size of the same value gives. Elsewhere: the preset's micro-batch.
    """
    t = cfg.train
    sizes = micro_batch_candidates(t, env.world_size)
    if not (env.device.type == "cuda" if search is None else search):
        size = preset_micro_batch(t, env.world_size, preset)
        return size, (f"{size}, preset {preset or DEFAULT_PRESET}'s micro-batch (the search for the "
                      f"largest that fits runs on CUDA only)")
    devices = [env.device] if env.device.type == "cuda" else []
    shape = dataclasses.replace(cfg.model, pad_vocab_multiple=resolve_for(cfg, env.device.type).pad_vocab_multiple)
    with torch.random.fork_rng(devices=devices):
        with torch.device(env.device):
            model = GPT(shape, loss_slice(t))
        if t.activation_checkpointing:
            checkpoint_blocks(model)
        optimizer = build_optimizer(model, cfg.optim, env.device.type, shard=(env.rank, env.world_size))
        reserve = optimizer_state_bytes(optimizer) // (env.world_size if t.parallel == "fsdp" else 1)
        best, tried = largest_that_fits(sizes, MemoryTrial(model, precision.device, precision.autocast,
                                                           t.seq_len, cfg.model.vocab_size, reserve))
        del model, optimizer
    release_memory(env.device)
    chosen = min_over_ranks(best or 0, env)
    if chosen == 0:
        raise nothing_fits(env.device, t, sizes[0], env.distributed and t.parallel == "fsdp")
    trials = ", ".join(f"{b} {'fits' if ok else 'does not'}" for b, ok in tried)
    ranks = f"; the smallest over {env.world_size} processes" if env.distributed else ""
    return chosen, f"{chosen}, the largest that fits (trials: {trials}{ranks})"


def settle_dtype(cfg: RunConfig, env: DistEnv, preset: str | None = None) -> tuple[str, DtypeChoice | None]:
    """What ``train.dtype=auto`` becomes for this run (kept in its config from then on, so that a
    resumed run keeps it), and, on a CPU, the measurement it was decided on: rank 0 measures (or
    reads its cache, probe.py) and every rank follows. CUDA and MPS keep their rules."""
    if env.device.type != "cpu":
        return dtype_name(AUTO, env.device.type), None
    choice = cpu_auto_dtype(probe_shape(cfg, env.world_size, preset)) if env.is_main else None
    choice = gather_objects(choice, env)[0]
    return choice.dtype, choice
