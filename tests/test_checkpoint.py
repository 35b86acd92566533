"""Checkpoints that never lose work: exact resume, crash safety, safe loading, bad input."""

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import (
    as_from_a_terminal,
    ended_with_the_test,
    quiet,
    run_cli,
    shakespeare_head,
    tiny_cfg,
    wait_for,
)

from gptforge import checkpoint
from gptforge.checkpoint import (
    CheckpointError,
    build_model,
    find_checkpoint,
    load_checkpoint,
    read_optimizer_state,
)
from gptforge.data import prepare
from gptforge.metrics import read_metrics, read_run_record
from gptforge.model import GPT
from gptforge.rundir import DiskWriteError
from gptforge.train import TrainingDiverged, train

SRC = Path(__file__).resolve().parents[1] / "src"




def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_checkpoint(run) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def tree_digest(path: Path) -> str:
    """Every file under path, but the run lock (it names whoever took it last)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != ".lock":
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


TRAIN_ARGS = ["--preset", "gpt2-tiny", "--set", "train.device=cpu", "--set", "train.dtype=float32",
              "--set", "train.log_interval=1", "--set", "train.total_batch_tokens=512"]


def test_cli_resume_is_bit_identical(char_data, tmp_path):
    assert run_cli("train", "--data", str(char_data), "--out", str(tmp_path / "full"), *TRAIN_ARGS,
                   "--set", "train.max_steps=10") == 0
    assert run_cli("train", "--data", str(char_data), "--out", str(tmp_path / "half"), *TRAIN_ARGS,
                   "--set", "train.max_steps=5") == 0
    assert run_cli("train", "--out", str(tmp_path / "half"), "--resume",
                   "--set", "train.max_steps=10") == 0
    full = [(r["step"], r["loss"], r["norm"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    half = [(r["step"], r["loss"], r["norm"]) for r in read_metrics(tmp_path / "half" / "metrics.jsonl") if "loss" in r]
    assert full == half and len(full) == 10
    assert_same_weights(tmp_path / "full", tmp_path / "half")
    state = json.loads((find_checkpoint(tmp_path / "half") / "trainer_state.json").read_text())
    assert state["trainer"]["step"] == 10 and state["trainer"]["tokens"] == 10 * 512
    assert {"python", "numpy", "torch"} <= set(state["trainer"]["rng"])
    assert state["trainer"]["loader"]["cursor"] == 10 * 2 * 8
    cfg = json.loads((find_checkpoint(tmp_path / "half") / "config.json").read_text())
    assert cfg["config"]["train"]["max_steps"] == 10 and "gptforge_version" in cfg


def spawn(char_data: Path, run: Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-m", "gptforge", "train", "--out", str(run)]
    if resume:
        args += ["--resume", *extra]
    else:
        args += ["--data", str(char_data), *TRAIN_ARGS, *extra]
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=as_from_a_terminal)


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_sigkill_mid_step_and_mid_save_then_resume_matches(char_data, tmp_path):
    steps = ["--set", "train.max_steps=30", "--set", "train.save_interval=1", "--set", "train.keep_last=2"]
    # the uninterrupted run, and the last resume, in this process; the killed ones in their own
    assert run_cli("train", "--out", str(tmp_path / "ref"), "--data", str(char_data), *TRAIN_ARGS, *steps) == 0

    run = tmp_path / "killed"
    # 1. killed at an arbitrary moment of training
    proc = spawn(char_data, run, *steps)
    wait_for(lambda: logged_steps(run) >= 8, "8 logged steps", poll=0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # 2. resumed, then killed while a checkpoint is being written
    proc = spawn(char_data, run, "--set", "train.max_steps=30", resume=True)
    ckpts = run / "checkpoints"
    caught = False
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if any(ckpts.glob(".tmp-step_*")) and logged_steps(run) > 12:
            proc.send_signal(signal.SIGKILL)
            caught = True
            break
    proc.wait(timeout=30)
    assert caught, "the run ended before a save could be interrupted"
    assert any(ckpts.glob(".tmp-step_*"))  # the half-written save is still there ...
    with pytest.warns(UserWarning, match="ignoring incomplete checkpoint"):
        latest = load_checkpoint(run)  # ... and ignored: the latest complete one loads
    assert latest.step >= 12
    # 3. resumed to the end: the same weights and losses as the uninterrupted run
    with pytest.warns(UserWarning, match="ignoring incomplete checkpoint"):
        assert run_cli("train", "--out", str(run), "--resume", "--set", "train.max_steps=30") == 0
    assert not any(ckpts.glob(".tmp-*"))
    assert_same_weights(tmp_path / "ref", run)
    ref_losses = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    run_losses = [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert ref_losses == run_losses
    assert len([p for p in ckpts.iterdir() if p.name.startswith("step_")]) == 2  # keep_last


def test_sigterm_finishes_the_step_and_saves(char_data, tmp_path):
    with ended_with_the_test(spawn(char_data, tmp_path / "run", "--set", "train.max_steps=100000")) as proc:
        wait_for(lambda: logged_steps(tmp_path / "run") >= 3, "3 logged steps")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err  # saved and stopped, not complete
    assert "SIGTERM received" in out
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-1]
    assert load_checkpoint(tmp_path / "run").step == last["step"] + 1
    record = read_run_record(tmp_path / "run")
    assert (record["status"], record["stopped_by"]) == ("stopped", "SIGTERM")


def poison_training_loss(monkeypatch, bad_call, poison) -> dict:
    """From the training forward passes that ``bad_call(n)`` picks (n counts them from 1), the loss
    goes through ``poison(loss)``. Returns the counter."""
    calls = {"n": 0}
    forward = GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if targets is not None and self.training:
            calls["n"] += 1
            if bad_call(calls["n"]):
                loss = poison(loss)
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    return calls


def nan_loss(loss):
    return loss * float("nan")


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(char_data, tmp_path, monkeypatch, capsys):
    calls = poison_training_loss(monkeypatch, lambda n: n > 2 * 5, nan_loss)  # 2 micro-steps a step
    cfg = tiny_cfg(char_data, "train.max_steps=20", "train.save_interval=2", "train.total_batch_tokens=512")
    with pytest.raises(TrainingDiverged, match="loss became nan at step 5"):
        train(cfg, tmp_path / "run", log=quiet)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 4
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values())
    # Through the CLI: one line, exit code 2.
    calls["n"] = 0
    code = run_cli("train", "--data", str(char_data), "--out", str(tmp_path / "cli"), *TRAIN_ARGS,
                   "--set", "train.max_steps=20")
    err = capsys.readouterr().err
    assert code == 2 and "at step 5" in err and err.count("\n") == 1


def test_a_nan_gradient_norm_stops_the_run(char_data, tmp_path, monkeypatch):
    """The loss stays finite; only its gradient turns NaN (a bad backward, an overflow)."""
    def nan_gradient(loss):
        loss.register_hook(lambda g: g * float("nan"))
        return loss

    poison_training_loss(monkeypatch, lambda n: n > 2 * 5, nan_gradient)  # steps 0-4 are fine
    cfg = tiny_cfg(char_data, "train.max_steps=20", "train.save_interval=2", "train.total_batch_tokens=512",
                   "train.log_interval=1")
    with pytest.raises(TrainingDiverged, match="gradient norm became nan at step 5"):
        train(cfg, tmp_path / "run", log=quiet)
    assert load_checkpoint(tmp_path / "run").step == 4
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values())
    logged = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(logged) == 5 and all(isinstance(x, float) for x in logged)


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_is_refused_without_running(char_data, tmp_path):
    train(tiny_cfg(char_data, "train.max_steps=2"), tmp_path / "run", log=quiet)
    ckpt = find_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"
    for name in ["model.safetensors", "optimizer.safetensors"]:
        evil = tmp_path / f"evil-{name}"
        shutil.copytree(ckpt, evil)
        with open(evil / name, "wb") as f:
            pickle.dump(Payload(marker), f)
        torch.save({"x": Payload(marker)}, evil / "extra.pt")  # never looked at either
        with pytest.raises(CheckpointError, match="manifest says"):
            load_checkpoint(evil)  # the manifest no longer matches ...
        # ... and an attacker who rewrites the manifest too gets no further: safetensors refuses it.
        manifest = json.loads((evil / "manifest.json").read_text())
        manifest["files"][name] = {"bytes": (evil / name).stat().st_size,
                                   "sha256": hashlib.sha256((evil / name).read_bytes()).hexdigest()}
        (evil / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            c = load_checkpoint(evil, verify="sha256")
            build_model(c)  # reads model.safetensors
            read_optimizer_state(c)  # reads optimizer.safetensors
    assert not marker.exists()


@pytest.fixture(scope="module", params=["char", "gpt2", "bpe"])
def any_data(request, char_data, tmp_path_factory) -> Path:
    """The same text under each kind of vocabulary: char, GPT-2's BPE, and a trained BPE (whose
    checkpoints carry a file of their own, tokenizer.json)."""
    if request.param == "char":
        return char_data
    d = tmp_path_factory.mktemp(f"{request.param}-data")
    (d / "in.txt").write_text(shakespeare_head(20_000), encoding="utf-8")
    extra = {"vocab_size": 300} if request.param == "bpe" else {}
    prepare([str(d / "in.txt")], d / "data", tokenizer=request.param, progress=False, **extra)
    return d / "data"


def short_run(data: Path, *extra: str):
    return tiny_cfg(data, "train.seq_len=16", "train.total_batch_tokens=128",
                    "train.log_interval=100", *extra)


def test_keep_last_latest_and_best(any_data, tmp_path):
    cfg = short_run(any_data, "train.max_steps=12", "train.save_interval=2",
                    "train.eval_interval=2", "train.keep_last=3")
    result = train(cfg, tmp_path / "run", log=quiet)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_0000008", "step_0000010", "step_0000012"]
    assert (root / "latest").read_text() == "step_0000012\n"  # a step directory, nothing else
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    best = load_checkpoint(root / "best")
    assert best.trainer["best_val_loss"] == min(vals) == result.best_val_loss
    assert sorted(p.name for p in (root / "best").iterdir()) == sorted(
        p.name for p in (root / "step_0000012").iterdir())  # whole, tokenizer file included


def test_a_short_disk_never_deletes_what_latest_names(any_data, tmp_path, monkeypatch):
    """keep_last=1 on a disk too full for the next save: making room deletes every older
    checkpoint but the one ``latest`` names, which must be the last save, so that the run can
    still be resumed from it."""
    saves = {"n": 0}

    def full_after_the_first_save(path):
        saves["n"] += 1  # call 1: the start's warn_if_disk_is_short; call 2: the first save
        return 10**12 if saves["n"] <= 2 else 0

    monkeypatch.setattr(checkpoint, "disk_free", full_after_the_first_save)
    cfg = short_run(any_data, "train.max_steps=4", "train.save_interval=2", "train.keep_last=1")
    with pytest.raises(DiskWriteError, match="not enough space for the checkpoint"):
        train(cfg, tmp_path / "run", log=quiet)
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step_0000002\n"
    assert load_checkpoint(tmp_path / "run").step == 2


def test_a_latest_that_names_no_checkpoint_is_said(char_data, tmp_path):
    train(short_run(char_data, "train.max_steps=4", "train.save_interval=2"), tmp_path / "run",
          log=quiet)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    for wrong in ("tokenizer.json\n", "step_0000009\n"):  # a file; a step never saved
        latest.write_text(wrong)
        with pytest.warns(UserWarning, match=f"names no complete checkpoint .*{wrong.strip()}.*"
                                             "using the newest complete one, step_0000004"):
            assert find_checkpoint(tmp_path / "run").name == "step_0000004"


def test_bad_checkpoints_and_resumes_are_one_line_exit_2(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", "--data", str(char_data), "--out", str(run), *TRAIN_ARGS,
                   "--set", "train.max_steps=3") == 0
    capsys.readouterr()
    before = tree_digest(run)

    def fails(*args: str, match: str) -> None:
        assert run_cli(*args) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err

    # nothing to resume / missing directory
    fails("train", "--out", str(tmp_path / "nothing"), "--resume", match="does not exist")
    (tmp_path / "empty").mkdir()
    fails("train", "--out", str(tmp_path / "empty"), "--resume", match="no complete checkpoint")
    # a different model shape than the checkpoint
    fails("train", "--out", str(run), "--resume", "--set", "model.n_embd=64",
          "--set", "train.max_steps=6", match="does not fit this model")
    # data with another tokenizer
    other = tmp_path / "gpt2data"
    (tmp_path / "t.txt").write_text(shakespeare_head(5000), encoding="utf-8")
    prepare([str(tmp_path / "t.txt")], str(other), progress=False)
    fails("train", "--out", str(run), "--resume", "--data", str(other),
          "--set", "train.max_steps=6", match="was trained with the char tokenizer")
    # already finished
    fails("train", "--out", str(run), "--resume", match="reached train.max_steps=3 (step 3)")
    assert tree_digest(run) == before  # nothing was overwritten by any of the above

    # truncated weights, and corrupt JSON
    ckpt = find_checkpoint(run)
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    data_bytes = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data_bytes[: len(data_bytes) // 2])
    fails("sample", "--ckpt", str(broken), match="bytes but its manifest says")
    shutil.copytree(ckpt, tmp_path / "badjson")
    (tmp_path / "badjson" / "manifest.json").unlink()  # as a format-1 checkpoint, to reach the parser
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    fails("sample", "--ckpt", str(tmp_path / "badjson"), match="config.json is corrupt")
    (tmp_path / "badjson" / "config.json").write_text('{"format_version": 99, "config": {}, "tokenizer": {}}')
    fails("sample", "--ckpt", str(tmp_path / "badjson"), match="upgrade gptforge")
    # resuming a truncated checkpoint leaves the run untouched
    shutil.copy(broken / "model.safetensors", ckpt / "model.safetensors")
    mid = tree_digest(run)
    fails("train", "--out", str(run), "--resume", "--set", "train.max_steps=6", match="it is truncated")
    assert tree_digest(run) == mid
