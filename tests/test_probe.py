"""train.dtype=auto on a CPU: measured on the run's own shapes, decided with a margin, cached per
machine and shape, logged and recorded, and kept by a resumed run; an explicit dtype always wins."""

import json
import os
import re

import pytest
import torch
from test_train import quiet, read_run_record, run_cli, tiny_cfg

from gptforge import probe
from gptforge.checkpoint import load_checkpoint
from gptforge.probe import BF16_MARGIN, DtypeChoice, ProbeShape, measure, measured_choice, probe_key
from gptforge.train import train

SHAPE = ProbeShape(n_layer=2, n_embd=32, n_head=2, vocab=65, batch=4, seq_len=16, accum=2)


def made_up(dtype: str, speedup: float) -> DtypeChoice:
    return DtypeChoice(dtype, fp32_s=speedup, bf16_s=1.0, measured="2026-12-07T00:00:00+00:00",
                       probe_s=0.5)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "probes.json"


@pytest.fixture
def measures(monkeypatch):
    """The probe's measurement replaced by answers given in turn; the shapes it was asked for."""
    answers: list[DtypeChoice] = []
    asked: list[ProbeShape] = []

    def fake(shape: ProbeShape) -> DtypeChoice:
        asked.append(shape)
        return answers.pop(0)

    monkeypatch.setattr(probe, "measure", fake)
    return answers, asked


@pytest.mark.parametrize("speedup", [0.62, 1.0, BF16_MARGIN - 0.01, BF16_MARGIN + 0.01, 2.3])
def test_bf16_must_win_by_the_margin(monkeypatch, speedup):
    """Each part's time in fp32 is ``speedup`` times its time in bf16; the update, the same in
    both, takes none here, so the step's ratio is ``speedup`` exactly."""
    monkeypatch.setattr(probe, "_fastest", lambda passes, **_: {
        name: 0.0 if name == "update" else speedup if name.endswith("32") else 1.0 for name in passes})
    choice = measure(SHAPE)
    assert choice.speedup == pytest.approx(speedup)
    assert choice.dtype == ("bfloat16" if speedup >= BF16_MARGIN else "float32")


def test_a_cpu_that_emulates_bf16_is_screened_out_by_one_matmul(monkeypatch):
    """bf16 matmuls SCREEN_SLOWER times slower than fp32: fp32, without timing the step (whose
    bf16 half would take minutes there)."""
    monkeypatch.setattr(probe, "_fastest", lambda passes, **_: {
        name: 1.0 if name == "32" else probe.SCREEN_SLOWER if name == "16" else 1 / 0 for name in passes})
    monkeypatch.setattr(probe, "_parts", lambda *a: pytest.fail("the step was timed"))
    choice = measure(SHAPE)
    assert (choice.dtype, choice.timed, choice.speedup) == ("float32", "matmul", 1 / probe.SCREEN_SLOWER)
    assert "bf16 autocast made the model's MLP matmul (so much slower that no step was timed) 0.50x as fast" in choice.line()


def test_a_real_measurement_of_a_tiny_shape_leaves_the_random_numbers_alone():
    torch.manual_seed(1)
    want = torch.rand(3)
    torch.manual_seed(1)
    choice = measure(SHAPE)
    assert torch.equal(torch.rand(3), want)  # a run's own random stream is not moved
    assert choice.dtype in ("float32", "bfloat16") and choice.fp32_s > 0 and choice.bf16_s > 0
    assert 0 < choice.probe_s < 20
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", choice.measured)


def test_the_answer_is_cached_per_shape_and_measured_again_when_asked(cache, measures):
    answers, asked = measures
    answers += [made_up("bfloat16", 1.4), made_up("float32", 0.9), made_up("float32", 1.05)]
    first = measured_choice(SHAPE)
    assert not first.cached and first.dtype == "bfloat16" and asked == [SHAPE]
    entries = json.loads(cache.read_text())["entries"]
    assert list(entries) == [probe_key(SHAPE)] and entries[probe_key(SHAPE)]["dtype"] == "bfloat16"
    again = measured_choice(SHAPE)  # read back, not measured
    assert again.cached and again.dtype == "bfloat16" and len(asked) == 1
    assert "(cached, measured 2026-12-07)" in again.line()
    wider = ProbeShape(**{**SHAPE.__dict__, "n_embd": 64})
    assert measured_choice(wider).dtype == "float32" and asked[-1] == wider  # another shape
    assert measured_choice(SHAPE, again=True).dtype == "float32"  # `config --measure`
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_the_key_names_the_cpu_torch_threads_and_shapes(monkeypatch):
    for var in probe.ISA_SETTINGS:
        monkeypatch.delenv(var, raising=False)
    key = probe_key(SHAPE)
    assert torch.__version__ in key and f"{torch.get_num_threads()} threads" in key
    assert "L2 C32 H2 V65 | 4x16x2" in key and "flags " in key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert probe_key(SHAPE) != key
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # a CPU held to fewer instructions
    assert probe_key(SHAPE) == key.replace(" | torch", " | ONEDNN_MAX_CPU_ISA=AVX2 | torch")


