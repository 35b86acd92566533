"""Everything gptforge needs a GPU to show, in one call of at most 9 minutes on one H100 or H200.

    python benchmarks/gpu_check.py --out DIR                # on the GPU machine
    python benchmarks/gpu_check.py --out DIR --smoke        # every step tiny, on the CPU (a test)

The steps, in order (docs/gpu-check.md says how to run it where a GPU is lent):

  environment     the GPU, driver, torch, CUDA, NCCL, cuDNN, Python
  pytest-gpu      python -m pytest -m gpu
  bench-64x1024   gptforge bench, GPT-2 124M at 64 x 1024 with the defaults (bf16, compiled):
                  tok/s, MFU against the data sheet's bf16 peak and against a matmul measured there,
                  peak memory; beside llm.c's ~470K tok/s on one H100
  bench-16x64     the same at the original recipe's 16 x 64
  shakespeare     gpt2-shakespeare on Tiny Shakespeare to a training loss under 0.09: steps (the
                  original took 3,533), wall time, tok/s
  batch-auto      train.batch_size=auto's choice for GPT-2 124M and gpt2-medium (350M) at 1024
  generation      tokens/s with the KV cache at batch 1 and 16 (GPT-2 124M, fp32 as `sample` runs)
  hellaswag       HellaSwag scoring rate; the real validation file if it is here (--hellaswag or
                  gptforge's cache), else generated examples of HellaSwag's lengths (said so)
  bench-ac        extra, if the budget leaves time: bench-64x1024 with activation checkpointing

How: each step runs in its own child process, forked from this one after torch and gptforge are
imported (once, not nine times) but before anything touched CUDA, so every step gets a fresh CUDA
context and its own memory. A child has its own time limit and process group: a step that fails,
hangs or runs out of memory is stopped and loses only its own figures, and the check goes on,
keeping to --budget-s as a whole (what no longer fits is skipped and said so). gptforge commands
run through the CLI's own entry point in the child. After every step DIR/gpu_check.json (every
figure, and the end of a failed step's output) and DIR/gpu_check.md (one table) are rewritten,
so a check cut short still leaves its results; DIR/gpu_check.log holds every step's output.

Speed does not depend on the weights, so every model is randomly initialised: nothing is
downloaded and no network is needed. gptforge runs from this checkout's src/ (no install).
Tiny Shakespeare comes from `gptforge prepare shakespeare`, or from --shakespeare FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_STEPS = 3533  # the original notebook reached a loss under 0.09 after this many steps
LLMC_TOK_S = 470_000  # llm.c's GPT-2 124M training throughput on one H100, bf16


@dataclass
class Options:
    out: Path
    work: Path  # scratch: prepared data, runs, the steps' figure files
    smoke: bool
    shakespeare: str | None
    hellaswag: str | None


class StepFailed(Exception):
    """A step that ran but did not succeed; ``figures`` are what it measured anyway."""

    def __init__(self, message: str, figures: dict[str, Any]):
        super().__init__(message)
        self.figures = figures


@dataclass
class Step:
    name: str
    what: str
    timeout_s: int  # on the GPU; under --smoke each step takes seconds
    run: Callable[[Options], dict[str, Any]]  # in the child: the step's figures
    extra: bool = False  # only if the budget leaves most of timeout_s for it


@dataclass
class Result:
    name: str
    what: str
    status: str  # ok, failed, timeout, skipped
    seconds: float
    figures: dict[str, Any]
    note: str = ""


# ----------------------------------------------------------------------------------------------
# The steps (each runs in its own child process)


def gptforge(*argv: str) -> tuple[int, str]:
    """``gptforge ARGV`` through the CLI's entry point, in this process: its exit code and what
    it printed (echoed too, into the log)."""
    from gptforge.cli import main

    class Tee(io.StringIO):
        def write(self, s: str) -> int:
            sys.__stdout__.write(s)
            return super().write(s)

    out = Tee()
    print("$ gptforge " + " ".join(argv), flush=True)
    with contextlib.redirect_stdout(out):
        try:
            main(list(argv))
        except SystemExit as e:
            return int(e.code or 0), out.getvalue()
    return 0, out.getvalue()


def environment(opts: Options) -> dict[str, Any]:
    import torch

    import gptforge

    figures: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "gptforge": gptforge.__version__, "cpu_count": os.cpu_count()}
    if not torch.cuda.is_available():
        return {**figures, "gpu": None, "cuda": torch.version.cuda}
    props = torch.cuda.get_device_properties(0)
    figures.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                   memory_gib=round(props.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())), bf16=torch.cuda.is_bf16_supported())
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        figures["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    return figures


class Outcomes:
    """A pytest plugin that keeps the session's counts and failed test ids."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.failed: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for outcome in ("passed", "failed", "skipped", "error"):
            reports = terminalreporter.stats.get(outcome, [])
            self.counts[outcome] = len(reports)
            if outcome in ("failed", "error"):
                self.failed += [getattr(r, "nodeid", "") or str(getattr(r, "longrepr", ""))[:200]
                                for r in reports]


