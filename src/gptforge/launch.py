"""Launching N processes on one or several machines: torchrun, with its failures in one line.

``gptforge train --nproc N ...`` runs ``torchrun --standalone --nproc_per_node=N -m gptforge train
...``: torch's own launcher, in a child process (the agent), with N workers under it. With
``--nnodes M --rdzv-endpoint HOST:PORT`` the same command, run once on each of M machines, makes
them one job: ``torchrun --nnodes=M --nproc_per_node=N --rdzv-backend=c10d --rdzv-endpoint=...``.
With c10d, torchrun itself decides which machine's process is global rank 0 (the one that writes
the run), so nothing here assumes it is the first one started. ``--max-restarts R`` lets the
agents restart the whole job up to R times after a process dies (torchrun's elastic restarts); a
restarted worker sees ``TORCHELASTIC_RESTART_COUNT`` > 0, and ``train`` then continues the run from
its last checkpoint (``--resume auto``).

The agent reports a failed job's failures to the launching command instead of printing
torchrun's ChildFailedError traceback, and the command ends with one line naming the rank (or
the machine that was lost) and how it ended. A worker that stops because a peer is gone says so
to the launcher (``report_peer_lost``) instead of to the terminal, so a node losing its peer
prints one line, not one per process.

This module imports no torch (the agent does, once it runs): the launching command only waits.
It also says, from torchrun's environment alone, whether this process is one of such a job's
workers and which rank, so that `train` can check its run's lock before importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def launch_rank() -> int:
    """This process's global rank as torchrun set it (0 when run alone), known before the process
    group exists: rank 0 is the process that writes the run."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def elastic() -> bool:
    """Whether torchrun may restart this job (--max-restarts > 0): then every start of it, the
    first included, continues the run if it has a checkpoint (as --resume auto does)."""
    return launched_by_torchrun() and _env_int("TORCHELASTIC_MAX_RESTARTS") > 0


_ATTEMPT: list[int] = []


def restart_count() -> int:
    """How many times torchrun's agents have restarted this job (0: the first attempt).

    ``TORCHELASTIC_RESTART_COUNT`` is counted by each machine's agent, and an agent that restarts
    its workers because another machine's failed may not count it (pytorch#108158): under
    gptforge's launcher each worker slot also counts its own starts in the launch's report
    directory, and the larger count is taken. Counted once per process."""
    if not launched_by_torchrun():
        return 0
    if not _ATTEMPT:
        count = _env_int("TORCHELASTIC_RESTART_COUNT")
        where = os.environ.get(REPORT_ENV)
        if where and os.path.isdir(where):
            with contextlib.suppress(OSError):
                with open(os.path.join(where, f"starts-{os.environ['LOCAL_RANK']}"), "a+", encoding="utf-8") as f:
                    f.seek(0)
                    count = max(count, len(f.read().splitlines()))
                    f.write(f"{os.getpid()}\n")
        _ATTEMPT.append(count)
    return _ATTEMPT[0]


# ----------------------------------------------------------------------------------------------
# The options


@dataclass(frozen=True)
class Launch:
    """How many processes on how many machines: ``gptforge train``'s --nproc family."""

    nproc: int = 1  # processes on each machine
    nnodes: int = 1  # machines; each runs the same command
    rdzv_endpoint: str | None = None  # HOST:PORT where the machines meet (on the first one)
    rdzv_id: str = "gptforge"  # the job's name at that endpoint: the same on every machine
    max_restarts: int = 0  # whole-job restarts after a process dies

    def check(self) -> None:
        if self.nproc < 1:
            raise GptforgeError(f"--nproc {self.nproc}: give the number of processes, 1 or more")
        if self.nnodes < 1:
            raise GptforgeError(f"--nnodes {self.nnodes}: give the number of machines, 1 or more")
        if self.max_restarts < 0:
            raise GptforgeError(f"--max-restarts {self.max_restarts}: give 0 or more")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise GptforgeError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, the same on "
                                "every machine: an address of the first machine and a free port there")
        if self.rdzv_endpoint is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", self.rdzv_endpoint):
            raise GptforgeError(f"--rdzv-endpoint {self.rdzv_endpoint!r}: give HOST:PORT, "
                                "e.g. 10.0.0.1:29500")
        if not re.fullmatch(r"[\w.-]+", self.rdzv_id):
            raise GptforgeError(f"--rdzv-id {self.rdzv_id!r}: use letters, digits, '.', '-' and '_'")

    @property
    def multinode(self) -> bool:
        return self.nnodes > 1 or self.rdzv_endpoint is not None

    def torchrun_args(self) -> list[str]:
        """torchrun's options for this launch (what ``torchrun`` would be given on the command line)."""
        if self.multinode:
            args = [f"--nnodes={self.nnodes}", f"--nproc_per_node={self.nproc}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={self.rdzv_endpoint}", f"--rdzv-id={self.rdzv_id}"]
        else:
            args = ["--standalone", f"--nproc_per_node={self.nproc}"]
        return args + ([f"--max-restarts={self.max_restarts}"] if self.max_restarts else [])