def test_an_unwritable_or_damaged_cache_costs_a_measurement_not_the_run(tmp_path, monkeypatch, measures):
    answers, asked = measures
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "a-file" / "cache"))  # even root cannot
    answers += [made_up("bfloat16", 1.5)]
    choice = measured_choice(SHAPE)
    assert choice.dtype == "bfloat16" and "not cached" in choice.note and "GPTFORGE_CACHE" in choice.line()
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "probes.json").write_text("{not json")
    answers += [made_up("float32", 1.0)]
    assert measured_choice(SHAPE).dtype == "float32" and len(asked) == 2  # measured, rewritten
    assert json.loads((tmp_path / "cache" / "probes.json").read_text())["format"] == probe.CACHE_FORMAT


def test_train_measures_logs_records_and_a_resumed_run_keeps_it(char_data, tmp_path, cache, measures,
                                                              capsys):
    answers, asked = measures
    answers += [made_up("bfloat16", 1.3)]
    run = tmp_path / "run"
    args = ["--data", str(char_data), "--preset", "gpt2-tiny", "--set", "train.device=cpu",
            "--set", "train.max_steps=4", "--set", "train.save_interval=2"]
    assert run_cli("train", "--out", str(run), *args) == 0
    out = capsys.readouterr().out
    assert ("train.dtype=auto -> bfloat16: on this CPU bf16 autocast made a step 1.30x as fast as "
            "fp32, so bf16 autocast is chosen (measured now in 0.5s)") in out
    assert "precision: bfloat16 autocast" in out and len(asked) == 1
    vocab = json.loads((char_data / "meta.json").read_text())["vocab_size"]
    assert asked == [ProbeShape(n_layer=2, n_embd=32, n_head=2, vocab=vocab, batch=8, seq_len=32,
                                accum=1)]  # gpt2-tiny's shapes
    assert load_checkpoint(run).config.train.dtype == "bfloat16"  # kept in the run's config
    assert 'dtype = "bfloat16"' in (run / "config.toml").read_text()
    assert read_run_record(run)["dtype_auto"] == {
        "dtype": "bfloat16", "bf16_speedup": 1.3, "timed": "step", "margin": BF16_MARGIN, "fp32_step_s": 1.3,
        "bf16_step_s": 1.0, "measured": "2026-12-07T00:00:00+00:00", "cached": False}
    # The cache now says otherwise (another machine, say): the run resumes as it started, with
    # its preset given again (--resume auto) or not, and measures nothing.
    entries = json.loads(cache.read_text())
    for entry in entries["entries"].values():
        entry["dtype"] = "float32"
    cache.write_text(json.dumps(entries))
    assert run_cli("train", "--out", str(run), "--resume", "auto", *args[:-2], "--set", "train.max_steps=6") == 0
    assert run_cli("train", "--out", str(run), "--resume", "--set", "train.max_steps=8") == 0
    out = capsys.readouterr().out
    assert out.count("precision: bfloat16 autocast") == 2 and "train.dtype=auto" not in out
    assert load_checkpoint(run).config.train.dtype == "bfloat16" and len(asked) == 1
    assert read_run_record(run)["dtype_auto"]["dtype"] == "bfloat16"
    # an explicit dtype wins, on resume too
    assert run_cli("train", "--out", str(run), "--resume", "--set", "train.max_steps=10",
                   "--set", "train.dtype=float32") == 0
    assert "precision: float32" in capsys.readouterr().out


def test_an_explicit_dtype_is_never_measured(char_data, tmp_path, cache, measures):
    train(tiny_cfg(char_data, "train.max_steps=2"), tmp_path / "run", log=quiet)  # float32
    assert not measures[1] and not cache.exists()
    assert "dtype_auto" not in read_run_record(tmp_path / "run")


def test_the_suite_measures_in_one_shared_cache(shared_cache):
    """conftest's session cache: what the workers share, never the user's ~/.cache."""
    assert os.environ["GPTFORGE_CACHE"] == str(shared_cache)
    assert probe.cache_path() == str(shared_cache / "probes.json")


def test_the_cache_directory_without_a_home(monkeypatch, tmp_path):
    from gptforge.cachedir import default_cache_dir

    for var in ("GPTFORGE_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / ".cache" / "gptforge")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "gptforge")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("HOME")
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)  # no HOME, no password entry either
    path = default_cache_dir()
    assert os.path.isabs(path) and path.endswith(f"gptforge-cache-{os.getuid()}")