def pytest_gpu(opts: Options) -> dict[str, Any]:
    import pytest

    # Inside the suite (this check's smoke test) only the GPU tests' file is collected, and it
    # all skips on the CPU; on the GPU machine, every test marked gpu.
    where = ["tests/test_gpu.py"] if opts.smoke else []
    outcomes = Outcomes()
    code = pytest.main(["-o", "addopts=", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                        *where], plugins=[outcomes])
    figures = {**outcomes.counts, "exit_code": int(code), "failures": outcomes.failed[:10]}
    if code not in (0,) or outcomes.counts.get("failed") or outcomes.counts.get("error"):
        raise StepFailed(f"pytest -m gpu: exit code {int(code)}", figures)
    return figures


def bench(batch: int, seq: int, *extra: str) -> Callable[[Options], dict[str, Any]]:
    def step(opts: Options) -> dict[str, Any]:
        shape = (["--preset", "gpt2-tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "1",
                  "--device", "cpu", "--peak-seconds", "0.05"] if opts.smoke else
                 ["--preset", "gpt2", "--batch-size", str(batch), "--seq-len", str(seq), "--steps", "20",
                  "--warmup", "3"])
        path = opts.work / f"bench-{batch}x{seq}{''.join(extra)}.json"
        code, _ = gptforge("bench", *shape, *extra, "--json", str(path))
        if code:
            raise StepFailed(f"gptforge bench: exit code {code}", {})
        (r,) = json.loads(path.read_text())
        achieved, measured = r["achieved_tflops"], r["measured_peak_tflops"]
        return {"card": r["card"] or r["device"], "precision": r["precision"],
                "micro_batch": f"{r['batch_size']} x {r['seq_len']}", "tok_per_s": round(r["tokens_per_s"]),
                "step_ms": round(r["step_ms"], 2), "tflops": round(achieved, 1),
                "mfu_datasheet": round(r["mfu"], 4), "peak_tflops_datasheet": round(r["peak_tflops"], 1),
                "measured_matmul_tflops": round(measured, 1),
                "mfu_measured": round(achieved / measured, 4) if measured else None,
                "peak_memory_gib": round(r["peak_memory_mb"] / 1024, 2), "startup_s": round(r["startup_s"], 1),
                "activation_checkpointing": r["activation_checkpointing"],
                "vs_llm_c_h100": round(r["tokens_per_s"] / LLMC_TOK_S, 3)}
    return step


def prepared_shakespeare(opts: Options) -> Path:
    """Tiny Shakespeare with GPT-2's BPE, all of it for training as the original used it; made
    once per check (the batch-auto step reuses it)."""
    data = opts.work / "shakespeare"
    if (data / "meta.json").is_file():
        return data
    source = opts.shakespeare or "shakespeare"
    code, _ = gptforge("prepare", source, "--out", str(data), "--val-fraction", "0",
                       *(["--max-tokens", "4000", "--workers", "1"] if opts.smoke else []))
    if code:
        raise StepFailed(f"gptforge prepare {source}: exit code {code}", {})
    return data


