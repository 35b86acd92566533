"""``gptforge train``, and the launcher it shares with ``bench``: ``--nproc``/``--nnodes`` start
torchrun in a child process and turn a failed job into one line; a job torchrun restarts
continues its run from the last checkpoint."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.presets import DEFAULT_PRESET


def cmd_train(args: argparse.Namespace) -> int:
    from gptforge.launch import elastic, launch_rank, restart_count
    from gptforge.rundir import check_not_locked, hold_run_lock

    writer = launch_rank() == 0  # under torchrun, rank 0 writes the run and holds its lock
    restarted = restart_count() > 0 or elastic()  # torchrun's agents may have restarted the job
    if writer and not restarted:  # a live run is refused at once: not inside torchrun, nor after
        check_not_locked(args.out)  # importing torch (a restart waits for the dead one's lock)
    launching = _launch_of(args)
    if launching is not None:  # this process only launches and waits: it needs no torch
        return launch(launching, args.argv, run_dir=args.out)
    if restarted:
        args.resume = _resume_after_restart(args.out, args.resume)
    from gptforge.console import say
    from gptforge.distributed import PeerLost
    from gptforge.resume import FINISHED, plan_run
    from gptforge.train import train
    # The lock first: a live run is reported before anything of it is read or written.
    with hold_run_lock(args.out, enabled=writer, create=args.resume != "",
                       wait_s=RESTART_LOCK_WAIT_S if restarted else 0):
        plan = plan_run(args.out, args.resume, args.preset, args.config, args.set, args.data,
                        args.init_from, verify="sha256" if writer else "sizes")
        if plan.complete is not None:
            if writer:
                say(f"{args.out}: {plan.complete}; nothing to do")
            return 0
        if not plan.cfg.data.path:
            raise GptforgeError("no training data: pass --data DIR (made by `gptforge prepare`)")
        try:
            result = train(plan.cfg, args.out, resume=plan.resume, restart=plan.restart,
                           preset=None if plan.resume is not None else (args.preset or DEFAULT_PRESET),
                           init_from=args.init_from if plan.resume is None else None)
        except PeerLost as e:
            from gptforge.launch import report_peer_lost

            if report_peer_lost(str(e)):  # gptforge's launcher names the lost machine, once
                return 2
            raise
    # Stopped by a signal (saved, resumable): 128 + its number, as a shell reports a process a
    # signal stopped (130 for Ctrl-C, 143 for SIGTERM). 0 means the run reached its end, so a
    # job script can loop until it gets 0.
    code = 0 if result.stopped_by in FINISHED else 128 + getattr(signal, result.stopped_by, signal.SIGTERM)
    if not writer:
        return code  # rank 0 reports for the job
    for line in ["", *result.summary(args.out)]:
        say(line)
    return code


# How long a restarted job's new rank 0 waits for the run's lock: torchrun stops every worker
# before it restarts any, so the lock is normally free at once; this covers a dead holder's
# descriptor that outlives it for a moment (a forked child, an NFS server's lease).
RESTART_LOCK_WAIT_S = 60


def _resume_after_restart(out: str, resume: str | None) -> str:
    """A job torchrun restarts continues its run from the last checkpoint: no --resume means
    --resume auto, and a run started from another checkpoint (--resume PATH) continues from its
    own latest once it has one. Every start of an elastic job (--max-restarts > 0) is treated
    so, the first included: all ranks must decide alike, and torchrun's restart count may be 0
    on one machine and 1 on another after the same restart (pytorch#108158)."""
    from gptforge.rundir import CHECKPOINT_DIR, LATEST

    if resume is None:
        return "auto"
    if resume not in ("", "auto") and (Path(out) / CHECKPOINT_DIR / LATEST).is_file():
        return ""
    return resume


def _launch_of(args: argparse.Namespace):  # noqa: ANN202 - gptforge.launch.Launch | None
    """The --nproc family as a Launch, or None when this process is to train itself."""
    from gptforge.launch import Launch

    given = {k: getattr(args, k, None) for k in ("nproc", "nnodes", "rdzv_endpoint", "rdzv_id", "max_restarts")}
    if all(v is None for v in given.values()):
        return None
    return Launch(**{k: v for k, v in given.items() if v is not None})


def launch(launching, argv: list[str], run_dir: str | None = None) -> int:  # noqa: ANN001
    """``gptforge COMMAND --nproc N ...`` = ``torchrun --standalone --nproc_per_node=N -m gptforge
    COMMAND ...`` (with --nnodes, on each machine: ``torchrun --nnodes=M ... --rdzv-backend=c10d``).
    A job that fails ends the command with one line: which rank died and how, or which machine
    was lost, and (for a training run) its last checkpoint and the command that continues it."""
    from gptforge.launch import lost_peers, torchrun

    result = torchrun(launching, argv)
    if not result.failures:
        return result.code
    first = result.failures[0]
    dead = [f for f in result.failures if f.exitcode != 2]  # 2: it said what was wrong, in one line
    restarts = (f" after its {launching.max_restarts} restart{'s' * (launching.max_restarts > 1)} "
                "(--max-restarts) were used up" if launching.max_restarts else "")
    if dead:
        line = f"gptforge {argv[0]}: error: rank {dead[0].rank} {dead[0].how}, and the job stopped{restarts}"
    elif result.lost is not None:
        line = f"gptforge {argv[0]}: error: {lost_peers(result.lost)}, and the job stopped{restarts}"
    elif restarts:
        line = (f"gptforge {argv[0]}: error: the job failed the same way on every attempt (above), "
                f"and stopped{restarts}")
    else:
        return result.code
    if run_dir is not None:
        from gptforge.resume import continue_hint

        line += "; " + continue_hint(run_dir, argv) + (" (on every node)" if launching.multinode else "")
    print(line, file=sys.stderr)
    return dead[0].code if dead else first.code
