"""benchmarks/suite_cost.py: its pytest plugin counts each test's CPU, its children's apart."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "suite_cost.py"

TESTS = '''
import subprocess, sys

def test_idle():
    pass

def test_a_busy_child():
    subprocess.run([sys.executable, "-c", "sum(range(20_000_000))"], check=True)
'''


def load_script():
    spec = importlib.util.spec_from_file_location("suite_cost_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plugin_counts_each_tests_cpu_and_its_childrens(tmp_path):
    (tmp_path / "test_sample.py").write_text(TESTS, encoding="utf-8")
    log = tmp_path / "cost.tsv"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent), "GPTFORGE_SUITE_COST_LOG": str(log)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                           "-p", "suite_cost", str(tmp_path / "test_sample.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split("\t")[2]: [float(x) for x in line.split("\t")[:2]]
            for line in log.read_text().splitlines()}
    assert set(rows) == {"test_sample.py::test_idle", "test_sample.py::test_a_busy_child"}
    assert rows["test_sample.py::test_a_busy_child"][1] > 0.1  # the child's CPU, counted as a child's
    assert rows["test_sample.py::test_idle"][1] == 0
    table = load_script().per_test_table(log, top=1)
    assert table[0].endswith("2 tests") and len(table) == 5  # heading, blank, two header rows, one test
    assert table[-1].endswith("| test_sample.py::test_a_busy_child |")
