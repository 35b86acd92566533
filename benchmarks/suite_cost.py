"""What the test suite costs on this machine, and which tests cost it: for deciding what to trim.

Runs the README's test command (``python -m pytest``, one worker per core) in this checkout,
``--repeats`` times, and reports for each run its wall time and the CPU time the whole machine
spent meanwhile (from /proc/stat: the workers, every process they start, and anything else
running, so run it on an idle machine). With ``--per-test``, a small pytest plugin (the
``plugin`` half of this file, loaded with ``-p``) adds up, for each test, the CPU time of its
worker and of the child processes the test waited for (torchrun jobs, the CLI in a process of
its own), and the slowest are listed. A child the test did not wait for (a server a fixture
started and killed) is counted where it was reaped, or not at all.

    python benchmarks/suite_cost.py                      # one run: wall and machine CPU
    python benchmarks/suite_cost.py --per-test --top 25  # and the 25 tests that cost the most CPU
    python benchmarks/suite_cost.py --repeats 3          # three runs, for the spread

To compare two revisions, alternate runs of each on the same idle machine: ``--repo DIR`` runs
the suite of another checkout (which needs nothing beside it), with its own
``src`` first on the path:

    for r in ../base ../main ../base ../main; do python benchmarks/suite_cost.py --repo $r; done
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG_ENV = "GPTFORGE_SUITE_COST_LOG"


# ----------------------------------------------------------------------------------------------
# The plugin (loaded by pytest in every worker as ``-p suite_cost``)


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


try:
    import pytest
except ImportError:  # the measuring side needs no pytest of its own
    pytest = None

if pytest is not None:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        log = os.environ.get(LOG_ENV)
        own, children = _cpu_s(resource.RUSAGE_SELF), _cpu_s(resource.RUSAGE_CHILDREN)
        yield
        if log:
            own, children = _cpu_s(resource.RUSAGE_SELF) - own, _cpu_s(resource.RUSAGE_CHILDREN) - children
            with open(log, "a", encoding="utf-8") as f:  # one short line per test: appends do not mix
                f.write(f"{own:.2f}\t{children:.2f}\t{item.nodeid}\n")


# ----------------------------------------------------------------------------------------------
# The measuring side


def machine_cpu_s() -> float:
    """CPU seconds the machine has spent so far (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def one_run(repo: Path, log: Path | None) -> tuple[float, float, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "benchmarks"), str(repo / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if log is not None:
        env[LOG_ENV] = str(log)
        args += ["-p", "suite_cost"]
    cpu0, t0 = machine_cpu_s(), time.perf_counter()
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - t0, machine_cpu_s() - cpu0
    summary = next((ln for ln in reversed(done.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", ln)),
                   f"pytest exit code {done.returncode}")
    return wall, cpu, summary.strip("= ")


def per_test_table(log: Path, top: int) -> list[str]:
    rows = []
    for line in log.read_text(encoding="utf-8").splitlines():
        own, children, nodeid = line.split("\t", 2)
        rows.append((float(own) + float(children), float(own), float(children), nodeid))
    rows.sort(reverse=True)
    total, own, children = (sum(r[i] for r in rows) for i in range(3))
    heading = (f"per test, CPU seconds (worker + waited-for children): {total:.1f} = {own:.1f} + "
               f"{children:.1f}, {len(rows)} tests")
    out = [heading, "", "| CPU s | worker | children | test |", "|---:|---:|---:|---|"]
    out += [f"| {t:.1f} | {o:.1f} | {c:.1f} | {n} |" for t, o, c, n in rows[:top]]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose suite runs (default: this one)")
    p.add_argument("--repeats", type=int, default=1, help="runs of the whole suite (default 1)")
    p.add_argument("--per-test", action="store_true", help="also the CPU time of each test (last run)")
    p.add_argument("--top", type=int, default=25, help="how many of the costliest tests to list (default 25)")
    args = p.parse_args()
    if args.repeats < 1 or args.top < 1:
        p.error("--repeats and --top must be at least 1")
    repo = args.repo.resolve()
    if not (repo / "tests").is_dir() or not (repo / "src" / "gptforge").is_dir():
        p.error(f"--repo {args.repo}: not a gptforge checkout (no tests/ and src/gptforge/ there)")
    from machine import (
        cpu,  # the CPU line every benchmark prints (not needed by the plugin)
    )

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=False)
    print(f"suite of {repo} ({head.stdout.strip() or 'not a git checkout'}); machine: {cpu()}; "
          f"python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "per-test.tsv" if args.per_test else None
        for i in range(args.repeats):
            if log is not None and log.exists():
                log.unlink()
            wall, cpu, summary = one_run(repo, log)
            print(f"run {i + 1}: {summary}; wall {wall:.1f} s, machine CPU {cpu:.1f} s")
        if log is not None and log.exists():
            print("\n".join(["", *per_test_table(log, args.top)]))


if __name__ == "__main__":
    main()
