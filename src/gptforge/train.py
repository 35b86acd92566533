"""The training loop: one visible loop built from small pure helpers.

    resolve device and precision -> load data -> build model and optimizer -> (resume) ->
    for each step: lr_at(step) -> train_step (accumulate, clip, step) -> log / eval / save

Stops on ``train.max_steps``, on ``train.target_loss``, or on Ctrl-C / SIGTERM (the current step
finishes, a checkpoint is saved, and the run ends cleanly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import random
import signal
import sys
import time
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
    load_pretrained,
    load_weights,
    read_optimizer_state,
    remove_incomplete,
    save_best,
    save_checkpoint,
)
from gptforge.config import ConfigError, RunConfig, format_config, grad_accum_steps, validate_run
from gptforge.data import TokenLoader, iter_eval_batches, load_meta, load_split
from gptforge.device import autocast, keep_freed_memory, pick_autocast_dtype
from gptforge.distributed import (
    DistEnv,
    any_rank,
    as_scalar,
    barrier,
    full_model_state,
    full_optimizer_state,
    gather_objects,
    grad_sync,
    init_distributed,
    load_optimizer_state,
    mean_over_ranks,
    shutdown,
    sum_over_ranks,
    wrap_model,
)
from gptforge.errors import GptforgeError
from gptforge.metrics import (
    MetricsLog,
    Progress,
    RunRecord,
    TensorBoardLog,
    format_step,
    require_tensorboard,
    truncate_metrics,
)
from gptforge.model import GPT
from gptforge.optim import build_optimizer, lr_at, set_lr


class TrainingDiverged(GptforgeError):
    """The loss or gradient norm stopped being a finite number."""


# ----------------------------------------------------------------------------------------------
# The step


@dataclass
class StepResult:
    loss: float  # mean over the micro-steps
    norm: float  # global gradient norm before clipping


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
    gradient of the mean loss over the whole batch. A non-finite loss or gradient norm stops
    before the optimizer step, so the weights stay those of the last good step.

    Under DDP/FSDP, ``grad_sync(False)`` skips the gradient all-reduce on all but the last
    micro-step, and ``reduce_mean`` averages the logged loss over ranks so that every rank takes
    the same decisions (stop at the target, stop on NaN).
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
    norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else float("inf")
    )
    loss_value, norm_value = reduce_mean(loss_sum).item(), as_scalar(norm)
    if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(norm_value)):
        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
        raise TrainingDiverged(
            f"the {what} became {loss_value if what == 'loss' else norm_value} at step {step}: "
            "the run stopped and its last checkpoint is intact; lower optim.lr or raise "
            "optim.warmup_steps, then resume"
        )
    if scaler is not None:  # fp16: the scaler skips steps whose gradients overflowed
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(loss_value, norm_value)


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
        x, y = x.to(device), y.to(device)
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
    """Turns SIGINT/SIGTERM into a request to stop after the current step.

    A second Ctrl-C restores the default handler's behaviour (KeyboardInterrupt) for the impatient.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
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
# The run


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


def _device_batches(loader: TokenLoader, device: torch.device) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    pin = device.type == "cuda"

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = loader.next_batch()
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)

    return next_batch


def check_run_dir(run_dir: Path, resuming: bool) -> None:
    """A new run needs an empty (or absent) directory, so one run never overwrites another."""
    if resuming:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise GptforgeError(f"--out {run_dir} is a file: choose a directory for the run")
    if run_dir.is_dir() and any(run_dir.iterdir()):
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


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: Checkpoint | None = None,
    log: Callable[[str], None] = print,
    preset: str | None = None,
    init_from: str | Path | None = None,
) -> TrainResult:
    """Train per ``cfg``, writing metrics and checkpoints under ``run_dir``.

    With ``resume``, the weights, optimizer, data cursor and RNG state continue from that
    checkpoint, so the run goes on exactly as if it had never stopped. With ``init_from`` (a
    local Hugging Face GPT-2 directory or a gptforge run/checkpoint), a new run starts from those
    weights, for fine-tuning: the model's shape comes from there, dropout from ``cfg``.
    """
    t_start = time.time()
    run_dir = Path(run_dir)
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
    check_run_dir(run_dir, resuming=resume is not None)
    if tc.tensorboard:
        require_tensorboard()
    train_tokens = load_split(cfg.data.path, "train")
    val_tokens = load_split(cfg.data.path, "val") if meta["val_tokens"] > 0 else None

    # 2. processes, device and precision
    if tc.keep_freed_memory:
        keep_freed_memory()
    env = init_distributed(tc.device, tc.dist_timeout_s)
    try:
        return _train(cfg, run_dir, resume, log, env, meta, train_tokens, val_tokens, t_start,
                      preset, init_from, init_weights)
    finally:
        shutdown(env)


