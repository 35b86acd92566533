"""What "auto" becomes on each device type, and `gptforge config`."""

import json
import re

import pytest
import torch
from test_train import run_cli

from gptforge import device as device_module
from gptforge.config import RESOLVED, load_toml
from gptforge.presets import resolve, run_preset
from gptforge.device import MEASURED, resolve_for
from gptforge.probe import DtypeChoice, ProbeShape


@pytest.mark.parametrize("cached", ["bfloat16", "float32", None])
def test_auto_settings_per_device_type(monkeypatch, cached):
    """On a CPU, train.dtype=auto is what the probe measured for the run's shape on this machine
    (test_probe.py), if that is cached, else measured at start-up; CUDA and MPS keep their rules."""
    measured = None if cached is None else DtypeChoice(cached, 1.5 if cached == "bfloat16" else 0.9,
                                                       1.0, "2026-12-07T00:00:00+00:00", 1.0)
    seen = []
    monkeypatch.setattr(device_module, "cached_choice", lambda shape: seen.append(shape) or measured)
    cfg = run_preset("gpt2-shakespeare")
    cuda = resolve_for(cfg, "cuda", present=False)
    assert (cuda.compile, cuda.pad_vocab_multiple, cuda.padded_vocab_size, cuda.dtype) == (
        True, 64, 50304, "bfloat16")
    mps = resolve_for(cfg, "mps", present=False)
    assert (mps.compile, mps.pad_vocab_multiple, mps.dtype) == (False, 64, "float32")
    assert not seen  # neither looks at the CPU's cache
    cpu = resolve_for(cfg, "cpu")  # eager and unpadded on a CPU
    assert (cpu.compile, cpu.pad_vocab_multiple, cpu.padded_vocab_size) == (False, 1, 50257)
    assert cpu.dtype == (cached or MEASURED)
    assert seen == [ProbeShape(n_layer=12, n_embd=768, n_head=12, vocab=50257, batch=16, seq_len=64,
                               accum=4)]  # the recipe's own shapes
    assert (cpu.grad_accum_steps, cpu.tokens_per_step) == (4, 4096)
    assert resolve_for(cfg, "cpu", world_size=4).grad_accum_steps == 1
    # an explicit choice is kept, and nothing is looked up for it
    seen.clear()
    assert resolve_for(resolve("gpt2-shakespeare", None, ["train.dtype=float32"]), "cpu").dtype == "float32"
    assert not seen


def test_explicit_settings_win_over_auto():
    cfg = resolve("gpt2-shakespeare", None, ["train.compile=false", "model.pad_vocab_multiple=128",
                                             "train.dtype=float32"])
    r = resolve_for(cfg, "cuda", present=False)
    assert (r.compile, r.padded_vocab_size, r.dtype) == (False, 50304, "float32")
    cfg = resolve("gpt2-shakespeare", None, ["train.compile=true"])
    assert resolve_for(cfg, "cpu").compile is True


def config_out(capsys, *args: str) -> str:
    assert run_cli("config", *args) == 0
    return capsys.readouterr().out


def test_config_prints_every_key_and_resolves_for_an_absent_device(capsys, tmp_path):
    out = config_out(capsys, "--preset", "gpt2-fineweb", "--device", "cuda", "--nproc", "8")
    toml = tmp_path / "fineweb.toml"
    toml.write_text(out)
    table = load_toml(toml)  # valid TOML, the [resolved] table dropped on input ...
    cfg = resolve("gpt2-fineweb", None, ["train.device=cuda"])
    for section, values in table.items():  # ... and every key of every section is there
        assert values == json.loads(json.dumps(getattr(cfg, section).__dict__)), section
    resolved = out[out.index(f"[{RESOLVED}]"):]
    assert "on cuda" in resolved and "8 processes" in resolved
    for line in ['device = "cuda"', 'dtype = "bfloat16"', "compile = true", "padded_vocab_size = 50304",
                 "grad_accum_steps = 1", "tokens_per_step = 524288"]:
        assert line in resolved
    # Fed back with --config (no --preset): the same text.
    assert config_out(capsys, "--config", str(toml), "--nproc", "8") == out


def test_config_round_trips_on_this_machine_and_train_logs_the_same_values(capsys, tmp_path, char_data,
                                                                           monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    args = ["--preset", "gpt2-tiny", "--set", f"data.path={char_data}", "--set", "train.max_steps=2",
            "--set", "train.device=cpu"]
    assert 'dtype = "measured at start-up"' in config_out(capsys, *args)
    measured = config_out(capsys, *args, "--measure")  # measured now, and cached for train
    out = config_out(capsys, *args)
    assert "train.dtype=auto -> " in measured and "(measured now in " in measured
    assert "(cached, measured " in out

    def how_found(text: str) -> str:
        return re.sub(r"\((cached, measured [0-9-]+|measured now in [0-9.]+s)\)", "(...)", text)

    assert how_found(out) == how_found(measured)  # the same answer, read back
    (tmp_path / "c.toml").write_text(out)
    assert config_out(capsys, "--config", str(tmp_path / "c.toml")) == out
    resolved = dict(re.findall(r"^(\w+) = (.+)$", out[out.index(f"[{RESOLVED}]"):], re.M))
    assert run_cli("train", "--out", str(tmp_path / "run"), *args) == 0
    logged = capsys.readouterr().out
    line = next(line for line in logged.splitlines() if line.startswith("resolved: "))
    assert dict(kv.split(" = ") for kv in line[len("resolved: "):].split(", ")) == resolved
    assert int(resolved["padded_vocab_size"]) == json.loads(
        (char_data / "meta.json").read_text())["vocab_size"]


def test_config_errors_are_one_line(capsys):
    assert run_cli("config", "--preset", "gpt2-shakespeare", "--nproc", "3") == 2
    err = capsys.readouterr().err
    assert "not a multiple of train.batch_size x train.seq_len x 3 processes" in err and err.count("\n") == 1
    assert run_cli("config", "--set", "model.pad_vocab_multiple=lots") == 2
    assert 'model.pad_vocab_multiple must be int or "auto"' in capsys.readouterr().err
