"""torchrun on the CPU with gloo: DDP and FSDP2 equal one process, checkpoints cross over."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_checkpoint import weights
from test_train import ended_with_the_test, run_cli, wait_for

from gptforge.checkpoint import load_checkpoint
from gptforge.metrics import read_metrics

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

SRC = Path(__file__).resolve().parents[1] / "src"
COMMON = ["--preset", "gpt2-tiny", "--set", "train.device=cpu", "--set", "train.dtype=float32",
          "--set", "train.log_interval=1", "--set", "train.total_batch_tokens=512",
          "--set", "train.eval_interval=4", "--set", "train.save_interval=4", "--set", "train.keep_last=5",
          # the head and loss in slices of 48 positions (several per micro-batch, the last one
          # short), so that DDP and FSDP2 run the sliced loss against one process running it
          "--set", "train.loss_slice_tokens=48"]




def gptforge(*args: str, nproc: int = 1, timeout: int = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gptforge", "train", *args]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def one_process(*args: str) -> None:
    """``gptforge train ARGS`` in one process: this one, which has imported torch already."""
    assert run_cli("train", *args) == 0


def losses(run: Path) -> list[tuple[int, float, float | None]]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run / "metrics.jsonl")]


def assert_close_runs(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert [s for s, _, _ in la] == [s for s, _, _ in lb]
    for (_, x, vx), (_, y, vy) in zip(la, lb):
        assert (x is None) == (y is None) and (x is None or abs(x - y) < 1e-5)
        assert (vx is None) == (vy is None) and (vx is None or abs(vx - vy) < 1e-5)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)


# Imported by every process the audited runs start (PYTHONPATH): records each file operation
# under GPTFORGE_AUDIT_ROOT that changes something, in one log per torchrun rank.
AUDIT_HOOK = """
import os, sys
root, log = os.environ.get("GPTFORGE_AUDIT_ROOT"), os.environ.get("GPTFORGE_AUDIT_LOG")
if root and log and "RANK" in os.environ:
    out = open(f"{log}.{os.environ['RANK']}", "a", buffering=1)
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    changing = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.link",
                "os.truncate")
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            changes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & writes)
        elif event in changing and args:
            path, changes = args[0], True
        else:
            return
        if changes and isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(root):
            out.write(f"{event} {path}\\n")
    sys.addaudithook(hook)
