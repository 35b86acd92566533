"""How often a finished 2-rank DDP run aborts at exit: one pytest test run N times, failures counted.

    python benchmarks/teardown_rate.py --runs 20 --chunk 5

Each run is ``python -m pytest -n0 -q TEST`` in a fresh process (the default TEST is the one that
aborted about one suite run in five: tests/test_distributed.py::test_muon_under_ddp_equals_one_process).
Runs go in chunks of ``--chunk``, each chunk under the shared CPU lock (``--lock``), released in
between so that other work on the machine gets the CPU. ``--load K`` runs K busy-looping processes
beside each chunk, as the suite's other xdist worker loads the machine (the abort was seen in full
suite runs, one in five, and not in runs of the test alone). A failed run is classed by what its output
holds: "terminate called" (the gloo teardown abort of issue 31) or anything else. Prints the machine
line, one line a run, and the totals.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_distributed.py::test_muon_under_ddp_equals_one_process"


@contextmanager
def locked(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def busy(k: int):
    """K processes spinning on the CPU for the duration."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def one_run(test: str) -> tuple[str, float]:
    """``ok``, ``abort`` (terminate called) or ``other``, and the run's seconds."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "pytest", "-n0", "-q", "-p", "no:cacheprovider", test],
                         cwd=ROOT, capture_output=True, text=True)
    dt = time.time() - t0
    if out.returncode == 0:
        return "ok", dt
    text = out.stdout + out.stderr
    sys.stderr.write(text[-6000:])  # what failed, for the record
    return ("abort" if "terminate called" in text else "other"), dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--chunk", type=int, default=5)
    p.add_argument("--lock", default="/tmp/gptforge-cpu.lock")
    p.add_argument("--test", default=TEST)
    p.add_argument("--load", type=int, default=0, help="busy-looping processes beside each run")
    args = p.parse_args()
    print(f"machine: {cpu()}")
    print(f"test: {args.test}, {args.runs} runs in chunks of {args.chunk}, "
          f"{args.load} busy processes beside", flush=True)
    counts = {"ok": 0, "abort": 0, "other": 0}
    done = 0
    while done < args.runs:
        with locked(args.lock), busy(args.load):
            for _ in range(min(args.chunk, args.runs - done)):
                result, dt = one_run(args.test)
                counts[result] += 1
                done += 1
                print(f"run {done}: {result} ({dt:.1f} s)", flush=True)
    failed = counts["abort"] + counts["other"]
    print(f"failed {failed}/{args.runs} ({counts['abort']} teardown aborts, {counts['other']} other)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
