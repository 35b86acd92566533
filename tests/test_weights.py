"""Generation's weights dtype: each dtype generates, the same seed gives the same text, auto is
decided by measuring (the timer mocked here, both ways), bad values are one line, eval stays fp32."""

import json
import string
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import run_cli

from gptforge import GPT, GPTConfig, probe, weights
from gptforge.checkpoint import save_checkpoint
from gptforge.config import ConfigError, RunConfig, SampleConfig, validate
from gptforge.errors import GptforgeError
from gptforge.generate import sample
from gptforge.sampling import Sampling

CHARS = string.ascii_letters + string.digits + " .,;:!?'\n-"
# Width 64: the int8 kernel's path (its K a multiple of 16) and the widened fallback both run.
SHAPE = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=len(CHARS),
                  pad_vocab_multiple=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("weights") / "run"
    cfg = RunConfig()
    cfg.model = SHAPE
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # larger weights than init's: logits that differ between tokens
        for p in model.parameters():
            p.mul_(8.0)
    save_checkpoint(run, model.state_dict(), None, cfg, {"name": "char", "chars": CHARS},
                    {"step": 0, "tokens": 0})
    return run


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_each_dtype_generates_and_the_same_seed_gives_the_same_text(run_dir, dtype):
    if dtype == "int8":
        pytest.importorskip("torchao")
    said: list[str] = []

    def run(seed: int) -> list[str]:
        return sample(str(run_dir), "To be", Sampling(max_tokens=24, seed=seed, top_k=0),
                      num_samples=2, device="cpu", weights_dtype=dtype, announce=said.append)

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c and all(t.startswith("To be") and len(t) > 6 for t in a)
    assert said[0] == f"weights: {dtype} (--weights-dtype {dtype})"


