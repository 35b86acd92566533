"""What an elastic restart costs: the time from a worker's death to the job's first step after
torchrun restarted it, and the steps lost (done again) at a given train.save_interval.

For each model, ``gptforge train --nproc 2 --max-restarts 1`` on the CPU (gloo) saves every
train.save_interval steps; once it has done a checkpoint plus half an interval, rank 1 is SIGKILLed.
The clock stops when the restarted job logs its first step (metrics.jsonl gains the step after
the checkpoint again). The dead attempt's steps past the checkpoint are read from the restart's
own log line. The same for an uninterrupted start of the job (launch to first step) gives the
baseline: a restart costs about one start, plus the steps redone.

    python benchmarks/restart_cost.py            # gpt2-tiny and GPT-2 124M (gpt2-shakespeare)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu  # noqa: E402

MODELS = {  # preset, tokenizer, train.save_interval, --set keys that make a CPU step short
    "gpt2-tiny (29.6K params)": ("gpt2-tiny", "char", 200, ["train.total_batch_tokens=512"]),
    "GPT-2 124M": ("gpt2-shakespeare", "gpt2", 4, ["train.batch_size=1", "train.seq_len=64",
                                                  "train.total_batch_tokens=128", "optim.warmup_steps=2"]),
}


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    return max((json.loads(ln)["step"] for ln in lines if ln.strip().endswith("}")), default=-1)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def wait(predicate, timeout: float = 600, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(poll)
    return value


def measure(preset: str, data: Path, interval: int, sets: list[str], tmp: Path) -> dict:
    run = tmp / f"run-{preset}"
    cmd = [sys.executable, "-m", "gptforge", "train", "--nproc", "2", "--max-restarts", "1", "--data", str(data),
           "--out", str(run), "--preset", preset, "--set", "train.device=cpu", "--set", "train.dtype=float32",
           "--set", "train.log_interval=1", "--set", f"train.save_interval={interval}",
           "--set", "train.keep_last=1", "--set", "train.max_steps=1000000", "--set", "train.eval_interval=0",
           *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait(lambda: last_step(run) >= 0)
        first_start = time.monotonic() - started
        kill_at = interval + interval // 2  # steps done when rank 1 dies: half an interval lost
        wait(lambda: last_step(run) >= kill_at - 1)
        (agent,) = children(proc.pid)
        workers = children(agent)
        rank1 = max(workers, key=lambda w: Path(f"/proc/{w}/environ").read_bytes().count(b"RANK=1"))
        inode = (run / "metrics.jsonl").stat().st_ino
        ckpt = int((run / "checkpoints" / "latest").read_text().strip()[5:])
        os.kill(rank1, signal.SIGKILL)
        died = time.monotonic()
        # the restart rewrites metrics.jsonl up to its checkpoint (a new file), then logs that step
        wait(lambda: (run / "metrics.jsonl").stat().st_ino != inode)
        wait(lambda: last_step(run) >= ckpt)
        restart_s = time.monotonic() - died
    finally:
        proc.send_signal(signal.SIGTERM)  # forwarded to the agent and the workers: they stop
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    lost = re.search(r"(\d+) steps? done since then were lost", out)
    return {"first_start_s": first_start, "restart_s": restart_s, "lost": int(lost.group(1)) if lost else None}


def main() -> None:
    from gptforge.data import prepare
    from gptforge.data.named import bundled_path

    print(f"machine: {cpu()}")
    print(f"{'model':<26} {'start (s)':>10} {'death to first step (s)':>24} {'ratio':>6} "
          f"{'save_interval':>14} {'steps lost':>11}")
    with tempfile.TemporaryDirectory(prefix="restart-cost-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name, (preset, tokenizer, interval, sets) in MODELS.items():
            data = tmp / f"data-{tokenizer}"
            if not data.exists():
                prepare([str(bundled_path("shakespeare"))], str(data), tokenizer=tokenizer, val_fraction=0.1,
                        progress=False)
            r = measure(preset, data, interval, sets, tmp)
            print(f"{name:<26} {r['first_start_s']:>10.1f} {r['restart_s']:>24.1f} "
                  f"{r['restart_s'] / r['first_start_s']:>6.2f} {interval:>14} {r['lost']!s:>11}", flush=True)


if __name__ == "__main__":
    main()
