"""CUDA checks: flash attention under compile, CUDA vs CPU parity, exact resume, NCCL DDP and FSDP,
activation checkpointing (memory saved, compiled), batch_size=auto's search, a real out of memory.

Marked ``gpu`` and skipped, with the reason, where no CUDA device is visible (CI, the CPU
machines). Every GPU path also has logic the CPU tests exercise; these check what only a GPU can.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import quiet, tiny_cfg

from gptforge import GPT, GPTConfig
from gptforge.config import OptimConfig
from gptforge.metrics import read_metrics
from gptforge.optim import build_optimizer
from gptforge.step import train_step
from gptforge.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SRC = Path(__file__).resolve().parents[1] / "src"


def test_a_compiled_bf16_step_runs_flash_attention():
    """Fails (no kernel available) if flash attention cannot run this model under compile."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50257, pad_vocab_multiple=64)).cuda()
    optimizer = build_optimizer(model, OptimConfig(), "cuda")
    step_model = torch.compile(model)
    x = torch.randint(0, 50257, (4, 64), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for _ in range(3):
            result = train_step(step_model, optimizer, lambda: (x, x.roll(-1, 1)), 1, 1.0,
                                lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    assert torch.isfinite(result.loss) and not bool(result.bad)


def test_cuda_and_cpu_losses_agree(char_data, tmp_path):
    """The same run (fp32, same padding, eager) on both devices: TF32 matmuls on CUDA round to
    10-bit mantissas, so the losses agree to about 1e-3, not bit for bit."""
    losses = {}
    for dev in ("cpu", "cuda"):
        cfg = tiny_cfg(char_data, "train.max_steps=20", "train.log_interval=1", f"train.device={dev}",
                       "model.pad_vocab_multiple=1", "train.compile=false")
        train(cfg, tmp_path / dev, log=quiet)
        losses[dev] = [r["loss"] for r in read_metrics(tmp_path / dev / "metrics.jsonl") if "loss" in r]
    for a, b in zip(losses["cpu"], losses["cuda"]):
        assert b == pytest.approx(a, rel=5e-3)


RESUME_SCRIPT = """
import json, sys, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
torch.use_deterministic_algorithms(True)
from gptforge.checkpoint import build_model, load_checkpoint
from gptforge.presets import resolve
from gptforge.metrics import read_metrics
from gptforge.train import train
data, out = sys.argv[1], sys.argv[2]
def cfg(steps):
    return resolve("gpt2-tiny", None, [f"data.path={data}", "train.device=cuda", "train.compile=false",
                                       f"train.max_steps={steps}", "train.log_interval=1",
                                       "train.total_batch_tokens=512"])
quiet = lambda line: None
with sdpa_kernel(SDPBackend.MATH):  # flash attention's backward adds with atomics: not bitwise
    train(cfg(12), f"{out}/full", log=quiet)
    train(cfg(6), f"{out}/half", log=quiet)
    ckpt = load_checkpoint(f"{out}/half")
    resumed = ckpt.config
    resumed.train.max_steps = 12
    train(resumed, f"{out}/half", resume=ckpt, log=quiet)
key = lambda r: (r["step"], r.get("loss"), r.get("norm"))
a = [key(r) for r in read_metrics(f"{out}/full/metrics.jsonl") if "loss" in r]
b = [key(r) for r in read_metrics(f"{out}/half/metrics.jsonl") if "loss" in r]
wa = build_model(load_checkpoint(f"{out}/full")).state_dict()
wb = build_model(load_checkpoint(f"{out}/half")).state_dict()
print(json.dumps({"losses": a == b and len(a) == 12, "weights": all(torch.equal(wa[k], wb[k]) for k in wa)}))
"""


def test_resume_is_bit_identical_on_cuda(char_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(char_data), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"losses": True, "weights": True}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_nccl_ddp_and_fsdp_equal_one_process(char_data, tmp_path, parallel):
    from test_distributed import COMMON, gptforge, losses

    args = ["--data", str(char_data), *COMMON, "--set", "train.max_steps=8", "--set", "train.device=cuda",
            "--set", "train.compile=false"]
    gptforge("--out", str(tmp_path / "one"), *args)
    gptforge("--out", str(tmp_path / parallel), *args, "--set", f"train.parallel={parallel}", nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / parallel)
    assert [s for s, _, _ in one] == [s for s, _, _ in two]
    for (_, a, va), (_, b, vb) in zip(one, two):
        assert (a is None) == (b is None) and (a is None or b == pytest.approx(a, rel=1e-3))
        assert (va is None) == (vb is None) and (va is None or vb == pytest.approx(va, rel=1e-3))


def test_activation_checkpointing_saves_memory_and_runs_compiled_on_cuda(char_data, tmp_path):
    """Eager: the same loss with less peak memory. Compiled (the recomputation inside the
    compiled graph): the same losses as an eager run without it."""
    from gptforge.distributed import checkpoint_blocks

    peaks, losses = {}, {}
    x = torch.randint(0, 256, (16, 256), device="cuda")
    for on in (False, True):
        torch.manual_seed(0)
        # a small vocabulary, so that the blocks' activations (not the logits) dominate memory
        model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=256)).cuda()
        if on:
            checkpoint_blocks(model)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x.roll(-1, 1))
        loss.backward()
        torch.cuda.synchronize()
        peaks[on], losses[on] = torch.cuda.max_memory_allocated(), loss.item()
        del model, loss
    assert losses[True] == losses[False] and peaks[True] < 0.8 * peaks[False], (losses, peaks)
    runs = {}
    for name, extra in (("eager", ["train.compile=false"]),
                        ("compiled-ac", ["train.compile=true", "train.activation_checkpointing=true"])):
        cfg = tiny_cfg(char_data, "train.max_steps=6", "train.log_interval=1", "train.device=cuda", *extra)
        train(cfg, tmp_path / name, log=quiet)
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    for a, b in zip(runs["eager"], runs["compiled-ac"]):
        assert b == pytest.approx(a, rel=2e-3)