def test_int8_and_bf16_stay_close_to_fp32():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = GPT(SHAPE).eval()
    idx = torch.randint(0, SHAPE.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(idx)[0]
        for dtype, tol in (("bfloat16", 0.02), ("int8", 0.04)):
            torch.manual_seed(0)  # the same init as the reference
            got = weights.cast(GPT(SHAPE).eval(), dtype)
            err = (got(idx)[0].float() - ref).abs().max() / ref.abs().max()
            assert err < tol, (dtype, float(err))
    int8 = weights.cast(GPT(SHAPE), "int8")
    assert int8.num_params() == GPT(SHAPE).num_params()  # the tied matrix still counted once
    assert int8.lm_head.q.dtype == torch.int8 and int8.transformer.wpe.weight.dtype == torch.bfloat16


def test_int8_linear_on_both_paths_equals_its_dequantized_matmul():
    g = torch.Generator().manual_seed(0)
    for K in (48, 24):  # the kernel's path (K % 16 == 0), and the widened weight
        q = torch.randint(-128, 128, (40, K), generator=g, dtype=torch.int8)
        scale = (torch.rand(40, generator=g) / 50).to(torch.bfloat16)
        bias = torch.randn(40, generator=g).to(torch.bfloat16)
        x = torch.randn(3, 5, K, generator=g).to(torch.bfloat16)
        want = F.linear(x.float(), q.float() * scale.float()[:, None], bias.float())
        got = weights.Int8Linear(q, scale, bias)(x)
        assert got.shape == (3, 5, 40)
        assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """The decode timer mocked: each dtype's step takes what ``times`` says."""
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    times: dict[str, float] = {}
    calls: list[list[str]] = []

    def fastest(passes, **_):
        calls.append(list(passes))
        return {name: times[name.split()[1]] for name in passes}

    monkeypatch.setattr(probe, "_fastest", fastest)
    return times, calls


@pytest.mark.parametrize("step_ms, chosen", [
    ({"float32": 10.0, "bfloat16": 9.0, "int8": 5.0}, "int8"),
    ({"float32": 10.0, "bfloat16": 9.0, "int8": 9.9}, "bfloat16"),
    ({"float32": 10.0, "bfloat16": 9.7, "int8": 9.6}, "float32"),  # within the margin: fp32
    ({"float32": 10.0, "bfloat16": 14.0, "int8": 20.0}, "float32"),
])
def test_auto_picks_by_measurement(timed, monkeypatch, step_ms, chosen):
    times, calls = timed
    times.update({d: ms / 1000 for d, ms in step_ms.items()})
    monkeypatch.setattr(weights, "int8_available", lambda: True)
    choice = weights.resolve("auto", SHAPE, torch.device("cpu"))
    assert choice.dtype == chosen and choice.how == "measured" and len(calls) == 1
    line = choice.line()
    assert line.startswith(f"weights: {chosen} (--weights-dtype auto: on this CPU") and "measured now" in line
    # one block and the head each way; the cache answers the second time
    assert sorted(calls[0]) == sorted(f"{p} {d}" for p in ("step", "block") for d in step_ms)
    again = weights.resolve("auto", SHAPE, torch.device("cpu"))
    assert again.dtype == chosen and again.how == "cached" and len(calls) == 1
    entries = json.loads(Path(probe.cache_path()).read_text())["entries"]
    assert any("decode and sampling L2 C64" in key for key in entries)


def test_batched_decoding_is_measured_as_each_command_decodes(timed):
    """serve's engine (rows of different lengths, ragged=True), sample --num-samples (rows of
    one length) and chat (one row) are each timed as they run, and cached apart."""
    times, calls = timed
    times.update({"float32": 0.010, "bfloat16": 0.005, "int8": 0.009})
    served = weights.resolve("auto", SHAPE, torch.device("cpu"), rows=16, ragged=True)
    assert served.dtype == "bfloat16" and served.how == "measured" and len(calls) == 1
    assert weights.resolve("auto", SHAPE, torch.device("cpu"), rows=16).how == "measured"
    assert weights.resolve("auto", SHAPE, torch.device("cpu")).how == "measured" and len(calls) == 3
    assert weights.resolve("auto", SHAPE, torch.device("cpu"), rows=16, ragged=True).how == "cached"
    keys = list(json.loads(Path(probe.cache_path()).read_text())["entries"])
    assert sum("batch 16 ragged" in k for k in keys) == 1 and sum("batch 16 |" in k for k in keys) == 1
    assert weights.resolve("bfloat16", SHAPE, torch.device("cpu"), rows=16).how == "asked"


@pytest.mark.parametrize("rows, ragged", [(1, False), (3, False), (3, True)])
def test_the_decode_passes_run_the_model_and_the_sampling_step(rows, ragged):
    """Not mocked: each pass runs (a ragged cache's rows at lengths that differ), and a cache of
    a context shorter than DECODE_CONTEXT still fits."""
    for cfg in (SHAPE, GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=4, vocab_size=30)):
        passes = weights._decode_passes(cfg, "float32", rows, ragged)
        for _ in range(3):
            for run in passes.values():
                run()


def test_auto_without_torchao_times_fp32_and_bf16_only(timed, monkeypatch):
    times, calls = timed
    times.update({"float32": 0.010, "bfloat16": 0.004})
    monkeypatch.setattr(weights, "int8_available", lambda: False)
    assert weights.resolve("auto", SHAPE, torch.device("cpu")).dtype == "bfloat16"
    assert all("int8" not in name for name in calls[0])


def test_a_real_measurement_of_a_tiny_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    choice = weights.resolve("auto", SHAPE, torch.device("cpu"))
    assert choice.dtype in weights.PRECISION and choice.step_s["float32"] > 0
    assert torch.rand(1) == before  # the measurement leaves the caller's random numbers alone


def test_rules_off_the_cpu_and_int8_off_it():
    assert weights.resolve("auto", SHAPE, torch.device("mps")).dtype == "float32"
    with pytest.raises(GptforgeError, match="int8 runs on the CPU only"):
        weights.resolve("int8", SHAPE, torch.device("cuda"))
    if torch.cuda.is_available():
        assert weights.resolve("auto", SHAPE, torch.device("cuda")).how == "rule"


