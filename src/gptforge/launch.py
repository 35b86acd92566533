"""Launching N processes on this machine (``--nproc N``): torchrun, with its failures in one line.

``gptforge train --nproc N ...`` runs ``torchrun --standalone --nproc_per_node=N -m gptforge train
...``: torch's own launcher, in a child process (the agent), with N workers under it. The agent
reports a failed job's first failure to the launching command instead of printing torchrun's
ChildFailedError traceback, and the command ends with one line naming the rank and how it ended.

This module imports no torch (the agent does, once it runs): the launching command only waits.
It also says, from torchrun's environment alone, whether this process is one of such a job's
workers and which rank, so that `train` can check its run's lock before importing torch.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass

from gptforge.errors import GptforgeError


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def launch_rank() -> int:
    """This process's global rank as torchrun set it (0 when run alone), known before the process
    group exists: rank 0 is the process that writes the run."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


@dataclass
class LaunchFailure:
    """The first process of a launched job that failed: its rank and how it ended."""

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


REPORT_ENV = "GPTFORGE_LAUNCH_REPORT"  # where the agent writes the first failure, as JSON
_AGENT = "from gptforge.launch import torchrun_agent; torchrun_agent()"


def torchrun(nproc: int, argv: list[str]) -> tuple[int, LaunchFailure | None]:
    """Run ``gptforge ARGV`` in ``nproc`` processes under torchrun's agent, in a child process
    (as ``torchrun --standalone --nproc_per_node=N -m gptforge ARGV`` would), and return its exit
    code and, if a process failed, which and how. The agent reports a failure to us instead of
    printing torchrun's 40-line ChildFailedError traceback; each worker's own error (one line,
    or a bug's traceback) still reaches the terminal, which the workers share."""
    import subprocess
    import tempfile

    if nproc < 1:
        raise GptforgeError(f"--nproc {nproc}: give the number of processes, 1 or more")
    argv = [a for i, a in enumerate(argv)  # the same command line, less --nproc
            if a != "--nproc" and not a.startswith("--nproc=") and (i == 0 or argv[i - 1] != "--nproc")]
    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "gptforge", *argv]
    print("launching: torchrun " + " ".join(args), flush=True)
    with tempfile.TemporaryDirectory(prefix="gptforge-launch-") as tmp:
        report = os.path.join(tmp, "failure.json")
        try:
            code = subprocess.run([sys.executable, "-c", _AGENT, *args],
                                  env={**os.environ, REPORT_ENV: report}).returncode
        except KeyboardInterrupt:  # the agent gets the signal too; its workers save and exit
            return 130, None
        try:
            with open(report, encoding="utf-8") as f:
                first = json.load(f)
        except (OSError, ValueError):
            return code, None
    return code, LaunchFailure(int(first["rank"]), int(first["exitcode"]))


def torchrun_agent() -> None:
    """The child ``torchrun`` starts in: torch's own launcher (``torch.distributed.run``), with a
    failed job's first failure written to ``$GPTFORGE_LAUNCH_REPORT`` and the process ending with
    that worker's exit code (128 + N for signal N), without a traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent's own warnings ("Sending process ... closing signal") repeat what our line says.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        with open(os.environ[REPORT_ENV], "w", encoding="utf-8") as f:
            json.dump({"rank": rank, "exitcode": failure.exitcode}, f)
        sys.exit(LaunchFailure(rank, failure.exitcode).code)
    except SignalException as e:  # Ctrl-C or a kill of the whole job: the workers saved and stopped
        sys.exit(128 + int(e.sigval))