def _train(
    cfg: RunConfig, run_dir: Path, resume: Checkpoint | None, log: Callable[[str], None],
    env: DistEnv, meta: dict[str, Any], train_tokens: np.ndarray, val_tokens: np.ndarray | None,
    t_start: float, preset: str | None, init_from: str | Path | None,
    init_weights: dict[str, torch.Tensor] | None,
) -> TrainResult:
    tc, oc = cfg.train, cfg.optim
    if not env.is_main:
        log = _silent
    device = env.device
    accum = grad_accum_steps(tc, env.world_size)
    loader = TokenLoader(train_tokens, tc.batch_size, tc.seq_len, mode=cfg.data.loader,
                         seed=tc.seed, rank=env.rank, world_size=env.world_size)
    amp_dtype = pick_autocast_dtype(device, tc.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for what autocast leaves in fp32
        torch.backends.cudnn.allow_tf32 = True

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
    wrapped = wrap_model(model, env, tc.parallel)
    # Training steps run through the compiled module; evaluation, checkpoints and the optimizer
    # use the uncompiled one, which shares its parameters (so no "_orig_mod." names are saved).
    step_model = torch.compile(wrapped) if tc.compile else wrapped
    optimizer = build_optimizer(model, oc, device.type)

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
        if step >= tc.max_steps:
            raise GptforgeError(
                f"the run in {resume.path} is already at step {step} = train.max_steps: "
                f"resume with --set train.max_steps=N for N > {step} to train further"
            )

    barrier(env)  # every rank has checked the run directory before rank 0 writes into it
    metrics = record = tboard = None
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            remove_incomplete(run_dir)
            truncate_metrics(run_dir / "metrics.jsonl", step)
        (run_dir / "config.toml").write_text(format_config(cfg), encoding="utf-8")
        metrics = MetricsLog(run_dir / "metrics.jsonl")
        info = {"command": ["gptforge", *sys.argv[1:]]}
        if preset is not None:
            info["preset"] = preset
        if init_from is not None:
            info["init_from"] = str(init_from)
        record = RunRecord(run_dir, **info, max_steps=tc.max_steps, world_size=env.world_size)
        if tc.tensorboard:
            tboard = TensorBoardLog(run_dir)
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
    if resume is not None:
        log(f"resuming from {resume.path} at step {step}")
    if init_from is not None:
        log(f"starting from the weights of {init_from}")

    def trainer_state(last_loss: float) -> dict[str, Any]:
        rngs = gather_objects(rng_state(device), env)
        return {
            "step": step, "tokens": tokens_seen, "loader": loader.state_dict(),
            "rng": rngs[0], "rng_ranks": rngs, "world_size": env.world_size,
            "best_val_loss": best_val, "last_loss": last_loss, "wall_s": time.time() - t_start,
        }

    def save(last_loss: float, val_loss: float | None) -> Path:
        """Collective: every rank gathers, rank 0 writes, all wait for it."""
        nonlocal best_val
        is_best = val_loss is not None and (best_val is None or val_loss < best_val)
        if is_best:
            best_val = val_loss
        model_sd = full_model_state(wrapped, env, tc.parallel)
        optim_sd = full_optimizer_state(wrapped, optimizer, env, tc.parallel)
        trainer = trainer_state(last_loss)
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
        return evaluate_loss(eval_model, val_tokens, tc.batch_size, tc.seq_len, device, amp,
                             tc.eval_max_batches, shard=eval_shard,
                             reduce_sum=lambda t: sum_over_ranks(t, env) if tc.parallel == "ddp" else t)

    def write_metrics(**fields: Any) -> None:
        if metrics is not None:
            metrics.write(**fields)
        if tboard is not None:
            tboard.write(**fields)
        if record is not None:
            record.update(step=step, tokens=tokens_seen, last_loss=last_loss,
                          best_val_loss=best_val, tok_per_s=fields.get("tok_per_s"))

    # 4. the loop
    next_batch = _device_batches(loader, device)
    wrapped.train()
    last_loss, val_loss, ckpt_path = float("nan"), None, None
    stopped_by = "max_steps"
    saved_step = first_step = step  # a resumed run's starting point is already on disk
    progress = Progress(tc.max_steps, step, enabled=env.is_main, target_loss=tc.target_loss)
    log = progress.wrap(log)
    try:
        with StopFlag() as stop:
            while step < tc.max_steps:
                lr = lr_at(step, oc)
                set_lr(optimizer, lr)
                t0 = time.perf_counter()
                result = train_step(
                    step_model, optimizer, next_batch, accum, oc.grad_clip, amp, scaler, step,
                    grad_sync=lambda last: grad_sync(wrapped, env, tc.parallel, last),
                    reduce_mean=lambda t: mean_over_ranks(t, env))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                last_loss = result.loss
                done_step = step
                step += 1
                tokens_seen += tc.total_batch_tokens
                progress.update(result.loss, tc.total_batch_tokens / dt)
                if tc.compile and step == first_step + 1:
                    log(f"torch.compile: the first step took {dt:.1f}s, compilation included")

                val_loss = None
                if tc.eval_interval and step % tc.eval_interval == 0:
                    val_loss = validate()
                reached_target = tc.target_loss > 0 and result.loss < tc.target_loss
                reached_val = (tc.target_val_loss > 0 and val_loss is not None
                               and val_loss < tc.target_val_loss)
                stopping = any_rank(bool(stop), env)  # a signal may reach one rank first
                last = step >= tc.max_steps or reached_target or reached_val or stopping
                if done_step % tc.log_interval == 0 or last or val_loss is not None:
                    tok_per_s = tc.total_batch_tokens / dt
                    if done_step % tc.log_interval == 0 or last:
                        log(format_step(done_step, result.loss, lr, result.norm, dt * 1000, tok_per_s))
                    if val_loss is not None:
                        log(f"step {done_step:5d} | val loss: {val_loss:.6f}")
                    fields = dict(step=done_step, loss=result.loss, lr=lr, norm=result.norm,
                                  dt_ms=dt * 1000, tok_per_s=tok_per_s, tokens=tokens_seen)
                    if val_loss is not None:
                        fields["val_loss"] = val_loss
                    write_metrics(**fields)
                if tc.save_interval and step % tc.save_interval == 0 and not last:
                    ckpt_path = save(result.loss, val_loss)
                    saved_step = step
                if reached_target:
                    stopped_by = "target_loss"
                    log(f"training loss {result.loss:.6f} is below train.target_loss="
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
            if step != saved_step and step > 0:
                ckpt_path = save(last_loss, val_loss)
    except BaseException as e:
        if record is not None:
            record.update(status="crashed", error=str(e) or type(e).__name__, step=step,
                          tokens=tokens_seen)
        raise
    finally:
        progress.close()
        for sink in (metrics, tboard):
            if sink is not None:
                sink.close()
    if record is not None:
        record.update(status="finished" if stopped_by in ("max_steps", "target_loss", "target_val_loss")
                      else "stopped",
                      stopped_by=stopped_by, step=step, tokens=tokens_seen, last_loss=last_loss,
                      best_val_loss=best_val, val_loss=val_loss,
                      checkpoint=str(ckpt_path) if ckpt_path else None)

    wall = time.time() - t_start
    return TrainResult(run_dir, step, tokens_seen, last_loss, val_loss, best_val, ckpt_path,
                       stopped_by, wall)
