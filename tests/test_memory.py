"""Fitting the GPU you have, checked on the CPU: activation checkpointing gives the same numbers,
train.batch_size=auto's search (with injected out-of-memory errors), and running out of memory
mid-run as one line that leaves the last checkpoint intact."""

import contextlib
import functools
import json

import pytest
import torch
from test_train import run_cli

from gptforge import GPT, GPTConfig
from gptforge.checkpoint import build_model, load_checkpoint
from gptforge.config import ConfigError, TrainConfig
from gptforge.device import Precision, preset_micro_batch, resolve_for
from gptforge.distributed import DistEnv, checkpoint_blocks
from gptforge.memory import largest_that_fits, micro_batch_candidates
from gptforge.metrics import read_metrics, read_run_record
from gptforge.model import MLP
from gptforge.presets import resolve
from gptforge.step import fit_micro_batch, train_step

OOM = torch.cuda.OutOfMemoryError


def dropout_model(checkpointed: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=16, vocab_size=40, dropout=0.2))
    if checkpointed:
        checkpoint_blocks(model)
    return model


def saved_bytes(model: GPT, x: torch.Tensor) -> int:
    """Bytes the autograd graph keeps for the backward pass outside checkpointed regions."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return total


def test_activation_checkpointing_gives_the_same_losses_and_gradients_with_dropout(monkeypatch):
    """Dropout draws random masks; the recomputation in the backward pass must draw the same ones
    (torch restores the RNG state), so losses, gradients, updated weights and the RNG state after
    each step are exactly those of the plain model. And it is not a no-op: each block runs twice
    per step, and far less is kept for the backward pass."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 40, (4, 16), generator=g) for _ in range(6)]
    calls = [0]
    mlp_forward = MLP.forward

    def counted(self, x):
        calls[0] += 1
        return mlp_forward(self, x)

    monkeypatch.setattr(MLP, "forward", counted)
    runs = {}
    for checkpointed in (False, True):
        model = dropout_model(checkpointed)
        calls[0] = 0
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(5)
        batches = iter((x, x.roll(-1, 1)) for x in data)
        steps = []
        for _ in range(3):
            result = train_step(model, optimizer, lambda: next(batches), 2, 1.0, contextlib.nullcontext)
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            steps.append((result.loss.item(), result.norm.item(), grads, torch.get_rng_state()))
        runs[checkpointed] = (steps, model.state_dict(), calls[0], saved_bytes(model, data[0]))
    (plain, plain_sd, plain_calls, plain_saved), (ckpt, ckpt_sd, ckpt_calls, ckpt_saved) = runs[False], runs[True]
    for (loss_a, norm_a, grads_a, rng_a), (loss_b, norm_b, grads_b, rng_b) in zip(plain, ckpt):
        assert loss_a == loss_b and norm_a == norm_b
        assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
        assert torch.equal(rng_a, rng_b)
    assert list(plain_sd) == list(ckpt_sd)  # GPT-2's names: checkpoints are unchanged
    assert all(torch.equal(plain_sd[k], ckpt_sd[k]) for k in plain_sd)
    assert (plain_calls, ckpt_calls) == (3 * 6, 2 * 3 * 6)  # 3 blocks x 6 micro-steps, recomputed
    assert ckpt_saved < plain_saved / 2


def test_checkpointed_blocks_leave_generation_and_evaluation_alone():
    model = dropout_model(True).eval()
    plain = dropout_model(False).eval()
    x = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], plain(x)[0], rtol=0, atol=0)
        cache_a, cache_b = model.new_kv_cache(), plain.new_kv_cache()
        torch.testing.assert_close(model(x, kv_cache=cache_a)[0], plain(x, kv_cache=cache_b)[0], rtol=0, atol=0)
    checkpoint_blocks(model)  # twice is once
    assert model(x)[0].shape == (2, 8, 40)


def test_a_run_switched_to_activation_checkpointing_on_resume_equals_one_without(char_data, tmp_path):
    """A resumable key: a run continued with it gives, step for step and bit for bit, the run
    that never had it (dropout on: the recomputation draws the same masks)."""
    common = ["--data", str(char_data), "--preset", "gpt2-tiny", "--set", "train.device=cpu",
              "--set", "train.dtype=float32", "--set", "model.dropout=0.1", "--set", "train.log_interval=1"]
    assert run_cli("train", "--out", str(tmp_path / "plain"), *common, "--set", "train.max_steps=6") == 0
    assert run_cli("train", "--out", str(tmp_path / "half"), *common, "--set", "train.max_steps=3") == 0
    assert run_cli("train", "--out", str(tmp_path / "half"), "--resume", "--set", "train.max_steps=6",
                   "--set", "train.activation_checkpointing=true") == 0
    metrics = [[{k: v for k, v in r.items() if k not in ("dt_ms", "tok_per_s")}  # the training steps
                for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r] for run in ("plain", "half")]
    assert metrics[0] == metrics[1] and len(metrics[0]) >= 6
    a, b = (build_model(load_checkpoint(tmp_path / run)) for run in ("plain", "half"))
    assert load_checkpoint(tmp_path / "half").config.train.activation_checkpointing is True
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------------------------
# train.batch_size=auto


