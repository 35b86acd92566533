"""Planning a run and resuming it: what a command line does with a run directory, and the state
that makes a resumed run continue exactly.

``plan_run`` decides what ``gptforge train`` does with ``--out``: start a new run, continue one
(``--resume``), or either (``--resume auto``, for jobs that are restarted with the same command
after a preemption), or nothing because the run is already complete. A continuing command line
must describe the run it continues: only ``config.RESUMABLE_KEYS`` may differ.

Exact resume needs, besides weights, optimizer and data cursor (checkpoint.py, data/loader.py),
every random generator where it stood: ``rng_state``/``set_rng_state`` capture and restore
Python's, NumPy's, torch's and CUDA's, per rank.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge.checkpoint import (
    Checkpoint,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_pretrained,
)
from gptforge.config import (
    AUTO,
    RESUMABLE_KEYS,
    ConfigError,
    RunConfig,
    apply_overrides,
    config_differences,
    set_value,
    validate_run,
)
from gptforge.data import load_meta, load_split
from gptforge.data.shards import load_mask
from gptforge.distributed import DistEnv, rank_seed
from gptforge.errors import GptforgeError
from gptforge.memory import out_of_memory
from gptforge.presets import resolve
from gptforge.rundir import (
    CHECKPOINT_DIR,
    LOCK_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    RUN_FILE,
)
from gptforge.tokenizer import CHAT_RECORD_KEY, describe
from gptforge.trackers import TRACKERS, wanted_trackers

# Why a run ends when it is complete; otherwise a signal stopped it (its name), to be resumed.
FINISHED = ("max_steps", "target_loss", "target_val_loss")


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


def restore_rng(state: dict[str, Any], env: DistEnv, seed: int, step: int) -> None:
    """Each rank continues its own random stream when the world size is unchanged; with another
    world size every rank takes rank 0's, and then new ranks get their own dropout seeds."""
    per_rank = state.get("rng_ranks") or [state["rng"]]
    same_world = len(per_rank) == env.world_size
    set_rng_state(per_rank[env.rank] if same_world else per_rank[0], env.device)
    if not same_world and env.distributed:
        torch.manual_seed(rank_seed(seed + step, env.rank))


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
# The run directory