# the --smoke model and batch: seconds on the CPU
TINY = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=16",
        "--set", "model.block_size=16", "--set", "train.seq_len=16", "--set", "train.device=cpu"]


def shakespeare(opts: Options) -> dict[str, Any]:
    data = prepared_shakespeare(opts)
    run = opts.work / "run-shakespeare"
    shutil.rmtree(run, ignore_errors=True)
    limits = (TINY + ["--set", "train.batch_size=2", "--set", "train.total_batch_tokens=64",
                      "--set", "train.max_steps=2"] if opts.smoke else
              ["--set", "train.max_steps=5000"])  # a cap past the original's 3,533, inside the time limit
    t0 = time.perf_counter()
    code, out = gptforge("train", "--data", str(data), "--out", str(run), "--preset", "gpt2-shakespeare", *limits)
    wall = time.perf_counter() - t0
    if not (run / "metrics.jsonl").is_file():
        raise StepFailed(f"gptforge train: exit code {code}", {"wall_s": round(wall, 1)})
    figures = shakespeare_figures(run, out, wall)
    if code:  # stopped (at the step's time limit: SIGTERM) or failed: what it reached so far
        raise StepFailed(f"gptforge train: exit code {code}", figures)
    return figures


def shakespeare_figures(run: Path, out: str, wall: float) -> dict[str, Any]:
    record = json.loads((run / "run.json").read_text())
    logged = [json.loads(ln).get("tok_per_s") for ln in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in logged if r][1:] or [r for r in logged if r]  # the first logged step compiles
    first = next((float(ln.split("took ")[1].split("s")[0]) for ln in out.splitlines()
                  if ln.startswith("torch.compile: the first step took")), None)
    steps, last = record.get("step") or 0, record.get("last_loss")
    return {"reached": record.get("stopped_by") == "target_loss", "stopped_by": record.get("stopped_by"),
            "steps": steps, "original_steps": ORIGINAL_STEPS, "steps_vs_original": round(steps / ORIGINAL_STEPS, 3),
            "last_loss": round(last, 4) if isinstance(last, (int, float)) else None, "wall_s": round(wall, 1),
            "train_wall_s": round(record.get("wall_s") or 0, 1), "first_step_s": first,
            "tok_per_s_median": round(statistics.median(rates)) if rates else None}


def batch_auto(opts: Options) -> dict[str, Any]:
    """gpt2-fineweb's batch keys (524,288 tokens per step of 1024-token sequences) with
    batch_size=auto, one step each: what the search chose, as the log and config.toml say."""
    data = prepared_shakespeare(opts)
    models = {"gpt2": [], "gpt2-medium": ["--set", "model.n_layer=24", "--set", "model.n_head=16",
                                          "--set", "model.n_embd=1024"]}
    figures: dict[str, Any] = {}
    for name, shape in models.items():
        run = opts.work / f"run-auto-{name}"
        shutil.rmtree(run, ignore_errors=True)
        small = TINY + ["--set", "train.total_batch_tokens=256"] if opts.smoke else shape
        code, out = gptforge("train", "--data", str(data), "--out", str(run), "--preset", "gpt2-fineweb", *small,
                             "--set", "train.batch_size=auto", "--set", "train.max_steps=1",
                             "--set", "train.compile=false", "--set", "train.hellaswag_interval=0",
                             "--set", "train.eval_interval=0",
                             "--set", "data.loader=random")  # random windows: any amount of data will do
        how = next((ln.split(": ", 1)[1] for ln in out.splitlines() if ln.startswith("train.batch_size=auto: ")), None)
        config = run / "config.toml"
        kept = next((ln.split("=")[1].strip() for ln in config.read_text().splitlines()
                     if ln.startswith("batch_size =")), None) if config.is_file() else None
        figures[f"{name}_chosen"] = int(kept) if kept and kept.isdigit() else None
        figures[f"{name}_how"] = how if code == 0 else f"exit code {code}"
    if any(figures[f"{name}_chosen"] is None for name in models):
        raise StepFailed("a batch_size=auto run failed", figures)
    return figures


