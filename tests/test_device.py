"""What "auto" becomes on each device type, and `gptforge config`."""

import json
import re

import pytest
import torch
from test_train import run_cli

from gptforge import device as device_module
from gptforge.config import RESOLVED, load_toml
from gptforge.presets import resolve, run_preset
from gptforge.device import resolve_for


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_settings_per_device_type(monkeypatch, native_bf16):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native_bf16)
    cfg = run_preset("gpt2-shakespeare")
    cuda = resolve_for(cfg, "cuda", present=False)
    assert (cuda.compile, cuda.pad_vocab_multiple, cuda.padded_vocab_size, cuda.dtype) == (
        True, 64, 50304, "bfloat16")
    mps = resolve_for(cfg, "mps", present=False)
    assert (mps.compile, mps.pad_vocab_multiple, mps.dtype) == (False, 64, "float32")
    cpu = resolve_for(cfg, "cpu")  # today's measured CPU defaults: eager, unpadded
    assert (cpu.compile, cpu.pad_vocab_multiple, cpu.padded_vocab_size) == (False, 1, 50257)
    assert cpu.dtype == ("bfloat16" if native_bf16 else "float32")
    assert (cpu.grad_accum_steps, cpu.tokens_per_step) == (4, 4096)
    assert resolve_for(cfg, "cpu", world_size=4).grad_accum_steps == 1


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_on_a_cpu_keeps_narrow_models_in_fp32(monkeypatch, native_bf16):
    """bf16 autocast's casts outweigh its faster matmuls for a narrow model (the main job's, 96
    wide, trains 1.48x faster in fp32 on a CPU with AMX): ``auto`` picks bf16 on a CPU only from
    CPU_BF16_MIN_WIDTH, and train's precision agrees with what ``config`` shows."""
    from gptforge.device import CPU_BF16_MIN_WIDTH, Precision

    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    for width, want in ((CPU_BF16_MIN_WIDTH - 32, "float32"), (CPU_BF16_MIN_WIDTH, "bfloat16"),
                        (768, "bfloat16")):
        want = want if native_bf16 else "float32"
        cfg = resolve("shakespeare-char-quick", None, [f"model.n_embd={width}", "model.vocab_size=65"])
        assert resolve_for(cfg, "cpu").dtype == want, width
        assert Precision.pick(cpu, "auto", width).label.startswith(want), width
        # an explicit choice is kept whatever the width
        assert resolve_for(resolve("shakespeare-char-quick", None, [
            f"model.n_embd={width}", "model.vocab_size=65", "train.dtype=bfloat16"]), "cpu").dtype == "bfloat16"
    # on CUDA the width does not matter
    cfg = resolve("shakespeare-char-quick", None, ["model.vocab_size=65"])
    assert resolve_for(cfg, "cuda", present=False).dtype == "bfloat16"


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


def test_config_round_trips_on_this_machine_and_train_logs_the_same_values(capsys, tmp_path, char_data):
    args = ["--preset", "gpt2-tiny", "--set", f"data.path={char_data}", "--set", "train.max_steps=2",
            "--set", "train.device=cpu"]
    out = config_out(capsys, *args)
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