def test_int8_without_torchao_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(GptforgeError, match=r"int8 needs torchao .*gptforge\[int8\]"):
        weights.cast(GPT(SHAPE), "int8")


def test_bad_values_are_refused_in_one_line(run_dir, capsys):
    for command in (["sample"], ["chat", "-m", "hi"], ["serve"]):
        assert run_cli(*command, "--ckpt", str(run_dir), "--weights-dtype", "fp16") == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--weights-dtype fp16" in err
        assert "auto, float32, bfloat16, int8" in err
    cfg = SampleConfig(weights_dtype="int4")
    with pytest.raises(ConfigError, match="weights_dtype"):
        validate(cfg, "sample")


def test_the_dtype_is_printed_at_start_up(run_dir, capsys):
    assert run_cli("sample", "--ckpt", str(run_dir), "--prompt", "a", "--max-new-tokens", "3",
                   "--weights-dtype", "bfloat16", "--device", "cpu") == 0
    out = capsys.readouterr()
    assert out.err.startswith("weights: bfloat16") and out.out.startswith("a")


def test_serve_records_the_dtype(run_dir):
    pytest.importorskip("fastapi")
    from gptforge.serve.options import ServeOptions
    from gptforge.serve.protocol import model_card
    from gptforge.serve.server import build_engine, model_info

    opts = ServeOptions(ckpt=str(run_dir), device="cpu", max_batch=2, weights_dtype="bfloat16")
    engine = build_engine(opts)
    card = model_card(model_info(engine, opts))
    assert card["weights"] == {"dtype": "bfloat16", "how": "asked", "speedup_vs_float32": {}}
    assert engine.model.transformer.wpe.weight.dtype == torch.bfloat16
    assert engine.cache_bytes() == 2 * 2 * 2 * 64 * 64 * 2  # K and V, layers, rows, positions, width, bf16


def test_eval_stays_fp32(run_dir, tmp_path, monkeypatch, capsys):
    """eval scores the checkpoint as stored, whatever generation's auto would choose."""
    def refuse(*a, **k):
        raise AssertionError("eval cast the weights")

    monkeypatch.setattr(weights, "prepare", refuse)
    monkeypatch.setattr(weights, "cast", refuse)
    text = tmp_path / "val.txt"
    text.write_text("To be, or not to be: that is the question.\n" * 4, encoding="utf-8")
    assert run_cli("eval", "--ckpt", str(run_dir), "--data", str(text), "--device", "cpu") == 0
    assert "loss" in capsys.readouterr().out


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.02), ("int8", 0.04)])
def test_eval_scores_another_dtype_only_when_asked(run_dir, tmp_path, capsys, dtype, tol):
    if dtype == "int8":
        pytest.importorskip("torchao")
    text = tmp_path / "val.txt"
    text.write_text("To be, or not to be: that is the question.\n" * 4, encoding="utf-8")
    base = ["eval", "--ckpt", str(run_dir), "--data", str(text), "--device", "cpu"]
    assert run_cli(*base, "--json", str(tmp_path / "fp32.json")) == 0
    stored = capsys.readouterr().out
    assert run_cli(*base, "--weights-dtype", dtype, "--json", str(tmp_path / "cast.json")) == 0
    cast = capsys.readouterr().out
    assert "weights in" not in stored and cast.rstrip().endswith(f"| weights in {dtype} (--weights-dtype)")
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("fp32.json", "cast.json"))
    assert (a["weights_dtype"], b["weights_dtype"]) == ("float32", dtype)
    assert a["loss"] != b["loss"] and abs(a["loss"] - b["loss"]) < tol * a["loss"]
    assert run_cli(*base, "--weights-dtype", "auto") == 2  # eval names its dtype: no auto
    assert "invalid choice: 'auto'" in capsys.readouterr().err