def test_candidates_keep_the_tokens_per_step():
    t = TrainConfig(batch_size="auto", seq_len=1024, total_batch_tokens=524_288)
    assert micro_batch_candidates(t) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert micro_batch_candidates(t, world_size=8) == [1, 2, 4, 8, 16, 32, 64]
    assert micro_batch_candidates(TrainConfig(seq_len=64, total_batch_tokens=64 * 12)) == [1, 2, 3, 4, 6, 12]
    with pytest.raises(ConfigError, match="multiple of train.seq_len x 3 processes"):
        micro_batch_candidates(TrainConfig(seq_len=64, total_batch_tokens=4096), world_size=3)


@pytest.mark.parametrize("limit, expected, tried", [
    (12, 8, [(8, True), (32, False), (16, False)]),
    (1000, 64, [(8, True), (32, True), (64, True)]),
    (1, 1, [(8, False), (2, False), (1, True)]),
    (0, None, [(8, False), (2, False), (1, False)]),
])
def test_the_search_finds_the_largest_micro_batch_that_fits(limit, expected, tried):
    sizes = [1, 2, 4, 8, 16, 32, 64]

    def trial(b: int) -> None:
        if b > limit:
            raise OOM(f"CUDA out of memory. Tried to allocate {b} GiB")

    assert largest_that_fits(sizes, trial) == (expected, tried)


def test_other_errors_are_not_taken_for_lack_of_memory():
    def trial(b: int) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        largest_that_fits([1, 2], trial)


def oom_above(limit: int):
    """GPT.forward, failing as the allocator would for micro-batches larger than ``limit``."""
    forward = GPT.forward

    def patched(self, idx, *args, **kwargs):
        if idx.size(0) > limit and torch.is_grad_enabled():
            raise OOM(f"CUDA out of memory. Tried to allocate {idx.size(0)}.00 GiB")
        return forward(self, idx, *args, **kwargs)

    return patched


def test_the_search_runs_real_trials_and_leaves_the_random_state_alone(monkeypatch):
    """fit_micro_batch with the search forced on (as on CUDA): real trial steps on a model of the
    run's shape, an injected out-of-memory error above 4 sequences, and every random generator
    where it was, so the run that follows is the one batch_size=4 gives."""
    cfg = resolve("gpt2-tiny", None, ["model.vocab_size=65", "train.batch_size=auto", "train.device=cpu",
                                      "train.activation_checkpointing=true"])
    cfg.model.pad_vocab_multiple = 1
    monkeypatch.setattr(GPT, "forward", oom_above(4))
    before = torch.get_rng_state()
    size, note = fit_micro_batch(cfg, DistEnv(), Precision(torch.device("cpu"), None), "gpt2-tiny", search=True)
    assert torch.equal(torch.get_rng_state(), before)
    assert (size, note) == (4, "4, the largest that fits (trials: 2 fits, 4 fits, 8 does not)")
    # off CUDA: no search, the preset's own micro-batch (gpt2-tiny: 8)
    assert fit_micro_batch(cfg, DistEnv(), Precision(torch.device("cpu"), None), "gpt2-tiny")[0] == 8
    monkeypatch.setattr(GPT, "forward", oom_above(0))
    with pytest.raises(Exception, match="not even a micro-batch of 1 x 32 tokens fits on cpu"):
        fit_micro_batch(cfg, DistEnv(), Precision(torch.device("cpu"), None), "gpt2-tiny", search=True)


def test_auto_off_cuda_is_the_presets_micro_batch():
    cfg = resolve("gpt2-fineweb", None, ["train.batch_size=auto", "model.vocab_size=50257"])
    assert preset_micro_batch(cfg.train, 1, "gpt2-fineweb") == 64
    assert preset_micro_batch(cfg.train, 1, None) == 16  # no preset: the default one's (gpt2-shakespeare)
    cfg.train.total_batch_tokens = 1024 * 48  # 64 would not keep the step: the largest under it that does
    assert preset_micro_batch(cfg.train, 1, "gpt2-fineweb") == 48
    r = resolve_for(cfg, "cpu", preset="gpt2-fineweb")
    assert (r.grad_accum_steps, r.batch_size.split(",")[0]) == (1, "auto: 48")
    cuda = resolve_for(cfg, "cuda", present=False).table()
    assert cuda["batch_size"].startswith("auto: searched at start-up, the largest of 1, 2, 3 .. 24, 48")
    assert "batch_size" not in resolve_for(resolve("gpt2-tiny", None, []), "cpu").table()


