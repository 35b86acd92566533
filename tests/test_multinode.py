"""Two machines on one: two torchrun agents as two nodes over loopback (c10d rendezvous on
127.0.0.1, gloo bound to lo, gpt2-tiny, one process per node), launched with the command that
docs/distributed.md gives, read from that page.

One scenario, run once for the session (every launch imports torch in four processes), gives the
tests below their evidence:

    one        one process, in this one: the reference the two nodes must equal
    straight   two nodes, DDP, uninterrupted (every file write audited: who wrote what)
    healed     the same, --max-restarts 1, with rank 0 SIGKILLed after the first checkpoint:
               torchrun restarts both nodes and the run resumes itself
    lost       the same, no restarts, with the node not holding rank 0 SIGKILLed (agent and
               workers) and the survivor's worker SIGTERMed as its agent would
    continued  both nodes started again on `lost` with --resume auto
    fsdp       two nodes, FSDP2
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from test_checkpoint import weights
from test_distributed import assert_only_rank_0_wrote, audited, losses, parents
from test_train import run_cli, wait_for

from gptforge.checkpoint import load_checkpoint
from gptforge.launch import Launch, LaunchFailure, lost_peers, worker_argv
from gptforge.resume import restart_line
from gptforge.errors import GptforgeError
from gptforge.rundir import RunLock, RunLocked

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "distributed.md"
# What the tests add to the documented command: every step logged (the steps lost are counted
# from the log), fewer evaluations, every checkpoint kept, and a short collective timeout (a
# lost peer whose connections stay open is given up on after 15 s, not 900).
TEST_SETS = ["--set", "train.log_interval=1", "--set", "train.eval_interval=8", "--set", "train.keep_last=10",
             "--set", "train.dist_timeout_s=15"]
STEPS = 24  # train.max_steps in the documented command

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")


def documented_command(doc: Path = DOC) -> list[str]:
    """The two-node command of docs/distributed.md (the block the docs test skips because this
    test runs it)."""
    text = doc.read_text(encoding="utf-8")
    block = text.split("<!-- skip: two agents", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    (line,) = [ln for ln in block.splitlines() if ln.startswith("gptforge train")]
    return shlex.split(line)


def node_command(port: int, data: Path, run: Path, drop: tuple[str, ...] = ()) -> list[str]:
    """The documented command with this test's port, data and run directory, ``drop``'s options
    (and their values) left out, and TEST_SETS added."""
    subst = {"127.0.0.1:29400": f"127.0.0.1:{port}", "data/shakespeare-char": str(data),
             "runs/two-nodes": str(run)}
    cmd, out = [subst.get(a, a) for a in documented_command()], []
    for i, a in enumerate(cmd):
        if a not in drop and (i == 0 or cmd[i - 1] not in drop):
            out.append(a)
    return out + TEST_SETS


def assert_close_runs(a: Path, b: Path) -> None:
    """The same losses to 1e-5 and weights to 1e-5 after 24 steps (summation order differs
    between 2 ranks and 2 accumulation steps; measured: at most 1.4e-6 apart)."""
    for (sa, x, vx), (sb, y, vy) in zip(losses(a), losses(b), strict=True):
        assert sa == sb and (x is None) == (y is None) and (x is None or abs(x - y) < 1e-5)
        assert (vx is None) == (vy is None) and (vx is None or abs(vx - vy) < 1e-5)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def free_port() -> int:
    """A port nothing listens on, chosen by the kernel (never a fixed one: xdist workers and other
    jobs on the machine run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported by the workers of a slowed run (PYTHONPATH): each optimizer step takes 0.08 s more,
# so that a test can kill a process between two checkpoints.
SLOW_HOOK = """
import os
if "RANK" in os.environ and os.environ.get("GPTFORGE_TEST_STEP_S"):
    import time
    import gptforge.step as _step
    _real = _step.Stepper.__call__
    def _slow(self, *a, **k):
        time.sleep(float(os.environ["GPTFORGE_TEST_STEP_S"]))
        return _real(self, *a, **k)
    _step.Stepper.__call__ = _slow
"""


class Node:
    """One `gptforge train` launcher (a node: its agent and workers), in a session of its own."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.out, self.err = log.with_suffix(".out"), log.with_suffix(".err")
        full = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
                **(env or {})}
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen([sys.executable, "-m", "gptforge", *cmd[1:]], stdout=o, stderr=e,
                                         env=full, start_new_session=True)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the node: the launcher, its agent and the workers (torchrun starts each worker
        in a session of its own, so a process group is not enough)."""
        for pid in tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

    def holds(self, pid: int) -> bool:
        return pid in tree(self.proc.pid)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()


def tree(pid: int) -> list[int]:
    """PID and its live descendants."""
    live, out = parents(), [pid]
    for p in out:
        out += [c for c, parent in live.items() if parent == p]
    return [p for p in out if p in live]


def alive(pids: list[int]) -> list[int]:
    live = parents()
    return [p for p in pids if p in live]


@contextlib.contextmanager
def nodes(cmd: list[str], tmp: Path, name: str, env: dict | None = None):
    """Two nodes running ``cmd``; node 0 first, and node 1 once node 0's agent listens on the
    rendezvous port (node 0 then hosts torchrun's store). Killed, with all they started, when
    the block ends."""
    port = int(next(a for a in cmd if a.startswith("127.0.0.1:")).split(":")[1])
    started = [Node(cmd, tmp / f"{name}-0", env)]
    try:
        wait_for(lambda: _listening(port) or started[0].proc.poll() is not None, "node 0's agent", timeout=60)
        started.append(Node(cmd, tmp / f"{name}-1", env))
        yield started
    finally:
        for n in started:
            n.kill()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def finish(ns: list[Node], timeout: float = 120) -> None:
    for n in ns:
        assert n.wait(timeout) == 0, n.stdout()[-2000:] + n.stderr()[-3000:]


def last_logged(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    steps = [json.loads(ln)["step"] for ln in lines if ln.strip().endswith("}")]
    return max(steps, default=-1)


def lock_holder(run: Path) -> int | None:
    """The pid of the process holding RUN's lock (rank 0), from what it wrote into the file."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads((run / ".lock").read_text())["pid"])
    return None


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))


# ----------------------------------------------------------------------------------------------
# The scenario


# Session-scoped, not module-scoped: conftest runs the slow tests of every module first, so the
# tests below do not run back to back, and a module fixture would be built once per run of them.
@pytest.fixture(scope="session")
def scenario(char_data, tmp_path_factory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("multinode")
    s = SimpleNamespace(tmp=tmp, data=char_data)
    # one process: the documented command less the launcher's options (2 accumulation steps
    # where the two nodes take 1 each: the same global batch)
    one = node_command(0, char_data, tmp / "one")
    assert run_cli(*worker_argv(one[1:])) == 0
    s.one = tmp / "one"
    # straight through, every file write audited per rank
    s.straight = tmp / "straight"
    env, s.audit = audited(tmp, s.straight)
    with nodes(node_command(free_port(), char_data, s.straight), tmp, "straight", {**env}) as ns:
        finish(ns)
        s.straight_nodes = ns
    _healed(s, tmp)
    _lost(s, tmp)
    # both nodes again, with the same command (--resume auto): the run continues and ends
    with nodes(node_command(free_port(), char_data, s.lost, drop=("--max-restarts",)), tmp, "continued") as ns:
        finish(ns)
        s.continued_nodes = ns
    s.fsdp = tmp / "fsdp"
    with nodes(node_command(free_port(), char_data, s.fsdp) + ["--set", "train.parallel=fsdp"], tmp, "fsdp") as ns:
        finish(ns)
    return s


def _slowed(tmp: Path) -> dict:
    hooks = tmp / "slow-hook"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SLOW_HOOK)
    return {"PYTHONPATH": f"{hooks}:{SRC}", "GPTFORGE_TEST_STEP_S": "0.08"}


def _healed(s: SimpleNamespace, tmp: Path) -> None:
    """--max-restarts 1: rank 0 SIGKILLed two steps past the step-4 checkpoint; the agents
    restart the job, which resumes from that checkpoint and runs to the end."""
    s.healed = run = tmp / "healed"
    with nodes(node_command(free_port(), s.data, run), tmp, "healed", _slowed(tmp)) as ns:
        wait_for(lambda: last_logged(run) >= 5, "the run to pass its first checkpoint", timeout=90)
        s.healed_killed = lock_holder(run)
        s.healed_last = last_logged(run)
        os.kill(s.healed_killed, signal.SIGKILL)
        finish(ns)
        s.healed_nodes = ns


def _lost(s: SimpleNamespace, tmp: Path) -> None:
    """No restarts: the node not holding rank 0 is SIGKILLed, agent and workers, past the step-8
    checkpoint; torchrun would SIGTERM the survivor's other workers, so its rank 0 gets that."""
    s.lost = run = tmp / "lost"
    cmd = node_command(free_port(), s.data, run, drop=("--max-restarts",))
    with nodes(cmd, tmp, "lost", _slowed(tmp)) as ns:
        wait_for(lambda: last_logged(run) >= 9, "the run to pass its second checkpoint", timeout=90)
        rank0 = lock_holder(run)
        survivor, gone = (ns[0], ns[1]) if ns[0].holds(rank0) else (ns[1], ns[0])
        assert survivor.holds(rank0)
        s.lost_checkpoints = checkpoint_steps(run)
        survivors = tree(survivor.proc.pid)
        gone.kill()
        started = time.monotonic()
        os.kill(rank0, signal.SIGTERM)
        s.lost_code = survivor.wait(timeout=60)
        s.lost_after_s = time.monotonic() - started
        s.lost_left = alive(survivors)
        s.lost_survivor, s.lost_rank0 = survivor, rank0
        s.lost_checkpoints_after = checkpoint_steps(run)
        s.lost_latest = (run / "checkpoints" / "latest").read_text().strip()
        s.lost_tmp = list((run / "checkpoints").glob(".tmp-*"))
        s.lost_step = load_checkpoint(run).step  # complete: every file's sha256 checked


# ----------------------------------------------------------------------------------------------
# The tests


pytestmark = [needs_gloo, needs_proc]


@pytest.mark.slow
@pytest.mark.xdist_group("multinode")  # one worker builds the scenario
def test_two_nodes_equal_one_process_and_write_each_checkpoint_once(scenario):
    assert_close_runs(scenario.one, scenario.straight)
    assert_only_rank_0_wrote(scenario.audit)  # rank 0 of the job, wherever torchrun put it
    renames = [line for line in Path(f"{scenario.audit}.0").read_text().splitlines() if line.startswith("os.rename")]
    for step in range(4, STEPS + 1, 4):
        name = f"step_{step:07d}"
        assert sum(f"/.tmp-{name}-" in line for line in renames) == 1, renames  # written once
        ckpt = load_checkpoint(scenario.straight / "checkpoints" / name)  # complete: sha256 checked
        assert ckpt.step == step and ckpt.trainer["world_size"] == 2
    assert not list((scenario.straight / "checkpoints").glob(".tmp-*"))
    # the launcher said what it ran: torchrun with c10d on loopback, not the user's banner
    for n in scenario.straight_nodes:
        assert n.stdout().startswith("launching: torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d "
                                     "--rdzv-endpoint=127.0.0.1:")
        assert "Traceback" not in n.stderr()


@pytest.mark.slow
@pytest.mark.xdist_group("multinode")  # one worker builds the scenario
def test_an_elastic_restart_resumes_by_itself_and_ends_bit_identical(scenario):
    killed_at = scenario.healed_last + 1  # steps done when rank 0 was killed
    assert losses(scenario.healed) == losses(scenario.straight)
    wa, wb = weights(scenario.straight), weights(scenario.healed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    said = "".join(n.stdout() for n in scenario.healed_nodes)
    line = re.search(r"restarted by torchrun after a process of the job died \(restart 1\): resuming from "
                     r"\S+step_0000004 at step 4; (\d+) steps done since then were lost and are done again", said)
    assert line, said[-3000:]
    assert int(line.group(1)) >= killed_at - 4  # at least those it had logged when it was killed
    assert "already holds files" not in "".join(n.stderr() for n in scenario.healed_nodes)


@pytest.mark.slow
@pytest.mark.xdist_group("multinode")  # one worker builds the scenario
def test_a_lost_node_ends_the_survivor_with_one_line_and_no_half_checkpoint(scenario):
    s = scenario
    err = s.lost_survivor.stderr()
    assert s.lost_code != 0 and "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1, err[-3000:]
    step = s.lost_step
    assert re.fullmatch(r"gptforge train: error: node [01] of 2 \(rank 1\) is gone, and the job stopped; its last "
                        rf"checkpoint is \S+step_{step:07d} \(step {step}\); continue with: gptforge "
                        r"train --nnodes 2 .* --resume auto .*\(on every node\)", errors[0]), errors[0]
    # Bounded: the gloo connections of the dead processes closed, so the survivor's collective
    # failed at once; train.dist_timeout_s (15 s here) bounds it when a machine vanishes silently.
    assert s.lost_after_s < 15 + 10, s.lost_after_s
    assert s.lost_left == []  # nothing of the survivor's job left running
    # SIGTERM with the peer gone saved nothing: only the interval's checkpoints, all complete,
    # and `latest` the newest of them
    assert s.lost_checkpoints_after[:len(s.lost_checkpoints)] == s.lost_checkpoints and step >= 8
    assert all(k % 4 == 0 for k in s.lost_checkpoints_after) and step == s.lost_checkpoints_after[-1]
    assert s.lost_tmp == [] and s.lost_latest == f"step_{step:07d}"


@pytest.mark.slow
@pytest.mark.xdist_group("multinode")  # one worker builds the scenario
def test_both_nodes_restarted_with_resume_auto_end_bit_identical(scenario):
    assert losses(scenario.lost) == losses(scenario.straight)
    wa, wb = weights(scenario.straight), weights(scenario.lost)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.xdist_group("multinode")  # one worker builds the scenario
def test_fsdp2_across_two_nodes_equals_one_process(scenario):
    assert_close_runs(scenario.one, scenario.fsdp)
    assert load_checkpoint(scenario.fsdp).trainer["world_size"] == 2


@pytest.mark.slow
def test_a_failure_that_repeats_stops_when_the_restarts_run_out_with_one_line(char_data, tmp_path):
    """Bad input fails every attempt the same way: said once, then one line when the restarts
    are used up (not a loop, not torchrun's banner)."""
    cmd = [sys.executable, "-m", "gptforge", "train", "--nproc", "1", "--max-restarts", "1", "--out",
           str(tmp_path / "run"), "--data", str(char_data), "--preset", "gpt2-tiny", "--set", "train.device=cpu",
           "--set", "train.max_steps=4", "--set", "train.total_batch_tokens=500"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    errors = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(errors) == 2, out.stderr
    assert "total_batch_tokens" in errors[0]
    assert errors[1].startswith("gptforge train: error: the job failed the same way on every attempt (above), "
                                "and stopped after its 1 restart (--max-restarts) were used up; ")
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# Without a launch


SRUN_STUB = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done  # srun's own options
for ((n = 0; n < SLURM_NNODES; n++)); do
    python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$STUB_LOG"
done
exit "${STUB_CODE:-0}"
"""
SCONTROL_STUB = """#!/bin/bash
case "$1" in
    show) printf '127.0.0.1\\n127.0.0.2\\n' ;;
    requeue) echo "requeue $2" >> "$STUB_LOG.requeue" ;;
esac
"""


@pytest.mark.parametrize("code, requeued", [(0, False), (2, False), (1, True), (143, True)])
def test_the_slurm_script_runs_the_documented_command_on_each_node(tmp_path, code, requeued):
    """docs/slurm/train.sbatch with the Slurm variables set by hand, srun and scontrol stubbed:
    on each node, exactly the command the multi-node tests run; requeued unless it succeeded or
    the command was wrong."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    documented = documented_command()
    recipe = documented[documented.index("--resume") + 2:]  # what follows the script's own options
    value = dict(zip(documented, documented[1:]))
    log = tmp_path / "srun.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_CODE": str(code),
           "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": value["--nnodes"], "SLURM_JOB_ID": value["--rdzv-id"],
           "DATA": value["--data"], "RUN": value["--out"], "NPROC": value["--nproc"],
           "PORT": value["--rdzv-endpoint"].split(":")[1], "MAX_RESTARTS": value["--max-restarts"]}
    out = subprocess.run(["bash", str(ROOT / "docs" / "slurm" / "train.sbatch"), *recipe], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == code, out.stderr
    assert [json.loads(line) for line in log.read_text().splitlines()] == [documented] * 2
    requeue = Path(f"{log}.requeue")
    assert requeue.exists() == requeued and (not requeued or requeue.read_text() == "requeue demo\n")


def test_the_launch_options_become_torchruns():
    assert Launch(nproc=2).torchrun_args() == ["--standalone", "--nproc_per_node=2"]
    assert Launch(nproc=8, nnodes=2, rdzv_endpoint="10.0.0.1:29500", rdzv_id="gpt2", max_restarts=3
                  ).torchrun_args() == ["--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d",
                                        "--rdzv-endpoint=10.0.0.1:29500", "--rdzv-id=gpt2", "--max-restarts=3"]
    argv = ["train", "--nproc", "2", "--nnodes=2", "--rdzv-endpoint", "h:1", "--rdzv-id=x", "--max-restarts", "1",
            "--out", "RUN", "--set", "train.max_steps=4"]
    assert worker_argv(argv) == ["train", "--out", "RUN", "--set", "train.max_steps=4"]
    for bad, says in [(Launch(nnodes=2), "needs --rdzv-endpoint"), (Launch(nproc=0), "--nproc 0"),
                      (Launch(nnodes=2, rdzv_endpoint="host"), "HOST:PORT"), (Launch(max_restarts=-1), "0 or more")]:
        with pytest.raises(GptforgeError, match=says):
            bad.check()


def test_the_lost_node_is_named_from_the_survivors_side():
    two = {"rank": 2, "local_rank": 0, "world": 4, "local_world": 2, "node": 1, "nodes": 2}
    assert lost_peers(two) == "node 0 of 2 (ranks 0-1) is gone"
    assert lost_peers({**two, "nodes": 3, "world": 6}) == "a process on another node (among ranks 0-1, 4-5) is gone"
    assert LaunchFailure(1, -9).how == "was killed by SIGKILL" and LaunchFailure(1, -9).code == 137


def test_the_restart_line_counts_the_steps_redone():
    assert restart_line(1, None, 0, 2, 1) == ("restarted by torchrun after a process of the job died (restart 1): "
                                               "it had saved no checkpoint: starting again at step 0; 3 steps done "
                                               "since the start were lost and are done again")
    ckpt = SimpleNamespace(path=Path("RUN/checkpoints/step_0000004"))
    assert restart_line(2, ckpt, 4, 6, 10).endswith("at step 4; at least 3 steps done since then were lost and are done again")


def test_a_restarted_rank_0_waits_for_the_dead_holders_lock(tmp_path):
    """The lock of a process that is going away is waited for (up to the bound), then taken."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from gptforge.rundir import RunLock; "
        "RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(1.0)"), str(SRC), str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked):
            RunLock(tmp_path / "run").acquire()  # no wait: refused at once, as before
        started = time.monotonic()
        lock = RunLock(tmp_path / "run")
        lock.acquire(wait_s=20)
        assert time.monotonic() - started < 15
        lock.release()
    finally:
        holder.kill()
        holder.wait()
