"""gptforge bench: the arithmetic behind its numbers (no speed is asserted)."""

import json

import pytest

from gptforge.bench import bench, cuda_card, flops_per_token, model_for
from gptforge.cli import main
from gptforge.config import GPTConfig


def test_flops_per_token_is_6n_plus_attention():
    # 6 x 124,439,808 + 12 x 12 layers x 768 x T
    assert flops_per_token(GPTConfig.preset("gpt2"), 64) == 6 * 124_439_808 + 12 * 12 * 768 * 64
    assert flops_per_token(GPTConfig.preset("gpt2"), 1024) == pytest.approx(0.8599e9, rel=1e-3)
    assert model_for("shakespeare-char").vocab_size == 65
    assert model_for("gpt2-shakespeare").n_layer == 12


def test_bench_on_data_builds_the_model_train_would_build(char_data):
    """With --data the model takes that data's vocabulary, as train does: a trained 8,192 BPE or
    a char set measured as GPT-2's 50,257 would time a different model."""
    from gptforge import GPT
    from gptforge.data import load_meta

    vocab = load_meta(char_data)["vocab_size"]
    r = bench("gpt2-tiny", batch_size=4, seq_len=16, steps=1, warmup=1, device="cpu",
              dtype="float32", peak_seconds=0.1, data=str(char_data))
    want = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab)).num_params()
    assert r.params == want and vocab < 100
    assert model_for("gpt2-mini", vocab_size=8192).vocab_size == 8192


def test_bench_reports_consistent_numbers():
    r = bench("gpt2-tiny", batch_size=4, seq_len=16, steps=2, warmup=1, device="cpu",
              dtype="float32", peak_seconds=0.2)
    assert r.params == 1_635_744 and r.plain is False
    assert r.tokens_per_s == pytest.approx(4 * 16 / (r.step_ms / 1000))
    assert r.achieved_tflops == pytest.approx(r.flops_per_token * r.tokens_per_s / 1e12)
    assert r.mfu == pytest.approx(r.achieved_tflops / r.peak_tflops)
    assert 0 < r.mfu < 1.5 and r.peak_memory_mb > 0 and r.startup_s >= 0
    assert "measured float32 matmul" in r.peak_source
    assert r.optimizer == "adamw"


def test_a_run_preset_is_benched_with_its_own_optimizer():
    r = bench("shakespeare-char-speedrun", batch_size=4, seq_len=16, steps=1, warmup=1,
              device="cpu", dtype="float32", peak_seconds=0.1)
    assert r.optimizer == "muon" and r.params == 106_880


def test_bench_cli_writes_json_and_rejects_bad_shapes(tmp_path, capsys):
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset", "gpt2-tiny", "--batch-size", "2", "--seq-len", "8",
              "--steps", "1", "--warmup", "0", "--device", "cpu", "--peak-seconds", "0.1",
              "--json", str(out)])
    assert e.value.code == 0
    assert "MFU" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert row["batch_size"] == 2 and row["seq_len"] == 8
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset", "gpt2-tiny", "--seq-len", "999"])
    assert e.value.code == 2 and "exceeds the preset's context" in capsys.readouterr().err


def test_fast_path_agrees_with_plain_fp32_within_bf16_tolerance(char_data, tmp_path):
    """bf16 autocast (the default where the CPU has bf16) tracks the fp32 losses closely."""
    from test_train import quiet, tiny_cfg

    from gptforge.metrics import read_metrics
    from gptforge.train import train

    losses = {}
    for dtype in ["float32", "bfloat16"]:
        cfg = tiny_cfg(char_data, "train.max_steps=30", "train.log_interval=1", f"train.dtype={dtype}")
        cfg.train.dtype = dtype
        train(cfg, tmp_path / dtype, log=quiet)
        losses[dtype] = [r["loss"] for r in read_metrics(tmp_path / dtype / "metrics.jsonl") if "loss" in r]
    fp32, bf16 = losses["float32"], losses["bfloat16"]
    assert fp32 != bf16  # really two precisions
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05  # bf16 has ~3 significant digits
    assert bf16[-1] < bf16[0] - 0.3


def test_cuda_cards_are_named_with_their_form_factor():
    assert cuda_card("NVIDIA H100 80GB HBM3") == ("NVIDIA H100 80GB HBM3 (SXM)", 989e12)
    assert cuda_card("NVIDIA H100 PCIe") == ("NVIDIA H100 PCIe (PCIe)", 756e12)
    assert cuda_card("NVIDIA A100-PCIE-40GB")[0].endswith("(PCIe)")
    assert cuda_card("Some Future GPU") == ("Some Future GPU", None)


def test_bench_pads_and_shapes_as_train_does_per_device():
    assert model_for("gpt2", "cuda").padded_vocab_size == 50304
    assert model_for("gpt2", "cpu").padded_vocab_size == 50257
    assert model_for("gpt2", "cuda", plain=True).padded_vocab_size == 50257


@pytest.mark.slow
def test_bench_under_ddp_reports_the_whole_job(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_layers import CLI_SAYING_TORCH

    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run(  # the launching process needs no torch: it says whether it imported it
        [sys.executable, "-c", CLI_SAYING_TORCH, "bench", "--preset", "gpt2-tiny", "--batch-size", "2",
         "--seq-len", "16", "--steps", "2", "--warmup", "1", "--device", "cpu", "--dtype", "float32",
         "--peak-seconds", "0.1", "--nproc", "2", "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "micro-batch 2 x 16 x 2 processes (DDP)" in out.stdout
    assert out.stdout.splitlines()[-1] == "torch imported: False"
    (row,) = json.loads((tmp_path / "b.json").read_text())
    assert row["processes"] == 2
    assert row["tokens_per_s"] == pytest.approx(2 * 2 * 16 / (row["step_ms"] / 1000))