"""


def audited(tmp_path: Path, root: Path) -> tuple[dict, Path]:
    """Environment for a run whose file writes under ``root`` are logged per rank."""
    hooks = tmp_path / "audit-hook"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = tmp_path / f"audit-{root.name}"
    return {"PYTHONPATH": f"{hooks}:{SRC}", "GPTFORGE_AUDIT_ROOT": str(root),
            "GPTFORGE_AUDIT_LOG": str(log)}, log


def assert_only_rank_0_wrote(log: Path) -> None:
    rank0 = Path(f"{log}.0").read_text()
    assert "metrics.jsonl" in rank0 and "checkpoints" in rank0 and "run.json" in rank0  # the hook works
    assert Path(f"{log}.1").exists() and Path(f"{log}.1").read_text() == ""


@pytest.mark.slow
def test_ddp_and_fsdp_equal_one_process_and_checkpoints_cross_over(char_data, tmp_path, monkeypatch):
    d = ["--data", str(char_data)]
    # reference: one process, 2 accumulation steps per optimizer step
    one_process("--out", str(tmp_path / "one"), *d, *COMMON, "--set", "train.max_steps=8")
    # DDP: 2 processes, 1 accumulation step each, the same global batch; only rank 0 writes, and
    # only rank 0 logs to the trackers (W&B offline and MLflow write inside the audited RUN here)
    env, log = audited(tmp_path, tmp_path / "ddp")
    mlruns = tmp_path / "ddp" / "mlruns"
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_TRACKING_URI=mlruns.as_uri())
    gptforge("--out", str(tmp_path / "ddp"), *d, *COMMON, "--set", "train.max_steps=8",
             *(f"--set=train.{t}=true" for t in ("tensorboard", "wandb", "mlflow")), nproc=2, env=env)
    assert_close_runs(tmp_path / "one", tmp_path / "ddp")
    assert_only_rank_0_wrote(log)
    rank0 = Path(f"{log}.0").read_text()
    assert all(str(tmp_path / "ddp" / name) in rank0 for name in ("tensorboard", "wandb", "mlruns"))
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only so
    client = MlflowClient(tracking_uri=mlruns.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("gptforge").experiment_id])
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history == [(s, x) for s, x, _ in losses(tmp_path / "ddp") if x is not None]
    ckpt = load_checkpoint(tmp_path / "ddp")
    assert ckpt.trainer["world_size"] == 2 and len(ckpt.trainer["rng_ranks"]) == 2
    # DDP resumed with 2 ranks from its step-4 checkpoint is bit-identical to DDP straight through,
    # with activation checkpointing switched on for the second half too (it recomputes the same
    # numbers)
    step4 = tmp_path / "ddp" / "checkpoints" / "step_0000004"
    gptforge("--out", str(tmp_path / "ddp-resumed"), "--resume", str(step4), "--set", "train.max_steps=8",
             "--set", "train.activation_checkpointing=true",
             *(f"--set=train.{t}=false" for t in ("tensorboard", "wandb", "mlflow")), nproc=2)
    assert losses(tmp_path / "ddp-resumed") == [r for r in losses(tmp_path / "ddp") if r[0] >= 4]
    wa, wb = weights(tmp_path / "ddp"), weights(tmp_path / "ddp-resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # FSDP: 2 processes, sharded; its checkpoints hold full weights with GPT-2 names
    env, log = audited(tmp_path, tmp_path / "fsdp")
    gptforge("--out", str(tmp_path / "fsdp"), *d, *COMMON, "--set", "train.max_steps=4",
             "--set", "train.parallel=fsdp", nproc=2, env=env)
    assert_only_rank_0_wrote(log)
    # ... and an FSDP checkpoint resumes in one process,
    one_process("--out", str(tmp_path / "fsdp"), "--resume", "--set", "train.max_steps=8",
                "--set", "train.parallel=ddp")
    assert_close_runs(tmp_path / "one", tmp_path / "fsdp")
    # ... and a one-process checkpoint resumes under FSDP (with activation checkpointing).
    step4 = tmp_path / "one" / "checkpoints" / "step_0000004"
    # Every rank leaves FSDP's process group torn down before its exit (see distributed.shutdown)
    out = gptforge("--out", str(tmp_path / "one-to-fsdp"), "--resume", str(step4),
                   "--set", "train.max_steps=8", "--set", "train.parallel=fsdp",
                   "--set", "train.activation_checkpointing=true", nproc=2, env=probed(tmp_path))
    assert_released(out)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "one-to-fsdp")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)


# Imported by every process of the probed run (PYTHONPATH): with automatic garbage collection
# off, whatever train() leaves in a reference cycle stays alive; at exit each rank says how many
# DDP models are still alive, and which of the process group's gloo threads (gloo_tcp_loop,
# pt_gloo_runloop: they live as long as the C++ group) still run, read from /proc (Linux).
TEARDOWN_PROBE = """
import atexit, gc, os, sys
gc.disable()
def _report():
    from torch.nn.parallel import DistributedDataParallel
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    names = []
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []
    for task in tasks:
        try:
            names.append(open(f"/proc/self/task/{task}/comm").read().strip())
        except OSError:
            pass
    gloo = sorted(n for n in names if "gloo" in n)
    sys.stderr.write(f"probe: rank {os.environ['RANK']} exits with {alive} DDP models, gloo threads {gloo}\\n")
if "RANK" in os.environ:
    atexit.register(_report)
