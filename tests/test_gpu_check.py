"""benchmarks/gpu_check.py --smoke: every step of the one-call GPU check, tiny, on the CPU, so the
check cannot rot between the GPU windows it is written for."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import shakespeare_head

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "pytest-gpu", "bench-64x1024", "bench-16x64", "shakespeare", "batch-auto",
         "generation", "hellaswag", "bench-ac"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    text = tmp / "input.txt"  # the real Tiny Shakespeare where the tests find it, else filler
    text.write_text(shakespeare_head(60_000), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GPTFORGE_CACHE": str(tmp / "cache")}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
                          str(tmp / "out"), "--shakespeare", str(text)],
                         capture_output=True, text=True, env=env, timeout=300)
    return out, json.loads((tmp / "out" / "gpu_check.json").read_text()), tmp / "out"


@pytest.mark.slow
def test_every_step_runs_and_reports(smoke):
    out, doc, where = smoke
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == STEPS and doc["smoke"] is True
    assert all(s["status"] == "ok" for s in doc["steps"]), [(s["name"], s["note"]) for s in doc["steps"]]
    f = {name: s["figures"] for name, s in steps.items()}
    assert f["environment"]["gpu"] is None and f["environment"]["torch"]
    assert f["pytest-gpu"]["skipped"] >= 4 and f["pytest-gpu"]["failed"] == f["pytest-gpu"]["error"] == 0
    for name in ("bench-64x1024", "bench-16x64", "bench-ac"):
        assert f[name]["tok_per_s"] > 0 and f[name]["peak_memory_gib"] > 0 and f[name]["mfu_measured"] > 0
    assert f["bench-ac"]["activation_checkpointing"] and not f["bench-16x64"]["activation_checkpointing"]
    assert f["shakespeare"]["steps"] == 2 and f["shakespeare"]["stopped_by"] == "max_steps"
    assert f["shakespeare"]["original_steps"] == 3533 and f["shakespeare"]["tok_per_s_median"] > 0
    # off CUDA, auto is the preset's micro-batch (gpt2-fineweb: 64), kept under 256 / 16 = 16
    assert f["batch-auto"]["gpt2_chosen"] == f["batch-auto"]["gpt2-medium_chosen"] == 16
    assert f["generation"]["batch_16_tok_per_s"] > 0 and f["generation"]["batch_1_tok_per_s"] > 0
    assert f["hellaswag"]["data"].startswith("generated examples") and f["hellaswag"]["batch_16_tok_per_s"] > 0
    table = (where / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in STEPS)
    assert "===== shakespeare: exit code 0" in (where / "gpu_check.log").read_text()


def load_check():
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def hangs(opts):
    time.sleep(120)


def fails(opts):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def half_done(opts):
    raise load_check().StepFailed("one of two runs failed", {"gpt2_chosen": 64})


def test_a_step_that_hangs_or_fails_loses_only_its_own_figures(tmp_path):
    """Each step is a forked child with its own limit: one that hangs is stopped (with whatever
    it started), one that raises is a failure with the end of its output, and what a failing
    step measured before failing is kept."""
    check = load_check()
    opts = check.Options(tmp_path, tmp_path, True, None, None)
    log = tmp_path / "gpu_check.log"
    t0 = time.monotonic()
    hung = check.run_step(check.Step("hang", "sleeps", 60, hangs), opts, 0.5, log)
    assert hung.status == "timeout" and time.monotonic() - t0 < 20
    failed = check.run_step(check.Step("fail", "raises", 60, fails), opts, 30, log)
    assert failed.status == "failed" and "illegal memory access" in failed.note
    partial = check.run_step(check.Step("partial", "half", 60, half_done), opts, 30, log)
    assert (partial.status, partial.figures) == ("failed", {"gpt2_chosen": 64})
    text = log.read_text()
    assert "===== hang: timed out" in text and "===== fail: exit code 1" in text
    check.write_results(opts, [hung, failed, partial], time.time(), 540)
    assert "| hang | sleeps | timeout |" in (tmp_path / "gpu_check.md").read_text()
