"""Checkpoints that describe themselves, prove their integrity and never execute code on load.

Layout of one checkpoint, ``RUN/checkpoints/step_0001000/``:
    model.safetensors      weights of the unwrapped model, the tied wte/lm_head matrix stored once
    optimizer.safetensors  optimizer state tensors (AdamW moments, Muon momentum), keyed
                           ``state.<param index>.<name>``
    config.json            the resolved run config, tokenizer, gptforge version, git commit
    tokenizer.json         a trained BPE's vocabulary, the very bytes the data's was (its sha256
                           is in config.json's tokenizer record): a run needs no data directory
                           to sample, evaluate, export or be reused by ``prepare --tokenizer RUN``
    trainer_state.json     step, tokens seen, loader cursor, every RNG state, best val loss, why
                           the run stopped, and the optimizer's hyper-parameters
    manifest.json          the size and sha256 of each file above; written last

No pickle anywhere: tensors go through safetensors, everything else is JSON, so a crafted file
cannot run code when loaded. A checkpoint is written into a hidden temporary directory, flushed,
and renamed into place; ``RUN/checkpoints/latest`` is updated only after that (it is the one
"this save is complete" marker: a name under ``step_*`` exists only once its directory is whole).
Loading checks every file's size against the manifest, and with ``verify="sha256"`` (resume,
export) its checksum too, so bit rot or a bad copy is caught before anyone trains on it.
Before a save, the free space is checked against the checkpoint's size, pruning first what
``keep_last`` would delete anyway; a write that fails (disk full, I/O error) leaves the previous
checkpoints as they were and says so in one line.

``load_pretrained`` and ``load_model`` also read a Hugging Face GPT-2 directory (via hf.py),
so sampling, evaluation and ``train --init-from`` take either kind of path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge.atomic import file_sha256, replacing, write_text
from gptforge.config import ConfigError, GPTConfig, RunConfig
from gptforge.errors import GptforgeError
from gptforge.hf import HFFormatError, is_hf_dir
from gptforge.hf import load_pretrained as load_hf_pretrained
from gptforge.model import GPT
from gptforge.rundir import (
    CHECKPOINT_DIR,
    LATEST,
    DiskWriteError,
    disk_free,
    format_bytes,
    free_space_then_continue,
    guarded_write,
    write_failure,
)
from gptforge.tokenizer import BPE_FILE, tokenizer_from_dict
from gptforge.version import __version__

FORMAT_VERSION = 2  # 2 adds manifest.json; format-1 checkpoints (no manifest) still load
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"  # written last: every other file's size and sha256
VERIFY = ("sizes", "sha256")
SPACE_SLACK_BYTES = 1 << 20  # JSON files, safetensors headers, filesystem blocks
TIED_KEY = "lm_head.weight"  # same storage as transformer.wte.weight: saved once, under wte


class CheckpointError(GptforgeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run."""


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def config(self) -> RunConfig:
        try:
            return RunConfig.from_dict(self.meta["config"], origin=str(self.path / CONFIG_FILE))
        except ConfigError as e:
            raise CheckpointError(f"checkpoint {self.path} has an unusable config: {e}") from None

    @property
    def step(self) -> int:
        return int(self.meta["trainer"]["step"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.meta["tokenizer"]

    @property
    def trainer(self) -> dict[str, Any]:
        return self.meta["trainer"]


# ----------------------------------------------------------------------------------------------
# Saving


def clean_model_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights as saved: CPU, contiguous, the tied matrix once (under wte), and no wrapper
    prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile)."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        if k != TIED_KEY:
            out[k] = v.detach().contiguous().cpu()
    return out


def _optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an index-keyed optimizer state dict into flat tensors (safetensors) and plain JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the gptforge source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def space_needed(tensor_total: int) -> int:
    """Free bytes a save asks for, given the bytes of its tensors."""
    return tensor_total + SPACE_SLACK_BYTES


def _resume_hint(run_dir: Path) -> str:
    return free_space_then_continue(run_dir, " (or lower train.keep_last)")


def save_checkpoint(
    run_dir: str | Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    config: RunConfig,
    tokenizer: dict[str, Any],
    trainer: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write ``RUN/checkpoints/step_XXXXXXX`` atomically, point ``latest`` at it, prune old ones.

    ``model_state`` and ``optimizer_state`` are full (unsharded) state dicts, the optimizer's
    keyed by parameter index as ``optimizer.state_dict()`` gives them on one device. Raises
    DiskWriteError, with the previous checkpoints intact, when the disk cannot take it.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINT_DIR
    name = f"step_{int(trainer['step']):07d}"
    final = root / name
    fix = _resume_hint(run_dir)
    model_sd = clean_model_state(model_state)
    optim_tensors, optim_rest = ({}, None) if optimizer_state is None else _optimizer_tensors(optimizer_state)
    with guarded_write("checkpoint", final, fix):
        root.mkdir(parents=True, exist_ok=True)
        _make_room(root, space_needed(tensor_bytes(model_sd) + tensor_bytes(optim_tensors)),
                   keep_last, name, fix)
    try:
        # Durable: a resumed run starts from what this directory holds after a crash or power loss.
        with replacing(final, durable=True, directory=True, tmp=root / f".tmp-{name}-{os.getpid()}",
                       old=root / f".tmp-del-{name}-{os.getpid()}") as tmp:
            save_file(model_sd, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(_json_text({
                "format_version": FORMAT_VERSION,
                "gptforge_version": __version__,
                "git_commit": git_commit(),
                "torch_version": torch.__version__,
                "config": config.to_dict(),
                "tokenizer": tokenizer,
            }), encoding="utf-8")
            for file_name, data in _tokenizer_files(tokenizer).items():
                (tmp / file_name).write_bytes(data)
            if optimizer_state is not None:
                save_file(optim_tensors, str(tmp / OPTIMIZER_FILE))
            (tmp / STATE_FILE).write_text(_json_text(
                {"format_version": FORMAT_VERSION, "trainer": trainer, "optimizer": optim_rest}),
                encoding="utf-8")
            files = sorted(p.name for p in tmp.iterdir())
            # The manifest last: what each file must be, so a reader can tell it is whole and intact.
            (tmp / MANIFEST_FILE).write_text(_json_text({
                "format_version": FORMAT_VERSION,
                "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)}
                          for f in files},
            }), encoding="utf-8")
        _point_latest(root, name)
    except (OSError, SafetensorError) as e:
        raise DiskWriteError(write_failure("checkpoint", final, e, fix)) from None
    _prune(root, keep_last, protect={name})
    return final


def _tokenizer_files(record: dict[str, Any]) -> dict[str, bytes]:
    """What a checkpoint keeps of its tokenizer beside the record: a trained BPE's file."""
    if record.get("name") != "bpe":
        return {}
    tok = tokenizer_from_dict(record)  # known: the data it trains on was read and checked
    return {BPE_FILE: tok.file_bytes()}  # type: ignore[attr-defined]


def _check_tokenizer(ckpt_dir: Path, record: Any) -> None:
    """A trained BPE's file is there and is the recorded one (so its record alone rebuilds it
    from now on in this process: see tokenizer/bpe.py, known tokenizers)."""
    if not isinstance(record, dict) or record.get("name") != "bpe":
        return
    if not (ckpt_dir / BPE_FILE).is_file():
        raise CheckpointError(f"checkpoint file {ckpt_dir / BPE_FILE} is missing (the run's "
                              f"trained tokenizer): {_earlier(ckpt_dir)}")
    try:
        tokenizer_from_dict(record, directory=ckpt_dir)
    except GptforgeError as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {e}") from None


def _make_room(root: Path, need: int, keep_last: int, name: str, fix: str) -> None:
    """Make sure ``need`` bytes are free for a new checkpoint, or raise before writing anything.

    The checkpoints that ``keep_last`` deletes once this one is saved are deleted first instead,
    oldest first; never the one ``latest`` names, so a kill mid-save still leaves one to resume.
    """
    free = disk_free(root)
    if free >= need:
        return
    others = [d for d in _step_dirs(root) if d.name != name]
    latest = _latest_name(root)
    for old in others[: max(0, len(others) + 1 - keep_last)]:
        if old.name != latest:
            _remove(old)
            free = disk_free(root)  # a directory hard-linked by best/ frees less than its size
            if free >= need:
                return
    raise DiskWriteError(
        f"not enough space for the checkpoint {root / name}: it needs {format_bytes(need)} and "
        f"{format_bytes(free)} are free there; nothing was written: {fix}"
    )


def _point_latest(root: Path, name: str) -> None:
    assert _is_step_name(name), name  # latest names a step directory, never one of its files
    write_text(root / LATEST, name + "\n", durable=True, tmp=root / f".tmp-{LATEST}-{os.getpid()}")


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _is_complete(ckpt_dir: Path) -> bool:
    # A format-1 checkpoint (no manifest) is whole once trainer_state.json is there.
    return (ckpt_dir / MANIFEST_FILE).is_file() or (ckpt_dir / STATE_FILE).is_file()


def _is_step_name(name: str) -> bool:
    return name.startswith("step_") and name[5:].isdigit()


def _step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _is_step_name(p.name) and _is_complete(p)]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def _prune(root: Path, keep_last: int, protect: set[str]) -> None:
    dirs = _step_dirs(root)
    for old in dirs[: max(0, len(dirs) - keep_last)]:
        if old.name not in protect:
            _remove(old)


def _remove(ckpt_dir: Path) -> None:
    """Delete a checkpoint: first renamed out of ``step_*`` (a kill half-way through the delete
    then leaves a ``.tmp-`` directory, which is never taken for a checkpoint and is cleaned up)."""
    doomed = ckpt_dir.parent / f".tmp-del-{ckpt_dir.name}-{os.getpid()}"
    try:
        os.replace(ckpt_dir, doomed)
    except OSError:
        doomed = ckpt_dir
    shutil.rmtree(doomed, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    """Checkpoint files are never changed in place (a save writes new ones and renames), so a
    hard link is as good as a copy and takes no space."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_best(run_dir: str | Path, step_dir: Path) -> Path:
    """Make ``RUN/checkpoints/best`` (atomically) the checkpoint with the best val loss so far."""
    root = Path(run_dir) / CHECKPOINT_DIR
    best = root / "best"
    with guarded_write("best checkpoint", best, _resume_hint(Path(run_dir))):
        with replacing(best, durable=True, directory=False, tmp=root / f".tmp-best-{os.getpid()}",
                       old=root / f".old-best-{os.getpid()}") as tmp:
            shutil.copytree(step_dir, tmp, copy_function=_link_or_copy)
    return best


def warn_if_disk_is_short(run_dir: Path, model: GPT, optimizer_bytes: int) -> None:
    """A save needs room for a whole new checkpoint while the last one is still there."""
    size = space_needed(tensor_bytes({k: v for k, v in model.state_dict().items() if k != TIED_KEY})
                        + optimizer_bytes)
    free = disk_free(run_dir)
    if free < 2 * size:
        warnings.warn(
            f"{run_dir} has {format_bytes(free)} free, less than two checkpoints of this run "
            f"({format_bytes(2 * size)}): a save may run out of space; free some, or choose an "
            "--out on a larger disk"
        )


# ----------------------------------------------------------------------------------------------
# Finding and loading


def remove_incomplete(run_dir: str | Path) -> None:
    """Delete temporary directories left by saves that were killed half-way."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path, or the latest complete one of a run."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: pass a run directory or a checkpoint directory")
    if _is_complete(p):
        return p
    root = p / CHECKPOINT_DIR if (p / CHECKPOINT_DIR).is_dir() else p
    for stale in sorted(root.glob(".tmp-*")) if root.is_dir() else []:
        warnings.warn(f"ignoring incomplete checkpoint {stale} (a save was interrupted)")
    latest = _latest_name(root)
    if latest and _is_step_name(latest) and _is_complete(root / latest):
        return root / latest
    dirs = _step_dirs(root)
    if dirs:
        if (root / LATEST).exists():  # a run that never saved has no latest: nothing to say
            warnings.warn(f"{root / LATEST} names no complete checkpoint ({latest!r}): using the "
                          f"newest complete one, {dirs[-1].name}")
        return dirs[-1]
    raise CheckpointError(
        f"no complete checkpoint in {p}: train first (gptforge train ... --out {p}) "
        "or pass a checkpoint directory"
    )


def _read_json(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing: use an earlier checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt ({e}): use an earlier checkpoint"
        ) from None
    if not isinstance(obj, dict) or any(k not in obj for k in required):
        raise CheckpointError(
            f"checkpoint file {path} is corrupt (it lacks {', '.join(required)}): "
            "use an earlier checkpoint"
        )
    return obj


def _earlier(ckpt_dir: Path) -> str:
    """The fix for a damaged checkpoint: an earlier one of the same run, named if there is one."""
    older = [d for d in _step_dirs(ckpt_dir.parent)  # names are zero-padded: they sort by step
             if d.name != ckpt_dir.name and (ckpt_dir.name == "best" or d.name < ckpt_dir.name)]
    return f"use an earlier checkpoint ({older[-1]})" if older else "use an earlier checkpoint"


def verify_files(ckpt_dir: Path, checksums: bool) -> bool:
    """Every file the manifest lists is there with its size (and, with ``checksums``, its
    sha256). Returns False where there is no manifest (format 1 had none)."""
    path = ckpt_dir / MANIFEST_FILE
    if not path.is_file():
        return False
    files = _read_json(path, ("files",))["files"]
    for name, entry in sorted(files.items()):
        f = ckpt_dir / name
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {f} is missing: {_earlier(ckpt_dir)}") from None
        if size != entry.get("bytes"):
            raise CheckpointError(
                f"checkpoint file {f} is {size} bytes but its manifest says {entry.get('bytes')}: "
                f"it is truncated or was changed; {_earlier(ckpt_dir)}"
            )
        if checksums and file_sha256(f) != entry.get("sha256"):
            raise CheckpointError(
                f"checkpoint file {f} is corrupt: its sha256 differs from the one in "
                f"{MANIFEST_FILE} (bit rot or a bad copy); {_earlier(ckpt_dir)}"
            )
    return True


def load_checkpoint(path: str | Path, verify: str = "sizes") -> Checkpoint:
    """Read the JSON parts of a checkpoint (or of a run's latest one); tensors load lazily.

    Every file's size is checked against the manifest; ``verify="sha256"`` also checks every
    checksum (it reads the whole checkpoint: done before resuming and exporting).
    """
    assert verify in VERIFY, verify
    ckpt_dir = find_checkpoint(path)
    # Files first: a damaged file is named as such, before its contents are parsed.
    has_manifest = verify_files(ckpt_dir, checksums=verify == "sha256")
    meta = _read_json(ckpt_dir / CONFIG_FILE, ("format_version", "config", "tokenizer"))
    state = _read_json(ckpt_dir / STATE_FILE, ("trainer", "optimizer"))
    meta.update(trainer=state["trainer"], optimizer=state["optimizer"])
    if not isinstance(meta["trainer"], dict) or "step" not in meta["trainer"]:
        raise CheckpointError(
            f"checkpoint file {ckpt_dir / STATE_FILE} is corrupt (no step): use an earlier checkpoint"
        )
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has format {meta['format_version']} (written by gptforge "
            f"{meta.get('gptforge_version', '?')}), newer than this gptforge {__version__} reads "
            f"({FORMAT_VERSION}): upgrade gptforge (pip install --upgrade gptforge)"
        )
    if not has_manifest and meta["format_version"] >= 2:
        raise CheckpointError(
            f"checkpoint file {ckpt_dir / MANIFEST_FILE} is missing: {_earlier(ckpt_dir)}"
        )
    _check_tokenizer(ckpt_dir, meta["tokenizer"])
    return Checkpoint(ckpt_dir, meta)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing: use an earlier checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or truncated ({e}): use an earlier checkpoint"
        ) from None


def load_weights(model: GPT, ckpt: Checkpoint) -> None:
    """Load weights strictly: every key present with the right shape, the tied one restored."""
    sd = _load_tensors(ckpt.path / MODEL_FILE)
    expected = model.state_dict()
    missing = [k for k in expected if k != TIED_KEY and k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        what = (f"missing {missing[:3]}" if missing else
                f"unexpected {unexpected[:3]}" if unexpected else
                f"shape of {wrong[0]} is {tuple(sd[wrong[0]].shape)}, "
                f"the model wants {tuple(expected[wrong[0]].shape)}")
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit this model ({what}): "
            "use the model config the checkpoint was trained with"
        )
    model.load_state_dict(sd, strict=False)  # strict except the tied key, checked above


def read_optimizer_state(ckpt: Checkpoint) -> dict[str, Any]:
    """The optimizer state a checkpoint holds, as an index-keyed ``optimizer.state_dict()``."""
    if ckpt.meta.get("optimizer") is None:
        raise CheckpointError(f"checkpoint {ckpt.path} has no optimizer state: it cannot be resumed")
    tensors = _load_tensors(ckpt.path / OPTIMIZER_FILE)
    rest = ckpt.meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, scalars in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    return {"state": state, "param_groups": rest["param_groups"]}


def build_model(ckpt: Checkpoint) -> GPT:
    """The model a checkpoint holds, with its weights, in eval mode on the CPU."""
    model = GPT(ckpt.config.model)
    load_weights(model, ckpt)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Loading a model from either a gptforge checkpoint or a Hugging Face GPT-2 directory


def load_pretrained(
    path: str | Path,
) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(model config, state dict without lm_head.weight, tokenizer dict) from a run directory, a
    checkpoint directory or a Hugging Face GPT-2 directory (config.json with a model_type; a
    gptforge checkpoint's config.json has none). Bad input raises CheckpointError."""
    if is_hf_dir(path):
        try:
            return load_hf_pretrained(path)
        except HFFormatError as e:
            raise CheckpointError(str(e)) from None
    ckpt = load_checkpoint(path)
    model = build_model(ckpt)  # checks every key and shape
    sd = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    return model.config, sd, ckpt.tokenizer


def load_model(path: str | Path, verify: str = "sizes") -> tuple[GPT, dict[str, Any]]:
    """The model at ``path`` (either kind, see load_pretrained) in eval mode on the CPU, and its
    tokenizer dict (for ``tokenizer.tokenizer_from_dict``). ``verify`` as in load_checkpoint."""
    if is_hf_dir(path):
        cfg, sd, tokenizer = load_pretrained(path)
        model = GPT(cfg)
        model.load_state_dict(sd, strict=False)  # every key but the tied one, checked in hf.py
        return model.eval(), tokenizer
    ckpt = load_checkpoint(path, verify)
    return build_model(ckpt), ckpt.tokenizer