"""


def probed(tmp_path: Path) -> dict:
    """Environment for a run whose ranks report at exit what holds on to the process group."""
    hooks = tmp_path / "probe-hook"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(TEARDOWN_PROBE)
    return {"PYTHONPATH": f"{hooks}:{SRC}"}


def assert_released(out: subprocess.CompletedProcess) -> None:
    """Every rank released the process group before its exit: no DDP model alive, no gloo thread
    running (a group torn down in the interpreter's finalization aborted a rank now and then)."""
    probes = sorted(line for line in out.stderr.splitlines() if line.startswith("probe: "))
    assert probes == [f"probe: rank {r} exits with 0 DDP models, gloo threads []" for r in (0, 1)], \
        out.stderr[-2000:]


@pytest.mark.slow
def test_muon_under_ddp_equals_one_process(char_data, tmp_path):
    """Every rank orthogonalizes the same all-reduced gradients, so DDP == one process. And each
    rank has released its DDP model (which holds the process group) by the time train()
    returns: one left to the interpreter's exit tears gloo down there, where a rank sometimes
    aborted ("terminate called without an active exception") after a finished run."""
    d = ["--data", str(char_data), *COMMON, "--set", "train.max_steps=6", "--set", "optim.name=muon"]
    one_process("--out", str(tmp_path / "one"), *d)
    out = gptforge("--out", str(tmp_path / "ddp"), *d, nproc=2, env=probed(tmp_path))
    assert_close_runs(tmp_path / "one", tmp_path / "ddp")
    assert_released(out)


def parents() -> dict[int, int]:
    """Every live (not zombie) process's parent, from /proc (test_multinode uses it too)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                out[int(stat.parent.name)] = int(fields[1])
    return out


def children(pid: int) -> list[int]:
    return [child for child, parent in parents().items() if parent == pid]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
@pytest.mark.slow
def test_a_dead_rank_stops_the_job_and_the_run_resumes(char_data, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptforge", "train", "--out", str(run), "--data", str(char_data), *COMMON,
         "--set", "train.max_steps=100000", "--set", "train.save_interval=2",
         "--set", "train.dist_timeout_s=30", "--nproc", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    with ended_with_the_test(proc, group=True):
        wait_for((run / "checkpoints" / "latest").exists, "the job to start and save", timeout=90, poll=0.2)
        workers = [w for t in children(proc.pid) for w in children(t)]
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        started = time.time()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - started < 60  # taken down, not hanging until a timeout
    assert "Signals.SIGKILL" in err or "SIGKILL" in err or "exitcode" in err, err[-2000:]
    # The end is one line, not torchrun's ChildFailedError traceback: which rank, how, the last
    # checkpoint and the command that continues; the exit code a shell gives a SIGKILLed process.
    last = err.strip().splitlines()[-1]
    assert last.startswith("gptforge train: error: rank 1 was killed by SIGKILL"), err[-2000:]
    assert "its last checkpoint is " in last and last.endswith("--nproc 2 --resume auto")
    assert proc.returncode == 128 + signal.SIGKILL and "Traceback" not in err and "ChildFailedError" not in err
    for w in workers:
        assert not Path(f"/proc/{w}").exists() or "Z" in Path(f"/proc/{w}/stat").read_text().split()[2]
    step = load_checkpoint(run).step
    gptforge("--out", str(run), "--resume", "--set", f"train.max_steps={step + 2}", nproc=2)
    assert load_checkpoint(run).step == step + 2


# ----------------------------------------------------------------------------------------------
# Gradient sync: once per optimizer step, not once per micro-step


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One of two gloo processes, started once for both tests below (each start imports torch
    again): the DDP micro-steps, then the sharded Muon steps."""
    from gptforge.distributed import DistEnv, shutdown

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    env = DistEnv(rank=rank, world_size=world)
    _two_ddp_steps(env, out_dir)
    torch.save(_muon_steps(shard=(rank, world)), f"{out_dir}/muon{rank}.pt")
    _settle_dtype(env, out_dir)
    # As train() does: the DDP module is gone (it holds the process group) and the ranks meet
    # before the group is torn down; otherwise gloo can abort a rank at exit.
    shutdown(env)


def _two_ddp_steps(env, out_dir: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from gptforge import GPT, GPTConfig
    from gptforge.distributed import grad_sync, mean_over_ranks, wrap_model
    from gptforge.step import train_step

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50))
    ddp = wrap_model(model, env, "ddp")
    reduced: list[int] = []  # the index of every gradient bucket all-reduced

    def counting_hook(state, bucket):
        reduced.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, counting_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # look at the gradients only
    g = torch.Generator().manual_seed(100 + env.rank)
    batches = [(torch.randint(0, 50, (4, 16), generator=g), torch.randint(0, 50, (4, 16), generator=g))
               for _ in range(4)]
    it = iter(batches)
    per_step = []
    for _ in range(2):  # 2 optimizer steps of 2 micro-steps each
        before = len(reduced)
        train_step(ddp, optimizer, lambda: next(it), 2, 0.0, contextlib.nullcontext,
                   grad_sync=lambda last: grad_sync(ddp, env, "ddp", last),
                   reduce_mean=lambda t: mean_over_ranks(t, env))
        per_step.append(reduced[before:])
    torch.save({"per_step": per_step, "batches": batches,
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()}},
               f"{out_dir}/rank{env.rank}.pt")


