"""A run directory's integrity: one writer at a time, and writes that fail in one clear line.

One writer: ``train`` holds an exclusive ``flock`` on ``RUN/.lock`` for its whole life (under
torchrun, rank 0 holds it: the process that writes). A second ``train`` into a live run learns
which process holds it (pid, host, start time, written into the file) and stops. The kernel drops
the lock when its process dies, however it dies, so a SIGKILLed run never leaves a stale lock: the
file stays, the lock does not.

Disk full: every write of a run (checkpoints, metrics.jsonl, run.json) goes through
``guarded_write``, which turns an ``OSError`` (ENOSPC, EIO, EDQUOT, ...) into one line saying what
was being written, where, and how much space is left.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from gptforge.errors import GptforgeError

# The names inside a run directory, in one place (train writes them; resume, report, the CLI and
# the checkpoint module read them).
LOCK_FILE = ".lock"  # held by the process that writes the run
RUN_FILE = "run.json"  # what produced the run and how it ended (metrics.RunRecord)
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step
RUN_CONFIG_FILE = "config.toml"  # the run's resolved config, a valid --config file
CHECKPOINT_DIR = "checkpoints"  # step_NNNNNNN/ directories, best/, and latest
LATEST = "latest"  # CHECKPOINT_DIR/latest names the newest complete checkpoint

try:  # POSIX; elsewhere runs are not locked (and the README says so)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunLocked(GptforgeError):
    """Another live process writes this run directory."""


class DiskWriteError(GptforgeError):
    """Writing part of a run failed (disk full, quota, I/O error), or would not fit."""


# ----------------------------------------------------------------------------------------------
# Space


def disk_free(path: str | Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding ``path`` (or, if it does
    not exist yet, its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KB'; decimal units, as df -H and disk vendors count."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def guarded_write(what: str, where: str | Path, fix: str) -> Iterator[None]:
    """Run a write; an OSError becomes one line: what, where, why, the free space, and ``fix``.

    ``what`` names the thing ("checkpoint", "metrics"), ``where`` its path. Errors that are not
    I/O errors pass through untouched.
    """
    try:
        yield
    except OSError as e:
        raise DiskWriteError(write_failure(what, where, e, fix)) from None


def free_space_then_continue(run_dir: str | Path, extra: str = "") -> str:
    """The fix for a run stopped by a full disk: how to go on once there is room. A run with a
    checkpoint continues with --resume; one without (its first save failed, or an earlier write)
    starts again with the same command plus --resume auto, which takes over the run's own files."""
    # LATEST is written once a first checkpoint is complete
    has_checkpoint = (Path(run_dir) / CHECKPOINT_DIR / LATEST).is_file()
    how = (f"gptforge train --out {run_dir} --resume" if has_checkpoint else
           "the same command with --resume auto (no checkpoint yet: the run starts again)")
    return f"free space on that disk{extra}, then continue: {how}"


def write_failure(what: str, where: str | Path, e: BaseException, fix: str) -> str:
    try:
        free = f"{format_bytes(disk_free(where))} free there"
    except OSError:
        free = "free space unknown"
    return f"could not write the {what} {where} ({_reason(e)}; {free}): {fix}"


# ----------------------------------------------------------------------------------------------
# The lock


def _locked(run_dir: Path, what: str = "train") -> str:
    stop = ("Ctrl-C, or kill -TERM with its pid: it saves first" if what == "train" else
            "Ctrl-C, or kill -TERM with its pid: the same command resumes it")
    return (f"{run_dir} is being written by another gptforge {what}, "
            f"{_holder(run_dir / LOCK_FILE)}: wait for it to end or stop it ({stop}), "
            "or choose another --out")


