"""The trainer: accumulation, determinism, logging, stopping, checkpoints, the CLI end to end."""

import contextlib
import warnings
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from corpus import SHAKESPEARE as _SHAKESPEARE

from gptforge import GPT, GPTConfig, __version__
from gptforge.checkpoint import (
    build_model,
    load_checkpoint,
    read_optimizer_state,
    save_checkpoint,
)
from gptforge.cli import main
from gptforge.presets import resolve
from gptforge.metrics import format_step, read_metrics, read_run_record
from gptforge.optim import build_optimizer
from gptforge.step import TrainingDiverged, train_step
from gptforge.train import train

SHAKESPEARE = Path(_SHAKESPEARE)


def shakespeare_head(n_chars: int) -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")[:n_chars]


def tiny_cfg(data: Path, *extra: str):
    return resolve("gpt2-tiny", None, [f"data.path={data}", "train.device=cpu",
                                       "train.dtype=float32", *extra])


def quiet(_: str) -> None:
    pass


def test_log_line_has_the_originals_format():
    line = format_step(100, 6.61, 6.06e-5, 1.642, 828.0, 4946.0)
    assert line == ("step   100 | loss: 6.610000 | lr: 6.06e-05 | norm: 1.6420 | "
                    "dt: 828.00ms | tok/sec: 4946.00")


