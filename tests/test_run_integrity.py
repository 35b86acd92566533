"""Runs that survive clusters and full disks: one writer per run, --resume auto, the original
command line plus --resume, disk full, checksummed checkpoints, hang-ups and pipes."""

import errno
import fcntl
import json
import os
import pty
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from test_checkpoint import (
    SRC,
    TRAIN_ARGS,
    assert_same_weights,
    logged_steps,
    spawn,
    tree_digest,
)
from test_layers import CLI_SAYING_TORCH
from test_train import as_from_a_terminal, ended_with_the_test, run_cli, wait_for

from gptforge import checkpoint, metrics
from gptforge.checkpoint import (
    MANIFEST_FILE,
    build_model,
    find_checkpoint,
    load_checkpoint,
)
from gptforge.metrics import read_metrics, read_run_record

SAVING = ("--set", "train.max_steps=12", "--set", "train.save_interval=2")  # as the reference run


def train_cmd(char_data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(char_data), "--out", str(run), *TRAIN_ARGS, *extra]


def gptforge_proc(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-c", CLI_SAYING_TORCH, *args], capture_output=True,
                          text=True, env=env, timeout=120)


def fails_in_one_line(capsys, *args: str) -> str:
    """Run the CLI, expecting the one-line error of exit code 2; returns that line."""
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["norm"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory) -> Path:
    """12 uninterrupted steps, a checkpoint every 2: what every interrupted run must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(*train_cmd(char_data, run, *SAVING)) == 0
    return run


# ----------------------------------------------------------------------------------------------
# One writer per run directory


@pytest.mark.slow
def test_a_second_train_into_a_live_run_exits_2_naming_the_holder(char_data, tmp_path):
    run = tmp_path / "run"
    first = spawn(char_data, run, "--set", "train.max_steps=100000", "--set", "train.save_interval=2")
    try:
        wait_for(lambda: logged_steps(run) >= 3)
        attempts = {
            "new run": train_cmd(char_data, run, "--set", "train.max_steps=5"),
            "--resume": ["train", "--out", str(run), "--resume", "--set", "train.max_steps=200000"],
            "--resume auto": [*train_cmd(char_data, run, "--set", "train.max_steps=100000",
                                         "--set", "train.save_interval=2"), "--resume", "auto"],
            "--nproc 2": [*train_cmd(char_data, run), "--nproc", "2"],  # refused before torchrun
        }
        for what, args in attempts.items():
            out = gptforge_proc(*args)
            assert out.returncode == 2, (what, out.stderr)
            err = out.stderr
            assert err.count("\n") == 1 and "Traceback" not in err, (what, err)
            assert f"is being written by another gptforge train, pid {first.pid} on " \
                   f"{socket.gethostname()} (this host), started " in err, (what, err)
            assert "launching: torchrun" not in out.stdout
            # refused before the seconds that importing torch takes
            assert out.stdout.splitlines()[-1] == "torch imported: False", (what, out.stdout)
        assert first.poll() is None  # the live run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # The kernel released the dead process's lock: the run continues.
    step = load_checkpoint(run).step
    assert (run / ".lock").exists()
    assert run_cli("train", "--out", str(run), "--resume", "--set", f"train.max_steps={step + 2}") == 0
    assert load_checkpoint(run).step == step + 2


def test_a_failed_start_leaves_no_lock_and_no_directory(char_data, tmp_path, capsys):
    run = tmp_path / "new" / "run"
    assert run_cli(*train_cmd(char_data, run, "--set", "optim.lr=-1")) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------
# --resume auto and the original command line


def test_resume_auto_same_command_starts_continues_and_completes(char_data, tmp_path, reference, capsys):
    run = tmp_path / "run"
    auto = [*train_cmd(char_data, run, *SAVING),
            "--resume", "auto"]
    # 1. absent RUN: a new run, preempted (SIGTERM: it saves) part-way
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", *auto], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    wait_for(lambda: logged_steps(run) >= 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err  # stopped: a job loop goes round again
    stopped = load_checkpoint(run).step
    assert 4 <= stopped < 12
    # 2. the same command continues it, exactly as if it had never stopped
    assert run_cli(*auto) == 0
    assert f"resuming from {run / 'checkpoints'}" in capsys.readouterr().out
    assert losses(run) == losses(reference)
    assert_same_weights(run, reference)
    # 3. and once the run is complete it does nothing, says so in one line, and exits 0
    before = tree_digest(run)
    assert run_cli(*auto) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "the run is complete: it reached train.max_steps=12" in out
    assert tree_digest(run) == before
    # A job script may loop on it; the record says why the run ended.
    assert load_checkpoint(run).trainer["stopped_by"] == "max_steps"


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(char_data, tmp_path, reference, capsys):
    run = tmp_path / "run"
    with ended_with_the_test(spawn(char_data, run, "--set", "train.max_steps=100000")) as proc:  # saves only at the end
        wait_for(lambda: logged_steps(run) >= 3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (run / "checkpoints").exists() and (run / "metrics.jsonl").exists()
    auto = [*train_cmd(char_data, run, *SAVING),
            "--resume", "auto"]
    assert run_cli(*auto) == 0, capsys.readouterr().err
    assert losses(run) == losses(reference)  # the killed start's lines are gone
    assert read_run_record(run)["sessions"] == 2
    # A directory with files a run does not write is not taken over.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run_cli(*[a if a != str(run) else str(other) for a in auto]) == 2


def test_resume_with_the_original_command_line(char_data, tmp_path, reference, capsys):
    run = tmp_path / "run"
    original = train_cmd(char_data, run, "--set", "train.save_interval=2", "--set", "train.max_steps=6")
    assert run_cli(*original) == 0
    # The same command plus --resume, with a key that may change (max_steps), continues it.
    assert run_cli(*original, "--set", "train.max_steps=12", "--resume") == 0
    assert losses(run) == losses(reference)
    capsys.readouterr()
    # Any other difference: one line naming every differing key with both values.
    err = fails_in_one_line(capsys, *original, "--set", "train.max_steps=14", "--set", "optim.lr=0.01",
                            "--set", "model.n_embd=64", "--resume")
    assert "model.n_embd is 32 in the run, 64 in this command" in err
    assert "optim.lr is 0.001 in the run, 0.01 in this command" in err
    assert "train.max_steps is" not in err
    err = fails_in_one_line(capsys, "train", "--out", str(run), "--preset", "gpt2-mini", "--resume",
                            "--set", "train.max_steps=14")
    assert "model.n_layer is 2 in the run, 4 in this command" in err
    assert load_checkpoint(run).step == 12  # nothing ran


# ----------------------------------------------------------------------------------------------
# Checksummed checkpoints


def flip_byte(path: Path, offset_from_end: int = 8) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_checkpoint_has_a_manifest_that_matches_its_files(reference):
    ckpt = find_checkpoint(reference)
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    names = {p.name for p in ckpt.iterdir()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == names >= {"model.safetensors", "optimizer.safetensors",
                                               "config.json", "trainer_state.json"}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (ckpt / name).stat().st_size
        assert entry["sha256"] == checkpoint.file_sha256(ckpt / name)


def test_checkpoints_without_a_manifest(reference, tmp_path, capsys):
    """Format 1 (written before manifests) still loads; format 2 without its manifest is damaged."""
    old = tmp_path / "step_0000012"
    shutil.copytree(find_checkpoint(reference), old)
    (old / MANIFEST_FILE).unlink()
    assert run_cli("sample", "--ckpt", str(old), "--max-new-tokens", "2") == 2
    assert f"checkpoint file {old / MANIFEST_FILE} is missing" in capsys.readouterr().err
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "format_version": 1}))
    model = build_model(load_checkpoint(old, verify="sha256"))
    reference_model = build_model(load_checkpoint(reference))
    for name, p in reference_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], p)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_a_flipped_byte_is_caught_on_resume_and_export(reference, tmp_path, capsys, name):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ckpt = find_checkpoint(run)
    flip_byte(ckpt / name, offset_from_end=2 if name.endswith(".json") else 8)
    for args in (["train", "--out", str(run), "--resume", "--set", "train.max_steps=20"],
                 ["export", "--ckpt", str(run), "--out", str(tmp_path / "hf"), "--weights-only"]):
        before = tree_digest(run)
        err = fails_in_one_line(capsys, *args)
        assert f"checkpoint file {ckpt / name} is corrupt: its sha256 differs" in err
        assert "use an earlier checkpoint (" + str(run / "checkpoints" / "step_0000010") in err
        assert tree_digest(run) == before and not (tmp_path / "hf").exists()
    # Sampling checks sizes only (fast); a truncated file is caught there too.
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[:-1])
    assert run_cli("sample", "--ckpt", str(run), "--max-new-tokens", "2") == 2
    assert "bytes but its manifest says" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Disk full


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs of our own (needs root / CAP_SYS_ADMIN, as on CI): a real full disk."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        said = " ".join(res.stderr.split()[:12])  # mount's first words, on one line
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN), as on CI ({said}); "
                    "the patched-write test covers ENOSPC")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def leave_free(disk: Path, nbytes: int) -> Path:
    """Fill ``disk`` so that about ``nbytes`` stay free; returns the filler file."""
    filler = disk / f"filler-{time.monotonic_ns()}"
    size = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - nbytes
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(size, 0))
    return filler


def ckpt_sizes(reference: Path) -> tuple[int, int]:
    """(free bytes a save asks for, bytes a checkpoint of the reference run takes on disk)."""
    ckpt = find_checkpoint(reference)
    tensors = sum((ckpt / f).stat().st_size for f in ("model.safetensors", "optimizer.safetensors"))
    used = sum(p.stat().st_blocks * 512 for p in ckpt.iterdir())
    return checkpoint.space_needed(tensors), used


def test_a_save_that_cannot_fit_stops_before_writing_and_resumes_after(
        char_data, small_disk, reference, capsys):
    run = small_disk / "run"
    need, used = ckpt_sizes(reference)
    filler = leave_free(small_disk, need + used // 2)  # room for one checkpoint, not two
    with pytest.warns(UserWarning, match="less than two checkpoints of this run"):  # at the start
        err = fails_in_one_line(capsys, *train_cmd(char_data, run, *SAVING, "--set", "train.keep_last=2"))
    assert f"not enough space for the checkpoint {run / 'checkpoints' / 'step_0000004'}" in err
    assert "free there; nothing was written: free space on that disk" in err
    assert f"gptforge train --out {run} --resume" in err
    latest = load_checkpoint(run, verify="sha256")
    assert latest.step == 2 and (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert read_run_record(run)["status"] == "crashed"
    filler.unlink()
    assert run_cli("train", "--out", str(run), "--resume") == 0
    assert losses(run) == losses(reference)
    assert_same_weights(run, reference)


def test_keep_last_prunes_first_when_that_makes_room(char_data, small_disk, reference):
    run = small_disk / "run"
    need, used = ckpt_sizes(reference)
    # Each save finds too little room unless the checkpoint keep_last drops after it goes first.
    leave_free(small_disk, need + used * 3 // 2)
    assert run_cli(*train_cmd(char_data, run, "--set", "train.max_steps=12",
                              "--set", "train.save_interval=2", "--set", "train.keep_last=2")) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_0000010", "step_0000012"]
    assert_same_weights(run, reference)


def test_disk_full_in_the_middle_of_a_save(char_data, small_disk, reference, monkeypatch, capsys):
    """The free-space check is fooled (another process filled the disk after it): the write
    itself fails with ENOSPC. One line, the half-written save removed, the last one intact."""
    run = small_disk / "run"
    real = checkpoint.disk_free
    saves = {"n": 0}

    def lying_disk_free(path):
        saves["n"] += 1  # call 1: the start's warn_if_disk_is_short; then one call per save
        if saves["n"] == 3:  # the second save: fill the disk behind the check's back
            leave_free(small_disk, 50_000)
        return 10**12 if saves["n"] >= 3 else real(path)

    monkeypatch.setattr(checkpoint, "disk_free", lying_disk_free)
    err = fails_in_one_line(capsys, *train_cmd(char_data, run, *SAVING))
    assert f"could not write the checkpoint {run / 'checkpoints' / 'step_0000004'}" in err
    assert "No space left on device" in err and "free there)" in err
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    build_model(load_checkpoint(run, verify="sha256"))
    monkeypatch.setattr(checkpoint, "disk_free", real)
    resume_after_freeing(small_disk, run, reference)
    assert_same_weights(run, reference)


def resume_after_freeing(small_disk: Path, run: Path, reference: Path) -> None:
    for f in small_disk.glob("filler-*"):
        f.unlink()
    assert run_cli("train", "--out", str(run), "--resume") == 0
    assert losses(run) == losses(reference)


def test_disk_full_on_run_json(char_data, small_disk, reference, monkeypatch, capsys):
    run = small_disk / "run"
    update = metrics.RunRecord.update
    calls = {"n": 0}

    def fill_then_update(self, **fields):
        calls["n"] += 1
        if calls["n"] == 6:  # run.json is rewritten on every logged step
            leave_free(small_disk, 0)
        return update(self, **fields)

    monkeypatch.setattr(metrics.RunRecord, "update", fill_then_update)
    err = fails_in_one_line(capsys, *train_cmd(char_data, run, *SAVING))
    assert f"could not write the run record {run / 'run.json'} (No space left on device; " in err
    assert f"free space on that disk, then continue: gptforge train --out {run} --resume" in err
    monkeypatch.setattr(metrics.RunRecord, "update", update)
    resume_after_freeing(small_disk, run, reference)


class FullDisk:
    """A file whose writes fail with ENOSPC after ``ok`` of them, as on a disk that filled up."""

    def __init__(self, f, ok: int):
        self.f, self.ok = f, ok

    def write(self, text):
        self.ok -= 1
        if self.ok < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_on_metrics(char_data, tmp_path, reference, monkeypatch, capsys):
    # Appending to metrics.jsonl needs a new disk block only now and then, so its ENOSPC comes
    # from a patched write rather than a full tmpfs.
    run = tmp_path / "run"
    init = metrics.MetricsLog.__init__

    def failing_after_5(self, path):
        init(self, path)
        self._f = FullDisk(self._f, ok=5)

    monkeypatch.setattr(metrics.MetricsLog, "__init__", failing_after_5)
    err = fails_in_one_line(capsys, *train_cmd(char_data, run, *SAVING))
    assert f"could not write the metrics {run / 'metrics.jsonl'} (No space left on device; " in err
    monkeypatch.setattr(metrics.MetricsLog, "__init__", init)
    assert run_cli("train", "--out", str(run), "--resume") == 0
    assert losses(run) == losses(reference)


def test_enospc_from_the_writer_without_a_small_disk(char_data, tmp_path, reference, monkeypatch, capsys):
    """The same guarantees where no tmpfs can be mounted: the weights writer fails half-way."""
    run = tmp_path / "run"
    real_save = checkpoint.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's model.safetensors
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    err = fails_in_one_line(capsys, *train_cmd(char_data, run, *SAVING))
    assert "No space left on device" in err and "step_0000004" in err, err
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert load_checkpoint(run, verify="sha256").step == 2
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert run_cli("train", "--out", str(run), "--resume") == 0
    assert_same_weights(run, reference)


# ----------------------------------------------------------------------------------------------
# Hang-ups and pipes


def test_sighup_saves_and_stops_like_sigterm(char_data, tmp_path):
    run = tmp_path / "run"
    with ended_with_the_test(spawn(char_data, run, "--set", "train.max_steps=100000")) as proc:
        wait_for(lambda: logged_steps(run) >= 3)
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "SIGHUP received" in out
    last = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r][-1]
    assert load_checkpoint(run).step == last["step"] + 1
    record = read_run_record(run)
    assert record["status"] == "stopped" and record["stopped_by"] == "SIGHUP"


def terminal_stderr_of(args: list[str], rows: int = 24, cols: int = 100) -> bytes:
    """Run gptforge with stderr on a pseudo-terminal of the given size (0 x 0: one that reports
    no size); return what it wrote there."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", *args], stdout=subprocess.DEVNULL,
                            stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=120)
    os.close(master)
    return b"".join(chunks)