# What a run writes at its top level. A directory holding nothing else but no complete checkpoint
# is a run that was stopped before its first save: --resume auto starts it again.
RUN_FILES = {LOCK_FILE, RUN_FILE, METRICS_FILE, RUN_CONFIG_FILE, CHECKPOINT_DIR,
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


MANY_EPOCHS = 20  # more passes over the training tokens than this, with nothing to stop earlier: warn


def epochs_warning(cfg: RunConfig, train_tokens: int) -> str | None:
    """A run that will read its training data many times over learns it by heart (its
    validation loss rises while the training loss falls): say so before it starts, unless a
    target loss will stop it."""
    tc = cfg.train
    epochs = tc.max_steps * tc.total_batch_tokens / max(train_tokens, 1)
    if epochs <= MANY_EPOCHS or tc.target_loss > 0 or tc.target_val_loss > 0:
        return None
    return (f"train.max_steps={tc.max_steps:,} x {tc.total_batch_tokens:,} tokens per step reads the "
            f"{train_tokens:,} training tokens {epochs:,.0f} times: the model will learn them by heart "
            "(validation loss rising while training loss falls); train fewer steps, give it more "
            "text, or stop on train.target_val_loss (with train.eval_interval)")


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


def _command_line_config(preset: str | None, config_file: str | None, overrides: list[str],
                         data: str | None) -> RunConfig:
    cfg = resolve(preset, config_file, overrides)
    if data:
        cfg.data.path = data
    return cfg


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
    if resume is None:
        return RunPlan(_command_line_config(preset, config_file, overrides, data))
    auto = resume == "auto"
    if auto:
        try:
            find_checkpoint(out)
        except CheckpointError:
            return RunPlan(_command_line_config(preset, config_file, overrides, data),
                           restart=_is_started_run(out))
    ckpt = load_checkpoint(out if resume in ("", "auto") else resume, verify=verify)
    cfg = ckpt.config
    started_batch = cfg.train.batch_size
    if preset or config_file or auto:
        wanted = _command_line_config(preset, config_file, overrides, data)
        if wanted.model.vocab_size == 0:
            resolve_model_vocab(wanted, load_meta(wanted.data.path or cfg.data.path))
        if wanted.model.pad_vocab_multiple == AUTO:  # decided when the run started, on its device
            wanted.model.pad_vocab_multiple = cfg.model.pad_vocab_multiple
        if wanted.train.batch_size == AUTO:  # likewise: the run's config holds what it chose
            wanted.train.batch_size = started_batch
        if wanted.train.dtype == AUTO:  # and the precision it measured or chose
            wanted.train.dtype = cfg.train.dtype
        _check_same_run(ckpt, cfg, wanted, skip_model=init_from is not None)
        for key in RESUMABLE_KEYS:
            section, name = key.split(".")
            set_value(cfg, key, getattr(getattr(wanted, section), name))
    else:
        apply_overrides(cfg, overrides)
        if data:
            cfg.data.path = data
        if cfg.train.batch_size == AUTO:
            cfg.train.batch_size = started_batch
    validate_run(cfg)
    if not auto:
        refuse_complete(ckpt, cfg)
    return RunPlan(cfg, ckpt, complete=run_complete(ckpt, cfg))


# ----------------------------------------------------------------------------------------------
# Starting a run


@dataclass
class Start:
    """What ``train`` checked before any process group exists (so every rank stops on the same
    mistake before any collective): the data, and how the run begins."""

    meta: dict[str, Any]
    train_tokens: np.ndarray
    val_tokens: np.ndarray | None
    resume: Checkpoint | None = None
    init_from: str | Path | None = None
    init_weights: dict[str, torch.Tensor] | None = None
    restart: bool = False
    preset: str | None = None
    init_vocab: int | None = None  # the vocabulary of the weights started from (it may grow)
    train_mask: np.ndarray | None = None  # conversation data: 1 where a token is trained on
    val_mask: np.ndarray | None = None


def grows_for_chat(source: dict[str, Any], data: dict[str, Any]) -> bool:
    """Whether the data's tokenizer is the source model's plus ChatML's two tokens (GPT-2's BPE
    grown for conversations): fine-tuning then grows the embedding (``fit_embedding``)."""
    plain = {k: v for k, v in data.items() if k != CHAT_RECORD_KEY}
    return source.get("name") == "gpt2" and data.get(CHAT_RECORD_KEY) is not None and plain == source


def fit_embedding(weights: dict[str, torch.Tensor], old_vocab: int, vocab: int, rows: int
                  ) -> dict[str, torch.Tensor]:
    """The weights with the embedding (tied to the output layer) resized to ``rows``: the old
    vocabulary's rows kept, the new tokens' rows set to the mean of the old ones (Hewitt 2021,
    "Initializing New Word Embeddings for Pretrained Language Models": a new token then starts
    with an average logit, not a random one that may dominate), padding rows zero (never
    predicted: the model cuts its logits to ``vocab``)."""
    key = "transformer.wte.weight"
    old = weights[key]
    if old.shape[0] == rows:
        return weights
    new = old.new_zeros(rows, old.shape[1])
    new[:old_vocab] = old[:old_vocab]
    new[old_vocab:vocab] = old[:old_vocab].mean(dim=0)
    return {**weights, key: new}


def check_start(cfg: RunConfig, run_dir: Path, resume: Checkpoint | None,
                init_from: str | Path | None, restart: bool, preset: str | None) -> Start:
    """The data, and the model's vocabulary from it; the starting weights; the run directory."""
    meta = load_meta(cfg.data.path)
    if resume is not None and meta["tokenizer"] != resume.tokenizer:
        raise CheckpointError(
            f"checkpoint {resume.path} was trained with the {describe(resume.tokenizer)}, but the "
            f"data in {cfg.data.path} was made with the {describe(meta['tokenizer'])}: resume "
            "with the data the run was started with"
            + (f", or prepare it with --tokenizer {run_dir}"
               if resume.tokenizer.get("name") == "bpe" else "")
        )
    init_weights, init_vocab = None, None
    if init_from is not None:
        if resume is not None:
            raise GptforgeError("--init-from starts a new run and --resume continues one: use one of them")
        source_cfg, init_weights, source_tokenizer = load_pretrained(init_from)
        init_vocab = source_cfg.vocab_size
        if grows_for_chat(source_tokenizer, meta["tokenizer"]):
            source_cfg = dataclasses.replace(source_cfg, vocab_size=int(meta["vocab_size"]))
        elif source_tokenizer != meta["tokenizer"]:
            raise CheckpointError(
                f"{init_from} was trained with the {describe(source_tokenizer)}, other than the "
                f"data's ({describe(meta['tokenizer'])}): prepare the data with the tokenizer of "
                f"the model you start from (--tokenizer {init_from})"
            )
        cfg.model = dataclasses.replace(source_cfg, dropout=cfg.model.dropout)
    resolve_model_vocab(cfg, meta)
    validate_run(cfg)
    if resume is not None:
        refuse_complete(resume, cfg)
    check_run_dir(run_dir, resuming=resume is not None or restart)
    wanted_trackers(cfg)  # a missing package stops the run here, before RUN is written
    train_tokens = load_split(cfg.data.path, "train", cfg.data.verify)
    val_tokens = load_split(cfg.data.path, "val", cfg.data.verify) if meta["val_tokens"] > 0 else None
    train_mask = load_mask(cfg.data.path, "train", cfg.data.verify)
    val_mask = load_mask(cfg.data.path, "val", cfg.data.verify) if val_tokens is not None else None
    return Start(meta, train_tokens, val_tokens, resume, init_from, init_weights, restart, preset,
                 init_vocab, train_mask, val_mask)


def continue_hint(run_dir: str, argv: list[str]) -> str:
    """Where a stopped run stands and the command that continues it."""
    import shlex

    again = ["gptforge", *argv] + ([] if any(a.startswith("--resume") for a in argv) else ["--resume", "auto"])
    command = " ".join(shlex.quote(a) for a in again)
    try:
        ckpt = load_checkpoint(run_dir)
    except CheckpointError:
        return f"it had saved no checkpoint yet; start it again with: {command}"
    return f"its last checkpoint is {ckpt.path} (step {ckpt.step}); continue with: {command}"


def out_of_memory_stop(e: BaseException, cfg: RunConfig, env: DistEnv, run_dir: Path,
                       steps: int | None) -> GptforgeError:
    """Running out of memory as one line (memory.out_of_memory) with where the run stands after
    ``steps`` steps (None: it stopped setting up): its last checkpoint, which the failed step
    never touched, and the command that continues it."""
    when = f"after {steps:,} steps" if steps is not None else "while setting up the run"
    try:
        ckpt = load_checkpoint(run_dir)
    except CheckpointError:
        return out_of_memory(e, env.device, cfg.train, env.world_size, when, "no checkpoint was saved")
    then = f"its last checkpoint, {ckpt.path} (step {ckpt.step}), is intact"
    if not cfg.train.activation_checkpointing:
        then += (f"; continue it with gptforge train --out {run_dir} --resume "
                 "--set train.activation_checkpointing=true")
    return out_of_memory(e, env.device, cfg.train, env.world_size, when, then)


def restart_line(restarts: int, resume: Checkpoint | None, step: int, last_done: int | None,
                 log_interval: int) -> str:
    """What the log says when torchrun restarted the job (``restarts`` times so far): where the run
    continues, and the steps the dead attempt had done past that point, which are done again
    (``last_done``: the last step it logged; between logged steps it may have done more)."""
    where = (f"resuming from {resume.path} at step {step}" if resume is not None
             else "it had saved no checkpoint: starting again at step 0")
    lost = 0 if last_done is None else last_done + 1 - step
    more = "at least " if log_interval > 1 and lost else ""
    return (f"restarted by torchrun after a process of the job died (restart {restarts}): {where}; "
            f"{more}{lost} step{'s' * (lost != 1)} done since {'then' if resume else 'the start'} "
            "were lost and are done again")