def test_gradient_accumulation_equals_one_big_batch():
    """4 micro-steps of 16 sequences give the gradient of one step of 64 sequences."""
    torch.manual_seed(0)
    cfg = GPTConfig.preset("gpt2-tiny", vocab_size=97)
    x = torch.randint(0, 97, (64, 32))
    y = torch.randint(0, 97, (64, 32))
    grads = []
    for micro, accum in [(64, 1), (16, 4)]:
        torch.manual_seed(1)
        model = GPT(cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: look at gradients only
        chunks = iter([(x[i:i + micro], y[i:i + micro]) for i in range(0, 64, micro)])
        result = train_step(model, opt, lambda: next(chunks), accum, 0.0, lambda: torch.autocast("cpu", enabled=False))
        grads.append(([p.grad.clone() for p in model.parameters()], float(result.loss), float(result.norm)))
    (g1, loss1, norm1), (g4, loss4, norm4) = grads
    for a, b in zip(g1, g4):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert loss1 == pytest.approx(loss4, rel=1e-5)
    assert norm1 == pytest.approx(norm4, rel=1e-4)


def test_same_seed_same_losses_and_loss_decreases(char_data, tmp_path):
    runs = []
    for name in ["a", "b"]:
        cfg = tiny_cfg(char_data, "train.max_steps=40", "train.log_interval=1")
        train(cfg, tmp_path / name, log=quiet)
        runs.append([m["loss"] for m in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in m])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 40
    losses = runs[0]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5  # char vocab ~60: starts near ln(60) = 4.1
    other = tiny_cfg(char_data, "train.max_steps=5", "train.log_interval=1", "train.seed=7")
    train(other, tmp_path / "c", log=quiet)
    other_losses = [m["loss"] for m in read_metrics(tmp_path / "c" / "metrics.jsonl") if "loss" in m]
    assert other_losses != losses[:5]


def test_metrics_and_log_lines_every_interval(char_data, tmp_path):
    lines: list[str] = []
    cfg = tiny_cfg(char_data, "train.max_steps=25", "train.log_interval=10", "train.eval_interval=10")
    result = train(cfg, tmp_path / "run", log=lines.append)
    steps = [l for l in lines if l.startswith("step") and "| loss:" in l]
    assert [int(l.split("|")[0].split()[1]) for l in steps] == [0, 10, 20, 24]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {"step", "loss", "lr", "norm", "dt_ms", "tok_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [9, 19, 24]
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    # bits per byte beside each val loss; Shakespeare's characters are ASCII, 1 byte a token
    vals = [r for r in records if "val_loss" in r]
    assert all(r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-9) for r in vals)
    val_lines = [l for l in lines if "val loss" in l]
    assert val_lines[-1] == (f"step    24 | val loss: {vals[-1]['val_loss']:.6f} | "
                             f"val bpb: {vals[-1]['val_bpb']:.6f}")
    assert result.step == 25 and result.tokens == 25 * 8 * 32
    assert (tmp_path / "run" / "config.toml").read_text().startswith("[model]")
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 25 and ckpt.path.name == "step_0000025"
    assert ckpt.config.model.vocab_size == result_vocab(char_data)


def result_vocab(data: Path) -> int:
    return json.loads((data / "meta.json").read_text())["vocab_size"]


def test_target_loss_stops_the_run(char_data, tmp_path):
    cfg = tiny_cfg(char_data, "train.max_steps=100", "train.target_loss=3.5", "train.log_interval=1")
    result = train(cfg, tmp_path / "run", log=quiet)
    assert result.stopped_by == "target_loss"
    assert result.step < 100 and result.last_loss < 3.5
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert all(l >= 3.5 for l in losses[:-1])


def test_a_checkpoint_holds_exactly_the_model_and_optimizer_in_memory(char_data, tmp_path):
    cfg = tiny_cfg(char_data, "train.max_steps=5", "model.pad_vocab_multiple=1")
    cfg.model.vocab_size = result_vocab(char_data)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    x = torch.randint(0, cfg.model.vocab_size, (4, 16))
    for _ in range(3):  # trained weights and non-zero AdamW moments, not the initial ones
        train_step(model, optimizer, lambda: (x, x.roll(-1, 1)), 1, 1.0, contextlib.nullcontext)
    save_checkpoint(tmp_path / "run", model.state_dict(), optimizer.state_dict(), cfg,
                    {"name": "char", "chars": "x"}, {"step": 3, "tokens": 0})
    ckpt = load_checkpoint(tmp_path / "run", verify="sha256")
    loaded = build_model(ckpt)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    model.eval()
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    saved = read_optimizer_state(ckpt)
    mine = optimizer.state_dict()
    assert saved["param_groups"] == json.loads(json.dumps(mine["param_groups"]))  # tuples: lists
    assert saved["state"].keys() == mine["state"].keys()
    for i, state in mine["state"].items():
        for key, value in state.items():
            assert torch.equal(saved["state"][i][key], value), (i, key)


@pytest.mark.parametrize("loader, optim", [
    ("sequential", []),
    ("random", []),
    # Muon's momentum buffers and AdamW's moments in one optimizer state; the wsd cooldown
    # straddles the resume point.
    ("random", ["optim.name=muon", "optim.schedule=wsd", "optim.warmup_steps=2", "optim.decay_steps=12",
                "optim.cooldown_steps=8", "optim.weight_decay=0.1"]),
])
def test_resume_continues_bit_identically(char_data, tmp_path, loader, optim):
    """N steps, stop, resume N more == 2N straight: every loss and the final weights (fp32, CPU)."""
    extra = ["train.log_interval=1", "train.total_batch_tokens=512", *optim]  # 2 accumulation steps
    full = tiny_cfg(char_data, "train.max_steps=12", f"data.loader={loader}", *extra)
    train(full, tmp_path / f"full-{loader}", log=quiet)
    half = tiny_cfg(char_data, "train.max_steps=6", f"data.loader={loader}", *extra)
    train(half, tmp_path / f"half-{loader}", log=quiet)
    ckpt = load_checkpoint(tmp_path / f"half-{loader}")
    cfg = ckpt.config
    cfg.train.max_steps = 12
    train(cfg, tmp_path / f"half-{loader}", resume=ckpt, log=quiet)
    a = read_metrics(tmp_path / f"full-{loader}" / "metrics.jsonl")
    b = read_metrics(tmp_path / f"half-{loader}" / "metrics.jsonl")
    key = lambda r: (r["step"], r.get("loss"), r.get("norm"))
    assert [key(r) for r in a if "loss" in r] == [key(r) for r in b if "loss" in r]
    wa = build_model(load_checkpoint(tmp_path / f"full-{loader}")).state_dict()
    wb = build_model(load_checkpoint(tmp_path / f"half-{loader}")).state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


def as_from_a_terminal() -> None:
    """A child's ``preexec_fn``: the stop signals at their defaults, as a command typed at a
    terminal has them, whatever started pytest (``nohup`` ignores SIGHUP, a background job SIGINT,
    and a child inherits that; gptforge rightly keeps a signal it was started ignoring ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def wait_for(predicate, what: str = "the condition", timeout: float = 60, poll: float = 0.05):
    """Poll ``predicate`` until it returns something true, and return that; fail, naming
    ``what``, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return value


@contextlib.contextmanager
def ended_with_the_test(proc: subprocess.Popen, group: bool = False):
    """A run started for 100,000 steps must not outlive a test that failed before stopping it.
    ``group``: PROC was started in a session of its own (``start_new_session``), and what it
    started (a torchrun job) goes too."""
    try:
        yield proc
    finally:
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_cli_prepare_train_sample_end_to_end(tmp_path, capsys):
    src = tmp_path / "input.txt"
    src.write_text(shakespeare_head(30_000), encoding="utf-8")
    assert run_cli("prepare", str(src), "--out", str(tmp_path / "data"), "--tokenizer", "char") == 0
    assert run_cli("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                   "--preset", "gpt2-tiny", "--set", "train.max_steps=30",
                   "--set", "train.device=cpu") == 0
    out = capsys.readouterr().out
    assert "step    29 | loss:" in out and "gptforge sample --ckpt" in out
    # what differs from the preset, in one line, not the whole config (that is in RUN/config.toml)
    assert "[model]" not in out
    config = next(line for line in out.splitlines() if line.startswith("config: "))
    assert config.startswith("config: preset gpt2-tiny with ") and "train.max_steps=30" in config
    assert "train.device=\"cpu\"" in config and str(tmp_path / "run" / "config.toml") in config
    assert "train.seed" not in config  # unchanged keys stay out
    # the version that ran, first of the start-up lines and in run.json
    started = out.index(f"\ngptforge {__version__} (torch {torch.__version__}, Python ")
    assert started < out.index("\nconfig: ")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["gptforge_version"] == __version__
    assert run_cli("sample", "--ckpt", str(tmp_path / "run"), "--prompt", "ROMEO:",
                   "--max-new-tokens", "40", "--num-samples", "2", "--seed", "3") == 0
    first = capsys.readouterr().out
    assert first.count("ROMEO:") == 2 and "-" * 40 in first
    assert run_cli("sample", "--ckpt", str(tmp_path / "run"), "--prompt", "ROMEO:",
                   "--max-new-tokens", "40", "--num-samples", "2", "--seed", "3") == 0
    assert capsys.readouterr().out == first  # same seed, same text
    # A new run into the same directory is refused rather than overwriting it.
    assert run_cli("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                   "--preset", "gpt2-tiny") == 2
    assert "already holds files" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lr=-3"], "optim.lr=-3.0 is out of range"),
    (["--set", "train.nope=1"], "unknown key 'train.nope'"),
    (["--set", "model.vocab_size=50257"], "model.vocab_size=50257 does not match"),
    (["--set", "train.total_batch_tokens=1000"], "not a multiple of"),
    (["--set", "train.device=cuda"] if not torch.cuda.is_available() else ["--set", "train.dtype=x"],
     "train.d"),
])
def test_cli_config_errors_are_one_line_exit_2(char_data, tmp_path, capsys, args, message):
    code = run_cli("train", "--data", str(char_data), "--out", str(tmp_path / "run"),
                   "--preset", "gpt2-tiny", *args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_cli_missing_data_and_checkpoint(tmp_path, capsys):
    assert run_cli("train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")) == 2
    assert "gptforge prepare" in capsys.readouterr().err
    assert run_cli("sample", "--ckpt", str(tmp_path / "nothing")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_cli("sample", "--ckpt", str(tmp_path / "empty")) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


RELEASE_PROBE = """
import gc, sys
gc.disable()  # only what train() itself lets go of is freed
from gptforge.model import GPT
from gptforge.presets import resolve
from gptforge.train import train
cfg = resolve("gpt2-tiny", None, [f"data.path={sys.argv[1]}", "train.device=cpu", "train.max_steps=2"])
train(cfg, sys.argv[2], log=lambda line: None)
print(sum(isinstance(o, GPT) for o in gc.get_objects()))
"""


def test_train_lets_go_of_its_model_when_it_returns(char_data, tmp_path):
    """In a fresh process (the first optimizer imports torch._dynamo, whose import pinned the
    stack's frames in a reference cycle), a finished train() leaves no model alive without
    waiting for a garbage collection: a notebook's second run does not hold the first's."""
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE, str(char_data), str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0", out.stdout


def test_ctrl_c_finishes_the_step_saves_and_exits_130(char_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptforge", "train", "--data", str(char_data), "--out",
         str(tmp_path / "run"), "--preset", "gpt2-tiny", "--set", "train.max_steps=100000",
         "--set", "train.log_interval=1", "--set", "train.device=cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=as_from_a_terminal)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with ended_with_the_test(proc):
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, "3 logged steps")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # as a shell reports Ctrl-C, after a clean save
    assert "SIGINT received" in out
    ckpt = load_checkpoint(tmp_path / "run")
    logged = read_metrics(metrics)
    assert ckpt.step == logged[-1]["step"] + 1 >= 3
    record = read_run_record(tmp_path / "run")
    assert (record["status"], record["stopped_by"], record["step"]) == ("stopped", "SIGINT", ckpt.step)


@pytest.mark.slow
def test_the_original_result_in_miniature(tmp_path, capsys):
    """The original recipe's optimizer (AdamW 0.9/0.95, wd 0.1, clip 1.0, warmup then cosine, the
    sequential loader, stop under 0.09) memorises 420 GPT-2 tokens of Shakespeare with a
    2-layer model (77 steps). Micro-batch 4 x 64 keeps the 50,257-way output layer affordable
    on one core (about 10 s on an Intel Xeon); the full 124M result needs a GPU (see
    BENCHMARKS.md)."""
    src = tmp_path / "input.txt"
    src.write_text(shakespeare_head(1_500), encoding="utf-8")
    assert run_cli("prepare", str(src), "--out", str(tmp_path / "data"), "--val-fraction", "0") == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["tokenizer"]["name"] == "gpt2" and 350 < meta["train_tokens"] < 500
    code = run_cli(
        "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
        "--preset", "gpt2-shakespeare",
        "--set", "model.n_layer=2", "--set", "model.n_head=4", "--set", "model.n_embd=64",
        "--set", "model.block_size=64", "--set", "optim.lr=3e-3", "--set", "optim.min_lr=2e-4",
        "--set", "optim.warmup_steps=10", "--set", "optim.decay_steps=500",
        "--set", "train.batch_size=4", "--set", "train.total_batch_tokens=256",
        "--set", "train.max_steps=500", "--set", "train.log_interval=50",
        "--set", "train.device=cpu", "--set", "train.dtype=float32")
    out = capsys.readouterr().out
    assert code == 0
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert losses[0] > 10 and losses[-1] < 0.09, out[-2000:]
    assert "below train.target_loss=0.09" in out
    assert run_cli("sample", "--ckpt", str(tmp_path / "run"), "--prompt", "First Citizen:",
                   "--max-new-tokens", "20", "--top-k", "50") == 0
    text = capsys.readouterr().out
    assert text.startswith("First Citizen:") and len(text) > len("First Citizen:") + 20


def test_target_val_loss_stops_the_run(char_data, tmp_path):
    cfg = tiny_cfg(char_data, "train.max_steps=200", "train.eval_interval=5",
                   "train.target_val_loss=3.9")
    result = train(cfg, tmp_path / "run", log=quiet)
    assert result.stopped_by == "target_val_loss" and result.step < 200
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert vals[-1] < 3.9 and all(v >= 3.9 for v in vals[:-1])
    assert result.step % 5 == 0


def _locale_is_utf8() -> bool:
    import codecs

    from gptforge.device import open_encoding

    return codecs.lookup(open_encoding()).name == "utf-8"


@pytest.mark.slow
@pytest.mark.skipif(not _locale_is_utf8(), reason="torch.compile cannot read its kernel templates "
                    "under a non-UTF-8 locale with UTF-8 mode off (torch's bug); gptforge says so "
                    "in one line: test_compile_under_a_non_utf8_locale_is_one_line")
def test_compiled_training_tracks_eager_and_saves_plain_names(char_data, tmp_path):
    """train.compile=true: the same losses as eager (fusion reorders float sums), a log line for
    the compilation, and checkpoints without torch.compile's "_orig_mod." prefix."""
    lines: list[str] = []
    runs = {}
    for compiled in (False, True):
        cfg = tiny_cfg(char_data, "train.max_steps=4", "train.log_interval=1",
                       f"train.compile={str(compiled).lower()}")
        runs[compiled] = tmp_path / f"compile-{compiled}"
        train(cfg, runs[compiled], log=lines.append if compiled else quiet)
    eager, comp = (read_metrics(runs[c] / "metrics.jsonl") for c in (False, True))
    assert [r["step"] for r in eager] == [r["step"] for r in comp]
    for a, b in zip(eager, comp):
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert any(line.startswith("torch.compile: the first step took") for line in lines)
    ckpt = load_checkpoint(runs[True])
    model = build_model(ckpt)  # strict load: the saved names are the model's own
    assert not any("_orig_mod" in k for k in model.state_dict())


# ----------------------------------------------------------------------------------------------
# No host sync on steps that do not log


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_no_host_sync_on_steps_that_do_not_log(char_data, tmp_path, monkeypatch, optim):
    """Reading a device value (item, float, bool, tolist, cpu, synchronize ...) makes the host
    wait for the GPU to drain. The loop may do it only on steps that log, evaluate or save."""
    import gptforge.step as step_module

    reads: list[str] = []

    def counting(name, original):
        def wrapper(*args, **kwargs):
            reads.append(name)
            return original(*args, **kwargs)
        return wrapper

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counting("synchronize", torch.cuda.synchronize))
    at_step: dict[int, int] = {}  # reads so far when each step began
    real_step = step_module.train_step

    def marked_step(*args, **kwargs):
        at_step[args[7]] = len(reads)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(step_module, "train_step", marked_step)
    cfg = tiny_cfg(char_data, "train.max_steps=12", "train.log_interval=5", f"optim.name={optim}",
                   "train.total_batch_tokens=512")
    train(cfg, tmp_path / "run", log=quiet)
    at_step[12] = len(reads)
    per_step = {s: at_step[s + 1] - at_step[s] for s in range(12)}
    assert all(per_step[s] == 0 for s in (1, 2, 3, 4, 6, 7, 8, 9)), per_step
    assert per_step[0] > 0 and per_step[5] > 0  # the logged steps do read: the counting works


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_a_non_finite_step_is_skipped_on_the_device(optim):
    cfg = resolve("gpt2-tiny", None, [f"optim.name={optim}", "model.vocab_size=50",
                                      "model.pad_vocab_multiple=1"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    x = torch.randint(0, 50, (4, 16))
    batch = lambda: (x, x.roll(-1, 1))  # noqa: E731
    train_step(model, optimizer, batch, 1, 1.0, contextlib.nullcontext)  # creates the state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    hook = model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: g * float("nan"))
    result = train_step(model, optimizer, batch, 1, 1.0, contextlib.nullcontext)
    hook.remove()
    assert bool(result.bad) and torch.isfinite(result.loss) and not torch.isfinite(result.norm)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for i, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(v, state[i][k]), (i, k)  # moments, momentum and step counts too
    result = train_step(model, optimizer, batch, 1, 1.0, contextlib.nullcontext)
    assert not bool(result.bad) and not torch.equal(model.state_dict()["lm_head.weight"], before["lm_head.weight"])


def test_divergence_on_a_step_that_does_not_log_is_reported_at_the_next_check(char_data, tmp_path, monkeypatch):
    """NaN at step 5 only (a transient spike): the step is skipped on the device, and the next
    step that syncs (the save at step 8) stops the run naming step 5; the checkpoint before it stands."""
    from test_checkpoint import nan_loss, poison_training_loss

    calls = poison_training_loss(monkeypatch, lambda n: n == 6, nan_loss)  # step 5's only micro-step
    cfg = tiny_cfg(char_data, "train.max_steps=20", "train.save_interval=4", "train.log_interval=100")
    with pytest.raises(TrainingDiverged, match="loss became nan at step 5"):
        train(cfg, tmp_path / "run", log=quiet)
    assert calls["n"] == 8  # it ran on to step 7, the last step before the save at step 8
    assert load_checkpoint(tmp_path / "run").step == 4


def test_an_early_estimate_of_the_wall_time_and_a_warning_before_memorizing(tmp_path, monkeypatch):
    """After its first few steps the run says how long it will take, once; a run that will read
    its data more than ~20 times without a target loss to stop it is warned at the start."""
    from gptforge import console
    from gptforge.data import prepare

    (tmp_path / "small.txt").write_text(shakespeare_head(2_200), encoding="utf-8")
    data = tmp_path / "small"
    prepare([str(tmp_path / "small.txt")], str(data), tokenizer="char", progress=False)  # 1,980 train tokens
    monkeypatch.setattr(console.Eta, "MIN_SECONDS", 0.0)
    lines: list[str] = []
    with pytest.warns(UserWarning, match=r"train.max_steps=200 x 256 tokens per step reads the "
                                         r"1,980 training tokens 26 times: the model will learn"):
        train(tiny_cfg(data, "train.max_steps=200", "train.log_interval=1000"), tmp_path / "a",
              log=lines.append)
    estimates = [line for line in lines if line.startswith("estimate: ")]
    assert len(estimates) == 1
    assert "the 194 steps left to train.max_steps=200 take about " in estimates[0]  # after 1 + 5 steps
    # fewer passes, or a target to stop the run: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(tiny_cfg(data, "train.max_steps=150"), tmp_path / "b", log=quiet)
        train(tiny_cfg(data, "train.max_steps=200", "train.target_loss=4.5"), tmp_path / "c", log=quiet)


def test_format_duration():
    from gptforge.console import format_duration

    assert [format_duration(s) for s in (7.54, 95, 3725, 90000)] == ["7.5s", "1m35s", "1h02m", "25h00m"]


def test_compile_under_a_non_utf8_locale_is_one_line(char_data, tmp_path, monkeypatch, capsys):
    import gptforge.device

    monkeypatch.setattr(gptforge.device, "open_encoding", lambda: "ANSI_X3.4-1968")
    assert run_cli("train", "--data", str(char_data), "--out", str(tmp_path / "run"), "--preset",
                   "gpt2-tiny", "--set", "train.device=cpu", "--set", "train.dtype=float32",
                   "--set", "train.compile=true", "--set", "train.max_steps=1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "encoding (ANSI_X3.4-1968): run with PYTHONUTF8=1" in err
    assert "train.compile=false" in err