def _settle_dtype(env, out_dir: str) -> None:
    """train.dtype=auto with each rank's cache saying something else: rank 0's bf16, rank 1's fp32."""
    import json

    from gptforge.device import probe_shape
    from gptforge.presets import resolve
    from gptforge.probe import probe_key
    from gptforge.step import settle_dtype

    cfg = resolve("gpt2-tiny", None, ["model.vocab_size=50"])
    cache = Path(out_dir) / f"cache{env.rank}"
    cache.mkdir()
    said = "bfloat16" if env.rank == 0 else "float32"
    entry = {"dtype": said, "fp32_s": 1.0, "bf16_s": 1.0, "measured": "2026-12-07T00:00:00+00:00",
             "probe_s": 1.0}
    (cache / "probes.json").write_text(json.dumps(
        {"format": 1, "entries": {probe_key(probe_shape(cfg, env.world_size)): entry}}))
    os.environ["GPTFORGE_CACHE"] = str(cache)
    torch.save(settle_dtype(cfg, env), f"{out_dir}/dtype{env.rank}.pt")


@pytest.fixture(scope="module")
def gloo_ranks(tmp_path_factory) -> Path:
    """Where two gloo processes, spawned once for the module, left their results."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("gloo-ranks")
    mp.spawn(_gloo_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.xdist_group("gloo-ranks")  # one worker, one spawn of the two ranks
def test_ddp_all_reduces_once_per_optimizer_step(gloo_ranks):
    from gptforge import GPT, GPTConfig

    results = [torch.load(gloo_ranks / f"rank{r}.pt") for r in range(2)]
    for res in results:
        for buckets in res["per_step"]:
            # every bucket exactly once per step; all-reducing on each micro-step would double it
            assert buckets and sorted(buckets) == sorted(set(buckets)), res["per_step"]
    # ... and the gradient is that of the mean loss over both ranks' last step (4 micro-batches)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50))
    loss = sum(model(x, y)[1] for res in results for x, y in res["batches"][2:]) / 4
    loss.backward()
    for name, p in model.named_parameters():
        for res in results:
            torch.testing.assert_close(res["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _muon_steps(shard: tuple[int, int]) -> dict:
    """Two Muon steps on a tiny model with the same gradients everywhere (as DDP leaves them);
    returns the final weights and how many matrices this process orthogonalized."""
    from gptforge import GPT, GPTConfig
    from gptforge import optim as optim_module
    from gptforge.config import OptimConfig
    from gptforge.optim import build_optimizer

    done = []
    real = optim_module.orthogonalize

    def counted(stack, steps):
        done.append(stack.size(0))
        return real(stack, steps)

    optim_module.orthogonalize = counted
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50, n_layer=3))  # 3 blocks: uneven shares
    optimizer = build_optimizer(model, OptimConfig(name="muon"), "cpu", shard=shard)
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        optimizer.zero_grad()
        model(x, x.roll(-1, 1))[1].backward()
        optimizer.step()
    optim_module.orthogonalize = real
    return {"weights": model.state_dict(), "matrices": sum(done)}


@pytest.mark.xdist_group("gloo-ranks")  # one worker, one spawn of the two ranks
def test_muon_ranks_share_the_orthogonalization(gloo_ranks):
    alone = _muon_steps(shard=(0, 1))
    ranks = [torch.load(gloo_ranks / f"muon{r}.pt") for r in range(2)]
    # 3 blocks x 4 matrices of 4 shapes: 3 of each shape per step alone, 2 per rank (rank 1: 1 + padding)
    assert alone["matrices"] == 2 * 12 and all(r["matrices"] == 2 * 8 for r in ranks)
    for r in ranks:
        for k, v in alone["weights"].items():
            torch.testing.assert_close(r["weights"][k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.xdist_group("gloo-ranks")  # one worker, one spawn of the two ranks
def test_rank_0_settles_the_dtype_and_every_rank_follows(gloo_ranks):
    settled = [torch.load(gloo_ranks / f"dtype{r}.pt", weights_only=False) for r in range(2)]
    assert [dtype for dtype, _ in settled] == ["bfloat16", "bfloat16"]
    assert settled[0][1] == settled[1][1] and settled[1][1].cached  # rank 0's cached answer
