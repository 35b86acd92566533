"""Typed configs: presets, TOML, dotted overrides, validation that names the key."""

import dataclasses

import pytest

from gptforge.config import ConfigError, RunConfig, grad_accum_steps, parse_override
from gptforge.presets import RUN_PRESETS, keys_help, resolve, run_preset
from gptforge.device import resolve_for
from gptforge.optim import lr_at


def test_gpt2_shakespeare_is_the_original_recipe():
    cfg = run_preset("gpt2-shakespeare")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (12, 12, 768, 1024, 50257)
    assert m.dropout == 0.0 and m.bias
    # padding and compilation are implementation details decided per device, the numbers are not
    assert resolve_for(cfg, "cpu").padded_vocab_size == 50257
    assert resolve_for(cfg, "cuda", present=False).padded_vocab_size == 50304
    assert (o.lr, o.min_lr, o.warmup_steps, o.decay_steps) == (6e-4, 6e-5, 1000, 300_000)
    assert (o.beta1, o.beta2, o.weight_decay, o.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert (t.batch_size, t.seq_len, t.total_batch_tokens) == (16, 64, 4096)
    assert grad_accum_steps(t) == 4
    assert t.target_loss == 0.09 and t.log_interval == 100
    assert cfg.data.loader == "sequential"


def test_gpt2_fineweb_is_the_llm_c_reproduction():
    cfg = run_preset("gpt2-fineweb")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (12, 12, 768, 1024, 50257)
    assert (o.name, o.lr, o.min_lr, o.warmup_steps, o.decay_steps) == ("adamw", 6e-4, 0.0, 700, 18_865)
    assert (o.beta1, o.beta2, o.weight_decay, o.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert (t.batch_size, t.seq_len, t.total_batch_tokens, t.max_steps) == (64, 1024, 2**19, 18_865)
    assert [grad_accum_steps(t, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert (t.eval_interval, t.hellaswag_interval, t.save_interval) == (250, 250, 5000)
    assert t.max_steps * t.total_batch_tokens == pytest.approx(9.89e9, rel=1e-3)  # ~10B tokens
    assert lr_at(699, o) == pytest.approx(6e-4) and lr_at(18_865, o) == 0.0
    r = resolve_for(cfg, "cuda", world_size=8, present=False)
    assert (r.dtype, r.compile, r.padded_vocab_size, r.grad_accum_steps) == ("bfloat16", True, 50304, 1)


def test_shakespeare_char_is_nanogpts_cpu_recipe():
    cfg = run_preset("shakespeare-char")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (t.batch_size, t.seq_len, t.max_steps, grad_accum_steps(t)) == (12, 64, 2000, 1)
    assert (o.lr, o.min_lr, o.warmup_steps, o.decay_steps, o.beta2) == (1e-3, 1e-4, 100, 2000, 0.99)
    assert (o.name, o.schedule) == ("adamw", "cosine")


def test_the_speedrun_is_the_same_task_with_its_own_recipe():
    run, std = run_preset("shakespeare-char-speedrun"), run_preset("shakespeare-char")
    # Same data, tokenizer and evaluation context, so the two val losses compare directly.
    assert run.model.vocab_size == std.model.vocab_size == 0
    assert run.train.seq_len == std.train.seq_len and run.data.loader == std.data.loader
    assert (run.optim.name, run.optim.schedule) == ("muon", "wsd")
    assert run.optim.decay_steps == run.train.max_steps  # the cooldown ends at the last step
    assert run.train.eval_interval == 0  # one evaluation, at the end



def test_the_main_job_preset_is_the_speedrun_recipe_on_a_bigger_model():
    quick, run = run_preset("shakespeare-char-quick"), run_preset("shakespeare-char-speedrun")
    assert quick.data == run.data and quick.train.seq_len == run.train.seq_len  # same task
    assert (quick.optim.name, quick.optim.schedule) == ("muon", "wsd")
    assert quick.optim.decay_steps == quick.train.max_steps  # the cooldown ends at the last step
    assert quick.model.n_layer * quick.model.n_embd > run.model.n_layer * run.model.n_embd
    assert quick.train.eval_interval == 0  # one evaluation, at the end

# What each preset is: (n_layer, n_head, n_embd, block_size), tokens per optimizer step, and
# accumulation steps on one process. A new preset says here what it is.
PRESET_FACTS = {
    "gpt2-shakespeare": ((12, 12, 768, 1024), 4096, 4),
    "shakespeare-char": ((4, 4, 128, 64), 768, 1),
    "shakespeare-char-speedrun": ((2, 4, 64, 64), 2048, 1),
    "shakespeare-char-quick": ((3, 4, 96, 64), 2048, 1),
    "gpt2-tiny": ((2, 2, 32, 64), 256, 1),
    "gpt2-mini": ((4, 4, 128, 256), 2048, 1),
    "gpt2-fineweb": ((12, 12, 768, 1024), 524_288, 8),
    "chat-sft": ((4, 4, 128, 256), 2048, 1),  # the shape only for the table: --init-from's wins
}


def test_every_preset_is_valid():
    assert set(PRESET_FACTS) == set(RUN_PRESETS)
    for name, (shape, tokens, accum) in PRESET_FACTS.items():
        cfg = resolve(name, None, [])
        m, t, o = cfg.model, cfg.train, cfg.optim
        assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == shape, name
        assert t.total_batch_tokens == tokens and grad_accum_steps(t) == accum, name
        assert t.seq_len <= m.block_size and o.warmup_steps < o.decay_steps <= 300_000, name
        assert m.pad_vocab_multiple == "auto" and t.compile == "auto", name  # train decides per device
        assert RunConfig.from_dict(cfg.to_dict()) == cfg, name  # what a checkpoint stores reloads



def test_the_preset_sizes_in_help_are_the_presets():
    """train --help's table of presets: its parameters and tokens per step are each preset's own."""
    import torch

    from gptforge.model import GPT
    from gptforge.presets import PRESET_SIZES

    assert set(PRESET_SIZES) == set(RUN_PRESETS)
    for name, (tokenizer, params, tokens) in PRESET_SIZES.items():
        cfg = resolve(name, None, [])
        cfg.model.vocab_size = cfg.model.vocab_size or {"char": 65, "gpt2": 50257}[tokenizer]
        with torch.device("meta"):  # the shapes without the memory
            model = GPT(dataclasses.replace(cfg.model, pad_vocab_multiple=1))  # as on a CPU
        assert (model.num_params(), tokens) == (params, cfg.train.total_batch_tokens), name
        assert f"{name:<26} {tokenizer:<5} {params:>12,} {tokens:>12,}" in keys_help(), name


def test_the_readmes_preset_table_is_the_one_in_help():
    """README's table of presets, and docs/training.md's: a row per preset, in --help's order, with
    --help's tokenizer, parameters and tokens per step (PRESET_SIZES, which the test above checks
    against the presets). No timings: those are in BENCHMARKS.md, each naming its machine."""
    import re
    from pathlib import Path

    from gptforge.presets import PRESET_SIZES

    root = Path(__file__).resolve().parents[1]
    row = r"^\| `([a-z0-9-]+)`[^|]* \| [^|]* \| (char|GPT-2 BPE) \| ([\d,]+) \| ([\d,]+) \|$"
    readme, page = (re.findall(row, (root / name).read_text(encoding="utf-8"), re.MULTILINE)
                    for name in ("README.md", "docs/training.md"))
    assert [r[0] for r in readme] == list(RUN_PRESETS) and page == readme
    shown = {"char": "char", "gpt2": "GPT-2 BPE"}
    for name, data, params, tokens in readme:
        tokenizer, p, t = PRESET_SIZES[name]
        assert (data, params, tokens) == (shown[tokenizer], f"{p:,}", f"{t:,}"), name


def test_dotted_overrides_are_typed_by_field():
    cfg = resolve("gpt2-tiny", None, ["optim.lr=3e-4", "train.max_steps=7", "model.bias=false",
                                      "train.device=cpu", "sample.prompt='hi there'"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.model.bias is False
    assert cfg.train.device == "cpu" and cfg.sample.prompt == "hi there"
    assert parse_override("a.b = 1") == ("a.b", "1")


def test_toml_file_then_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("[optim]\nlr = 1e-3\n[train]\nmax_steps = 50\nseed = 3\n")
    cfg = resolve("gpt2-tiny", str(f), ["train.seed=4"])
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 50 and cfg.train.seed == 4


@pytest.mark.parametrize("overrides, match", [
    (["optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["optimizer.lr=1"], "not a config key"),
    (["optim.lr"], "expected KEY=VALUE"),
    (["train.max_steps=ten"], "train.max_steps must be int"),
    (["train.max_steps=1.5"], "train.max_steps must be int"),
    (["model.bias=maybe"], "model.bias must be bool"),
    (["optim.lr=-1"], "optim.lr=-1.0 is out of range"),
    (["optim.lr=nan"], "optim.lr"),
    (["optim.beta2=1.0"], "optim.beta2"),
    (["train.seq_len=100"], "train.seq_len=100 is out of range: must be <= model.block_size=64"),
    (["train.device=tpu"], "train.device"),
    (["train.dtype=fp8"], "train.dtype"),
    (["data.loader=shuffle"], "data.loader"),
    (["model.n_head=3"], "model.n_embd"),
    (["model.vocab_size=140000"], "model.vocab_size"),
    (["optim.name=sgd"], "optim.name='sgd' is out of range: choose one of adamw, muon"),
    (["optim.schedule=step"], "optim.schedule"),
    (["optim.schedule=wsd"], "optim.cooldown_steps=0 is out of range"),
    (["optim.schedule=wsd", "optim.cooldown_steps=500"], "optim.cooldown_steps=500 is out of range"),
    (["optim.ns_steps=0"], "optim.ns_steps"),
    (["optim.muon_momentum=1"], "optim.muon_momentum"),
    (["optim.name=muon", "train.parallel=fsdp"], "use train.parallel=ddp"),
])
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve("gpt2-tiny", None, overrides)


def test_bad_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(None, str(tmp_path / "nope.toml"), [])
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(None, str(bad), [])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[optim]\nlearning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        resolve(None, str(unknown), [])
    section = tmp_path / "section.toml"
    section.write_text("[trainer]\nmax_steps = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trainer\]"):
        resolve(None, str(section), [])
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text("[train]\nmax_steps = \"many\"\n")
    with pytest.raises(ConfigError, match="train.max_steps must be int"):
        resolve(None, str(wrong_type), [])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'gpt3'"):
        resolve("gpt3", None, [])


def test_accumulation_steps_must_divide():
    cfg = resolve("gpt2-shakespeare", None, ["train.total_batch_tokens=5000"])
    with pytest.raises(ConfigError, match="not a multiple of train.batch_size x train.seq_len = 1024"):
        grad_accum_steps(cfg.train)
    assert grad_accum_steps(resolve("gpt2-shakespeare", None, []).train, world_size=2) == 2