def random_model(opts: Options) -> tuple[Any, Any]:
    """GPT-2 124M (gpt2-tiny under --smoke), random weights, on the GPU (--smoke: the CPU),
    padded as train pads it there."""
    import torch

    from gptforge import GPT, GPTConfig
    from gptforge.device import pick_device

    device = pick_device("cpu" if opts.smoke else "auto")
    torch.manual_seed(0)
    cfg = GPTConfig.preset("gpt2-tiny" if opts.smoke else "gpt2", pad_vocab_multiple=64 if device.type == "cuda" else 1)
    return GPT(cfg).to(device).eval(), device


def generation(opts: Options) -> dict[str, Any]:
    import torch

    from gptforge.generate import generate
    from gptforge.tokenizer import GPT2_EOT_ID

    model, device = random_model(opts)
    new = 4 if opts.smoke else 256
    figures: dict[str, Any] = {"device": str(device), "new_tokens": new, "precision": "float32"}
    for batch in (1, 16):
        prompt = torch.full((batch, 1), GPT2_EOT_ID, device=device)
        with torch.no_grad():
            generate(model, prompt, 4, top_k=1)  # warm-up: allocations, kernel choices
            t0 = time.perf_counter()
            out = generate(model, prompt, new, top_k=1)  # reads every token back: timed to the end
            seconds = time.perf_counter() - t0
        assert all(len(row) == new for row in out)
        figures[f"batch_{batch}_tok_per_s"] = round(batch * new / seconds, 1)
        figures[f"batch_{batch}_per_sequence_tok_per_s"] = round(new / seconds, 1)
    return figures


def hellaswag(opts: Options) -> dict[str, Any]:
    from gptforge import hellaswag as hs
    from gptforge.atomic import file_sha256
    from gptforge.data import default_cache_dir
    from gptforge.device import Precision

    model, device = random_model(opts)
    limit = 4 if opts.smoke else 1000
    path = opts.hellaswag or os.path.join(default_cache_dir(), hs.HELLASWAG_VAL.filename)
    real = os.path.isfile(path) and file_sha256(path) == hs.HELLASWAG_VAL.sha256
    if real:
        examples = hs.read_examples(path, limit=limit)
    else:  # HellaSwag's shape: half short (ActivityNet-like), half long (WikiHow-like) examples
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from hellaswag_speed import generated_examples

        examples = generated_examples(limit, seed=0)
    items = hs.render_examples(examples, model.config.block_size)
    # CUDA's rule for auto (bf16); the CPU of a --smoke run has no cached measurement for this
    # scoring, and --smoke checks that the step runs, not its speed
    precision = Precision.pick(device, "auto" if device.type == "cuda" else "float32")
    figures: dict[str, Any] = {
        "data": "the real validation file" if real else
                "generated examples of HellaSwag's lengths (the real file is not on this machine)",
        "examples": len(items), "precision": precision.label,
        "mean_row_tokens": round(sum(len(r) for it in items for r in it.rows) / (4 * len(items)), 1)}
    for batch in (4, 16):
        hs.score(model, items[:batch], batch_size=batch, device=device, amp=precision.autocast)  # warm-up
        r = hs.score(model, items, batch_size=batch, device=device, amp=precision.autocast)
        figures[f"batch_{batch}_examples_per_s"] = round(r.examples / r.wall_s, 1)
        figures[f"batch_{batch}_tok_per_s"] = round(r.tok_per_s)
        figures[f"batch_{batch}_full_val_s"] = round(hs.VAL_EXAMPLES * r.wall_s / r.examples, 1)
    return figures