# What the launcher takes out of the command line before the workers get it.
LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--rdzv-id", "--max-restarts")


def worker_argv(argv: list[str]) -> list[str]:
    """The command line less the launcher's own options (``--opt V`` and ``--opt=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_OPTIONS:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            out.append(a)
    return out


# ----------------------------------------------------------------------------------------------
# The launch


@dataclass
class LaunchFailure:
    """A process of a launched job that failed: its rank and how it ended."""

    rank: int
    exitcode: int  # the process's own exit code, or -N when signal N killed it

    @property
    def how(self) -> str:
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"was killed by {name}"
        return f"exited with code {self.exitcode}"

    @property
    def code(self) -> int:
        """The exit code a shell would report for that process: 128 + N for signal N."""
        return 128 - self.exitcode if self.exitcode < 0 else self.exitcode


@dataclass
class LaunchResult:
    code: int
    failures: list[LaunchFailure]  # the first first; empty when the job succeeded
    lost: dict[str, Any] | None = None  # what a worker said when its peers were gone (report_peer_lost)


REPORT_ENV = "GPTFORGE_LAUNCH_REPORT"  # the directory the agent and the workers report into
_AGENT = "from gptforge.launch import torchrun_agent; torchrun_agent()"
_PREFIX = "gptforge-launch-"


def _sweep_stale_reports() -> None:
    """Report directories of launchers that were killed (SIGKILL leaves no chance to clean up):
    each is named for its launcher's pid, and goes once that process is gone."""
    for d in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*-*"):
        pid = d.name[len(_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's: alive
        return True
    return True


def torchrun(launch: Launch, argv: list[str]) -> LaunchResult:
    """Run ``gptforge ARGV`` under torchrun's agent, in a child process (as ``torchrun
    OPTIONS -m gptforge ARGV`` would), and return its exit code and which processes failed and
    how. The agent reports failures to us instead of printing torchrun's 40-line
    ChildFailedError traceback; each worker's own error (one line, or a bug's traceback) still
    reaches the terminal, which the workers share.

    SIGTERM and SIGHUP sent to this command are passed on to the agent, which passes them to the
    workers (they save and stop): a job is never left running without its launcher."""
    import subprocess

    launch.check()
    args = [*launch.torchrun_args(), "-m", "gptforge", *worker_argv(argv)]
    print("launching: torchrun " + " ".join(args), flush=True)
    _sweep_stale_reports()
    tmp = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    previous: dict[int, Any] = {}
    try:
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: a fresh store for each attempt. With the store the
        # agents share (torch >= 2.5's default), restarted workers may read the addresses of the
        # dead ones and fail to connect (pytorch#135712), since attempts are told apart by
        # restart counts that differ between machines (pytorch#108158).
        # TORCH_CPP_LOG_LEVEL=ERROR: torch's C++ warnings stay out of the job's one-line errors
        # (on a machine whose hostname does not resolve, as with no network, every rank printed
        # c10d's "[W...] The hostname of the client socket cannot be retrieved"); a user's own
        # setting wins, as with the store's.
        env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "TORCH_CPP_LOG_LEVEL": "ERROR",
               **os.environ, REPORT_ENV: tmp}
        agent = subprocess.Popen([sys.executable, "-c", _AGENT, *args], env=env)

        def forward(signum: int, frame: Any) -> None:
            with contextlib.suppress(OSError):
                agent.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, forward)
        try:
            code = agent.wait()
        except KeyboardInterrupt:  # the agent gets the signal too; its workers save and exit
            agent.wait()
            return LaunchResult(130, [])
        return _read_reports(Path(tmp), code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(tmp, ignore_errors=True)


def _read_reports(tmp: Path, code: int) -> LaunchResult:
    try:
        failures = json.loads((tmp / "failures.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        failures = []
    lost = None
    for f in sorted(tmp.glob("lost-*.json")):
        with contextlib.suppress(OSError, ValueError):
            lost = json.loads(f.read_text(encoding="utf-8"))
            break
    return LaunchResult(code, [LaunchFailure(int(f["rank"]), int(f["exitcode"])) for f in failures], lost)


def torchrun_agent() -> None:
    """The child ``torchrun`` starts in: torch's own launcher (``torch.distributed.run``), with a
    failed job's failures written to ``$GPTFORGE_LAUNCH_REPORT`` (the first first) and the
    process ending with that worker's exit code (128 + N for signal N), without a traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent's own warnings ("Sending process ... closing signal") repeat what our line says.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError as e:
        first, _ = e.get_first_failure()
        ranks = sorted(e.failures, key=lambda r: (r != first, r))
        with open(os.path.join(os.environ[REPORT_ENV], "failures.json"), "w", encoding="utf-8") as f:
            json.dump([{"rank": r, "exitcode": e.failures[r].exitcode} for r in ranks], f)
        sys.exit(LaunchFailure(first, e.failures[first].exitcode).code)
    except SignalException as e:  # Ctrl-C or a kill of the whole job: the workers saved and stopped
        sys.exit(128 + int(e.sigval))
    except Exception as e:  # the agent itself failed (its rendezvous): one line, not torch's traceback
        message = " ".join(str(e).split())[:300] or type(e).__name__
        print(f"gptforge: error: torchrun's agent failed: {type(e).__name__}: {message}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------
# What workers tell the launcher


def report_peer_lost(detail: str) -> bool:
    """Under gptforge's launcher, record that this worker stopped because other processes of the
    job are gone, with what torchrun's environment says about where it stands; the launcher
    names the lost machine in its one line. False when there is no launcher to tell (torchrun
    run by hand): the worker then says it itself."""
    where = os.environ.get(REPORT_ENV)
    if not where or not os.path.isdir(where) or not launched_by_torchrun():
        return False
    env = os.environ
    info = {"rank": int(env["RANK"]), "local_rank": int(env["LOCAL_RANK"]), "world": int(env["WORLD_SIZE"]),
            "local_world": int(env.get("LOCAL_WORLD_SIZE", "1")), "node": int(env.get("GROUP_RANK", "0")),
            "nodes": int(env.get("GROUP_WORLD_SIZE", "1")), "detail": detail}
    try:
        with open(os.path.join(where, f"lost-{info['rank']}.json"), "w", encoding="utf-8") as f:
            json.dump(info, f)
    except OSError:
        return False
    return True


def lost_peers(info: dict[str, Any]) -> str:
    """Who is gone, as seen from the node that reported it: with two machines, the other one."""
    base = info["rank"] - info["local_rank"]
    ours = set(range(base, base + info["local_world"]))
    others = [r for r in range(info["world"]) if r not in ours]
    ranks = _ranges(others)
    if info["nodes"] == 2:
        return f"node {1 - info['node']} of 2 (rank{'s' if len(others) > 1 else ''} {ranks}) is gone"
    if info["nodes"] > 2:
        return f"a process on another node (among ranks {ranks}) is gone"
    return "another process of the job is gone"


def _ranges(ranks: list[int]) -> str:
    parts, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ", ".join(parts)


def repeated_error(line: str) -> bool:
    """Whether this rank printed the same error in an earlier attempt of an elastic job (a
    failure that repeats on every restart is said once, not once per attempt); records it."""
    where = os.environ.get(REPORT_ENV)
    if not where or not os.path.isdir(where) or not launched_by_torchrun():
        return False
    path = Path(where) / f"error-{launch_rank()}.txt"
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == line:
            return True
    with contextlib.suppress(OSError):
        path.write_text(line, encoding="utf-8")
    return False