def _holder(path: Path) -> str:
    """Who holds the lock, from what the holder wrote into the file."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        pid, host, started = info["pid"], info["host"], info["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"
    where = "this host" if host == socket.gethostname() else "another host"
    return f"pid {pid} on {host} ({where}), started {started}"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``RUN/.lock``.

    ``acquire`` creates RUN if needed. ``release`` removes what acquiring created when nothing
    else was written (a run that failed before it began leaves no directory behind), and the
    lock file itself unless ``keep_file`` (a data directory keeps no trace of its writer).
    ``what`` names the command that writes the directory, for the message a second one gets.
    """

    def __init__(self, run_dir: str | Path, what: str = "train", keep_file: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.what, self.keep_file = what, keep_file
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []  # directories acquire() made, deepest first

    def acquire(self, wait_s: float = 0) -> None:
        """Take the lock, or raise RunLocked; ``wait_s``: keep trying that long first (a job
        restarted after a process died, whose lock may outlive it for a moment)."""
        deadline = time.monotonic() + wait_s
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise GptforgeError(f"--out {self.run_dir} is a file: choose a directory for the run")
        if not self.run_dir.exists():
            d = self.run_dir.absolute()
            while not d.exists():
                self._created.append(d)
                d = d.parent
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise GptforgeError(
                    f"cannot create the run directory {self.run_dir} ({_reason(e)}): choose "
                    "another --out"
                ) from None
        if fcntl is None:  # pragma: no cover
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise GptforgeError(
                    f"cannot create the run lock {self.path} ({_reason(e)}): check the "
                    "directory's permissions, or choose another --out"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:  # a restarted job: the dead holder's lock goes
                    time.sleep(0.1)
                    continue
                raise RunLocked(_locked(self.run_dir, self.what)) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    warnings.warn(
                        f"the filesystem of {self.run_dir} cannot lock files ({_reason(e)}): "
                        "nothing stops a second train from writing this run at the same time"
                    )
                    return
                raise
            # A failed start may have removed the file between our open and our lock: then we
            # locked a name no one else can see, so open the new one instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": ["gptforge", *sys.argv[1:]]}
        with contextlib.suppress(OSError):  # who holds it is a courtesy; the lock is the flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            leftovers = [p.name for p in self.run_dir.iterdir() if p.name != LOCK_FILE]
        except OSError:
            leftovers = ["?"]
        if not leftovers or not self.keep_file:  # nothing was written: leave no trace of it
            with contextlib.suppress(OSError):  # (a waiting writer then opens the new file)
                self.path.unlink()
        if not leftovers:
            for d in self._created:
                with contextlib.suppress(OSError):  # not empty (someone else's now): keep it
                    d.rmdir()
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None


# Locks this process holds, by resolved path: acquiring again is a no-op, so the CLI can take the
# lock before it reads the run, and train() (also a Python API) takes it for callers that did not.
_HELD: dict[str, RunLock] = {}


def _forget_locks_in_child() -> None:
    """In a forked child (prepare's tokenizer processes): close the inherited descriptors of
    the locks the parent holds. The lock stays the parent's (flock goes with the open file, and
    the parent's descriptor stays open), but a child that outlives a killed parent for a moment
    no longer keeps the directory locked against the command run again to resume."""
    for lock in _HELD.values():
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


@contextlib.contextmanager
def hold_run_lock(run_dir: str | Path, enabled: bool = True, create: bool = True,
                  what: str = "train", wait_s: float = 0) -> Iterator[None]:
    """Hold RUN's lock for the duration (re-entrant within a process); ``enabled=False`` is a
    no-op, for ranks other than the one that writes. With ``create=False`` an absent RUN is not
    created (there is nothing to lock, and the caller reports it missing). ``what``: the
    command writing it; other than "train" (a prepare's data directory), the lock file goes
    when the lock does. ``wait_s``: how long a held lock is waited for (RunLock.acquire)."""
    key = os.path.realpath(run_dir)
    if not enabled or key in _HELD or (not create and not os.path.isdir(run_dir)):
        yield
        return
    lock = RunLock(run_dir, what, keep_file=what == "train")
    lock.acquire(wait_s)
    _HELD[key] = lock
    try:
        yield
    finally:
        del _HELD[key]
        lock.release()


def check_not_locked(run_dir: str | Path) -> None:
    """Raise RunLocked if a live process holds RUN's lock; creates nothing. For launchers, which
    start the process that takes the lock, and for a command that should fail before its slow
    imports. A lock this process holds (``hold_run_lock``) is no obstacle."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file() or os.path.realpath(run_dir) in _HELD:
        return
    try:
        fd = os.open(path, os.O_RDWR)  # NFS emulates flock with byte-range locks: needs write
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunLocked(_locked(Path(run_dir))) from None
    except OSError:
        pass
    finally:
        os.close(fd)