STEPS = [
    Step("environment", "GPU, driver, torch, CUDA, NCCL", 60, environment),
    Step("pytest-gpu", "python -m pytest -m gpu", 200, pytest_gpu),
    Step("bench-64x1024", "gptforge bench: 124M, 64 x 1024, bf16, compiled", 150, bench(64, 1024)),
    Step("bench-16x64", "gptforge bench: 124M, 16 x 64 (the original's micro-batch)", 100, bench(16, 64)),
    Step("shakespeare", f"gpt2-shakespeare to a training loss < 0.09 (original: {ORIGINAL_STEPS:,} steps)",
         270, shakespeare),
    Step("batch-auto", "train.batch_size=auto at 1024: 124M and gpt2-medium", 150, batch_auto),
    Step("generation", "tokens/s with the KV cache, batch 1 and 16 (124M, fp32 as sample runs)", 60, generation),
    Step("hellaswag", "HellaSwag scoring rate (124M, bf16)", 60, hellaswag),
    Step("bench-ac", "bench-64x1024 with --activation-checkpointing", 120,
         bench(64, 1024, "--activation-checkpointing"), extra=True),
]


# ----------------------------------------------------------------------------------------------
# Running the steps, and writing what they gave


def child(step: Step, opts: Options, log_fd: int, figures_path: Path) -> None:
    """In the forked child: the step with its output in the log, its figures in a file; never
    returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a timeout stops whatever it started too
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
        os.chdir(ROOT)
        figures = step.run(opts)
        code = 0
    except StepFailed as e:
        figures = e.figures
        print(f"{step.name} failed: {e}")
    except BaseException:  # noqa: BLE001 - whatever it was, the log shows it and the step fails
        figures = {}
        traceback.print_exc()
    try:
        figures_path.write_text(json.dumps(figures), encoding="utf-8")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int, limit: float) -> int | None:
    """The child's exit code, or None if it ran past ``limit`` (then it and its group are stopped)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    # SIGTERM first: a training run then finishes its step and saves (train's StopFlag)
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return None
            time.sleep(0.1)
    return None


def run_step(step: Step, opts: Options, limit: float, log_path: Path) -> Result:
    figures_path = opts.work / f"figures-{step.name}.json"
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {step.name} (limit {limit:.0f}s)\n")
        start = log.tell()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    t0 = time.monotonic()
    sys.stdout.flush()  # nothing of ours left in a buffer that the child would write out again
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(step, opts, log_fd, figures_path)
    with contextlib.suppress(OSError):  # as the child does: whichever runs first
        os.setpgid(pid, pid)
    os.close(log_fd)
    code = wait(pid, limit)
    seconds = time.monotonic() - t0
    with open(log_path, "rb") as log:
        log.seek(start)
        output = log.read().decode(errors="replace")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {step.name}: {'timed out' if code is None else f'exit code {code}'} after {seconds:.1f}s\n")
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    if code is None:
        return Result(step.name, step.what, "timeout", seconds, figures,
                      f"stopped at its limit of {limit:.0f}s; last output: {tail(output)}")
    if code != 0:
        return Result(step.name, step.what, "failed", seconds, figures, f"exit code {code}; last output: {tail(output)}")
    return Result(step.name, step.what, "ok", seconds, figures)


def tail(output: str, lines: int = 8) -> str:
    return " | ".join(ln.strip()[:300] for ln in output.strip().splitlines()[-lines:])