@pytest.mark.slow
def test_no_progress_bar_in_a_pipe(reference, char_data, capsys):
    args = ["eval", "--ckpt", str(reference), "--data", str(char_data)]
    assert run_cli(*args) == 0 and not sys.stderr.isatty()  # captured by pytest: not a terminal
    assert "\r" not in capsys.readouterr().err
    # The same command on a terminal draws one, also where the terminal reports no size.
    assert b"eval:" in terminal_stderr_of(args) and b"eval:" in terminal_stderr_of(args, rows=0, cols=0)


def test_output_to_a_closed_pipe_does_not_stop_training(char_data, tmp_path):
    """`gptforge train ... | head -1`: the reader goes away; the run still finishes and saves."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", *train_cmd(char_data, run, "--set", "train.max_steps=30")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert load_checkpoint(run).step == 30


def test_a_first_save_that_fails_points_to_resume_auto(char_data, tmp_path, reference, monkeypatch, capsys):
    """No checkpoint yet: --resume could not continue, so the message says how to start again."""
    assert (checkpoint.CHECKPOINT_DIR, checkpoint.LATEST) == ("checkpoints", "latest")  # as rundir assumes
    run = tmp_path / "run"
    real_save = checkpoint.save_file

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    cmd = train_cmd(char_data, run, *SAVING)
    err = fails_in_one_line(capsys, *cmd)
    assert "then continue: the same command with --resume auto" in err, err
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert run_cli(*cmd, "--resume", "auto") == 0
    assert losses(run) == losses(reference)


def test_a_forked_child_does_not_keep_a_dead_parents_lock(tmp_path):
    """prepare's tokenizer processes are forked while it holds DIR's lock: when the parent is
    killed, a child still alive for a moment must not keep DIR locked against the command run
    again (the same command resumes at once)."""
    code = (
        "import os, sys, time\n"
        "from gptforge.rundir import hold_run_lock\n"
        "with hold_run_lock(sys.argv[1], what='prepare'):\n"
        "    if os.fork() == 0:\n"
        "        os.close(1), os.close(2)  # the test's pipes end with the parent\n"
        "        time.sleep(10)\n"
        "        os._exit(0)\n"
        "    print('locked', flush=True)\n"
        "    os._exit(0)  # dies holding the lock, as a SIGKILL would leave it\n"
    )
    out = tmp_path / "data"
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": SRC}, timeout=60)
    assert result.stdout.strip() == "locked", result.stderr
    from gptforge.rundir import check_not_locked

    check_not_locked(out)  # the child lives on (10 s) without the lock


def test_the_early_lock_check_lets_the_holder_through(char_data, tmp_path):
    """`train` checks RUN's lock before importing torch; a process that holds the lock itself (a
    notebook or script calling the CLI inside ``hold_run_lock``) is not refused by that check
    (flock refuses a second open of the lock file even within one process)."""
    from gptforge.rundir import check_not_locked, hold_run_lock

    run = tmp_path / "run"
    assert run_cli(*train_cmd(char_data, run, "--set", "train.max_steps=2")) == 0
    with hold_run_lock(run):
        check_not_locked(run)
        assert run_cli("train", "--out", str(run), "--resume", "--set", "train.max_steps=3") == 0
    assert load_checkpoint(run).step == 3