def test_batch_size_auto_searches_on_cuda_and_restores_the_random_state():
    from gptforge import memory
    from gptforge.device import Precision
    from gptforge.distributed import DistEnv
    from gptforge.presets import resolve
    from gptforge.step import fit_micro_batch

    cfg = resolve("gpt2-tiny", None, ["model.vocab_size=50257", "train.batch_size=auto", "train.device=cuda"])
    cfg.model.pad_vocab_multiple = 64
    env, precision = DistEnv(device=torch.device("cuda")), Precision(torch.device("cuda"), torch.bfloat16)
    before = torch.cuda.get_rng_state()
    size, note = fit_micro_batch(cfg, env, precision, "gpt2-tiny")
    assert size == 8 and note.startswith("8, the largest that fits (trials:")  # 256 tokens: 8 x 32 at most
    assert torch.equal(torch.cuda.get_rng_state(), before)
    old = memory.HEADROOM
    memory.HEADROOM = 1e-9  # every trial is "over the headroom"
    try:
        with pytest.raises(Exception, match="not even a micro-batch of 1 x 32 tokens fits on cuda"):
            fit_micro_batch(cfg, env, precision, "gpt2-tiny")
    finally:
        memory.HEADROOM = old


def test_a_real_out_of_memory_is_one_line(char_data, tmp_path):
    """A micro-batch far beyond any GPU's memory: one line naming it, exit code 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-m", "gptforge", "train", "--data", str(char_data), "--out", str(tmp_path / "run"),
         "--preset", "gpt2-tiny", "--set", "train.device=cuda", "--set", "train.compile=false",
         "--set", "model.n_embd=1024", "--set", "model.n_head=8", "--set", "data.loader=random",
         "--set", "train.batch_size=65536", "--set", "train.seq_len=64",
         "--set", "train.total_batch_tokens=4194304", "--set", "train.max_steps=1"],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "out of memory on cuda" in out.stderr and "micro-batch of 65536 x 64 tokens" in out.stderr
    assert "GiB allocated of the GPU's" in out.stderr and "no checkpoint was saved" in out.stderr