def test_auto_is_searched_logged_recorded_and_resumed(char_data, tmp_path, monkeypatch, capsys):
    """The whole path, the search forced on as on CUDA: the choice is logged, the run's config
    and checkpoints hold the number, the run equals one given that number, and the same command
    line continues it."""
    monkeypatch.setattr("gptforge.train.fit_micro_batch", functools.partial(fit_micro_batch, search=True))
    args = ["--data", str(char_data), "--preset", "gpt2-tiny", "--set", "train.device=cpu",
            "--set", "train.dtype=float32", "--set", "train.log_interval=1", "--set", "train.max_steps=2"]
    with monkeypatch.context() as m:
        m.setattr(GPT, "forward", oom_above(2))
        assert run_cli("train", "--out", str(tmp_path / "auto"), *args, "--set", "train.batch_size=auto") == 0
    out = capsys.readouterr().out
    assert "train.batch_size=auto: 2, the largest that fits (trials: 2 fits, 4 does not)" in out
    assert "batch: 2 x 32 tokens x 4 accumulation steps" in out
    assert 'batch_size = 2\n' in (tmp_path / "auto" / "config.toml").read_text()
    assert load_checkpoint(tmp_path / "auto").config.train.batch_size == 2
    assert run_cli("train", "--out", str(tmp_path / "two"), *args, "--set", "train.batch_size=2") == 0
    key = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / "auto" / "metrics.jsonl")]
    assert key == [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    capsys.readouterr()
    # the same command line, more steps: continues with the run's own 2, searching nothing
    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr("gptforge.train.fit_micro_batch", no_search)
    assert run_cli("train", "--out", str(tmp_path / "auto"), *args[:-1], "train.max_steps=3",
                   "--set", "train.batch_size=auto", "--resume", "auto") == 0
    assert load_checkpoint(tmp_path / "auto").step == 3
    assert "train.batch_size=auto" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Out of memory during a run


def test_out_of_memory_mid_run_is_one_line_and_the_last_checkpoint_loads(char_data, tmp_path, monkeypatch, capsys):
    calls = [0]
    forward = GPT.forward

    def failing(self, idx, *args, **kwargs):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 3 * 2 + 1:  # the first micro-step of step 3 (2 accumulation steps)
                raise OOM("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity"
                          " of 79.19 GiB of which 1.2 GiB is free.\nSee the documentation ...")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", failing)
    run = tmp_path / "run"
    code = run_cli("train", "--data", str(char_data), "--out", str(run), "--preset", "gpt2-tiny",
                   "--set", "train.device=cpu", "--set", "train.max_steps=20", "--set", "train.save_interval=2",
                   "--set", "train.total_batch_tokens=512")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("gptforge train: error: out of memory on cpu after 3 steps with a micro-batch of "
                          "8 x 32 tokens (peak ")
    assert "; tried to allocate 2.50 GiB):" in err
    assert ("set a smaller train.batch_size (e.g. 4: 4 accumulation steps keep the step at 512 tokens) "
            "or train.activation_checkpointing=true") in err
    assert (f"its last checkpoint, {run / 'checkpoints' / 'step_0000002'} (step 2), is intact; continue it with "
            f"gptforge train --out {run} --resume --set train.activation_checkpointing=true") in err
    ckpt = load_checkpoint(run, verify="sha256")
    assert ckpt.step == 2 and build_model(ckpt) is not None
    record = read_run_record(run)
    assert record["status"] == "crashed" and record["step"] == 3
    monkeypatch.setattr(GPT, "forward", forward)
    assert run_cli("train", "--out", str(run), "--resume", "--set", "train.activation_checkpointing=true",
                   "--set", "train.max_steps=4") == 0
    assert load_checkpoint(run).step == 4


def test_bench_takes_activation_checkpointing_and_reports_it(tmp_path, capsys):
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as e:
        from gptforge.cli import main

        main(["bench", "--preset", "gpt2-tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1",
              "--warmup", "1", "--device", "cpu", "--peak-seconds", "0.05", "--activation-checkpointing",
              "--json", str(out)])
    assert e.value.code == 0
    (result,) = json.loads(out.read_text())
    assert result["activation_checkpointing"] is True and result["peak_memory_mb"] > 0
    assert result["measured_peak_tflops"] == result["peak_tflops"] > 0  # on the CPU, the measured matmul
    assert "activation checkpointing" in capsys.readouterr().out