def markdown(doc: dict[str, Any]) -> str:
    env = next((s["figures"] for s in doc["steps"] if s["name"] == "environment"), {})
    head = ", ".join(f"{k} {env[k]}" for k in ("gpu", "driver", "torch", "cuda", "nccl") if env.get(k))
    lines = [f"# gptforge GPU check{' (--smoke, on the CPU)' if doc['smoke'] else ''}", "",
             f"{doc['started']}; {head or 'no GPU'}; {doc['elapsed_s']:.0f}s of a {doc['budget_s']:.0f}s budget", "",
             "| step | what | status | s | figures |", "|---|---|---|---|---|"]
    for s in doc["steps"]:
        text = "; ".join(f"{k} {v}" for k, v in s["figures"].items() if v not in (None, [], ""))
        if s["note"]:
            text += ("; " if text else "") + s["note"]
        lines.append(f"| {s['name']} | {s['what']} | {s['status']} | {s['seconds']:.0f} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_results(opts: Options, results: list[Result], started: float, budget: float) -> None:
    doc = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), "smoke": opts.smoke,
           "budget_s": budget, "elapsed_s": round(time.time() - started, 1), "steps": [asdict(r) for r in results]}
    for name, text in (("gpu_check.json", json.dumps(doc, indent=2) + "\n"), ("gpu_check.md", markdown(doc))):
        tmp = opts.out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, opts.out / name)


def check(opts: Options, budget: float, started: float, only: list[str]) -> list[Result]:
    results: list[Result] = []
    log_path = opts.out / "gpu_check.log"
    log_path.write_text(f"gptforge GPU check, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))}\n")
    for step in STEPS:
        if only and step.name not in only:
            continue
        left = started + budget - time.time()
        limit = min(120 if opts.smoke else step.timeout_s, left)
        if limit < (0.6 * step.timeout_s if step.extra and not opts.smoke else 15):
            results.append(Result(step.name, step.what, "skipped", 0.0, {},
                                  f"{max(left, 0):.0f}s of the {budget:.0f}s budget were left"))
        else:
            results.append(run_step(step, opts, limit, log_path))
        write_results(opts, results, started, budget)
        print(f"{step.name}: {results[-1].status} ({results[-1].seconds:.0f}s)", flush=True)
    return results


def preload(smoke: bool) -> None:
    """What every step needs, imported once here (never touching CUDA), so the forked steps
    start at once. An import that fails here fails again in the steps that need it, and is
    reported there."""
    sys.path.insert(0, str(ROOT / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONUNBUFFERED"] = "1"
    if smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
    with contextlib.suppress(Exception):
        import pytest  # noqa: F401
        import torch
        import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: seconds)

        import gptforge.bench  # noqa: F401
        import gptforge.cli  # noqa: F401
        import gptforge.train  # noqa: F401
        from gptforge.tokenizer import get_tokenizer

        get_tokenizer("gpt2").encode("warm")  # GPT-2's BPE, built once from its files
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a forked child could not use CUDA then
        raise SystemExit("gpu_check: CUDA was initialized while importing; the steps need it fresh")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="where gpu_check.json, .md and .log go")
    p.add_argument("--smoke", action="store_true", help="every step tiny, on the CPU (seconds)")
    p.add_argument("--budget-s", type=float, default=540, help="the whole check's limit in seconds (default: 540)")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--shakespeare", default=None, metavar="FILE",
                   help="Tiny Shakespeare's input.txt (default: gptforge prepare shakespeare)")
    p.add_argument("--hellaswag", default=None, metavar="FILE", help="hellaswag_val.jsonl, if at hand")
    p.add_argument("--only", action="append", default=[], choices=[s.name for s in STEPS], metavar="STEP",
                   help="run only this step (repeatable), e.g. to rerun what failed")
    args = p.parse_args()
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    preload(args.smoke)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        opts = Options(args.out.resolve(), work.resolve(), args.smoke,
                       str(Path(args.shakespeare).resolve()) if args.shakespeare else None,
                       str(Path(args.hellaswag).resolve()) if args.hellaswag else None)
        results = check(opts, args.budget_s, started, args.only)
    print(f"wrote {args.out / 'gpu_check.md'}, gpu_check.json and gpu_check.log")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
