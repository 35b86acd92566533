"""Named configurations: the run presets, and a run's config resolved from a preset, a TOML file
and ``--set`` overrides (in that order, each overriding the one before).

The model shapes (``config.MODEL_PRESETS``) are GPT-2's published sizes; a run preset is a whole
recipe on top of the defaults: model, data order, optimizer and schedule, batch and stopping.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from gptforge.config import (
    MODEL_PRESETS,
    SECTION_TYPES,
    SECTIONS,
    ConfigError,
    RunConfig,
    apply_dict,
    apply_overrides,
    config_differences,
    RUN_RULES,
    field_help,
    load_toml,
    validate_run,
)
from gptforge.ranges import field_range
from gptforge.version import docs_page

# The char speedrun's optimizer: Muon for the blocks' matrices, a higher AdamW lr for the
# embeddings, warmup-stable-decay ending at the last step (shared by the main job's preset).
SPEEDRUN_OPTIM: dict[str, Any] = dict(
    name="muon", lr=1.2e-2, muon_lr=0.03, min_lr=0.0, warmup_steps=20, decay_steps=500,
    schedule="wsd", cooldown_steps=250, beta1=0.9, beta2=0.99, weight_decay=0.0, grad_clip=1.0)

# Run presets: the sections each one sets on top of the defaults above.
RUN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The original notebook's recipe, exactly: GPT-2 124M on Tiny Shakespeare (GPT-2 BPE),
    # micro-batch 16 x 64, 4 accumulation steps, warmup 1,000 to 6e-4, cosine to 6e-5 at 300,000,
    # consecutive windows, stop once a step's training loss is under 0.09, a log line every 100.
    "gpt2-shakespeare": {
        "model": dict(MODEL_PRESETS["gpt2"]),
        "data": dict(loader="sequential"),
        "optim": dict(lr=6e-4, min_lr=6e-5, warmup_steps=1000, decay_steps=300_000,
                      beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0),
        "train": dict(batch_size=16, seq_len=64, total_batch_tokens=16 * 64 * 4,
                      max_steps=300_000, target_loss=0.09, log_interval=100),
    },
    # nanoGPT's small CPU recipe for character-level Tiny Shakespeare (its README's
    # "baby GPT" command line), so results can be compared with that trainer.
    "shakespeare-char": {
        "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=0,
                      dropout=0.0, bias=False),
        "data": dict(loader="random"),
        "optim": dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=2000,
                      beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0),
        "train": dict(batch_size=12, seq_len=64, total_batch_tokens=12 * 64, max_steps=2000,
                      log_interval=10, eval_interval=250),
    },
    # The same task and val split, to the standard recipe's validation loss (1.88) as fast as a
    # 2-core CPU can: a smaller model that sees more tokens per second, Muon for the blocks'
    # matrices, a higher AdamW lr for the embeddings, and a warmup-stable-decay schedule that
    # ends at the last step. One evaluation, at the end (BENCHMARKS.md has the measurements).
    "shakespeare-char-speedrun": {
        "model": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=0,
                      dropout=0.0, bias=False),
        "data": dict(loader="random"),
        "optim": dict(SPEEDRUN_OPTIM),
        "train": dict(batch_size=32, seq_len=64, total_batch_tokens=32 * 64, max_steps=500,
                      log_interval=50),
    },
    # The README's main job: the speedrun's recipe on a model three times its size (3 x 96), for
    # 900 steps (1.8M characters, under two passes over the text), to a val loss near 1.65 in a
    # few minutes on 2 CPU cores: enough for samples with Shakespeare's names, verse lines and
    # mostly real words. One evaluation, at the end.
    "shakespeare-char-quick": {
        "model": dict(n_layer=3, n_head=4, n_embd=96, block_size=64, vocab_size=0,
                      dropout=0.0, bias=False),
        "data": dict(loader="random"),
        "optim": dict(SPEEDRUN_OPTIM, decay_steps=900, cooldown_steps=450),
        "train": dict(batch_size=32, seq_len=64, total_batch_tokens=32 * 64, max_steps=900,
                      log_interval=100),
    },
    # GPT-2 124M the way llm.c and build-nanogpt reproduce it on ~10B tokens of FineWeb(-Edu):
    # 524,288 (2**19) tokens per step in micro-batches of 64 x 1024 per GPU (8 accumulation steps
    # on one GPU, 1 on eight), AdamW 6e-4 (0.9, 0.95), weight decay 0.1, clipping at 1.0, 700
    # warmup steps, then a cosine to 0 at step 18,865 (~10B tokens, one pass over a 10B sample);
    # validation loss (20 batches, ~1.3M tokens) and HellaSwag every 250 steps, a checkpoint
    # every 5,000. llm.c reaches a val loss of ~3.28 and HellaSwag acc_norm ~0.30 this way.
    "gpt2-fineweb": {
        "model": dict(MODEL_PRESETS["gpt2"]),
        "data": dict(loader="sequential"),
        "optim": dict(lr=6e-4, min_lr=0.0, warmup_steps=700, decay_steps=18_865,
                      beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0),
        "train": dict(batch_size=64, seq_len=1024, total_batch_tokens=524_288, max_steps=18_865,
                      log_interval=10, eval_interval=250, eval_max_batches=20,
                      hellaswag_interval=250, save_interval=5000),
    },
    # Tiny models for tests and quick experiments on any machine.
    "gpt2-tiny": {
        "model": dict(MODEL_PRESETS["gpt2-tiny"], vocab_size=0),
        "optim": dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=200),
        "train": dict(batch_size=8, seq_len=32, total_batch_tokens=8 * 32, max_steps=200,
                      log_interval=10),
    },
    "gpt2-mini": {
        "model": dict(MODEL_PRESETS["gpt2-mini"], vocab_size=0),
        "optim": dict(lr=1e-3, min_lr=1e-4, warmup_steps=50, decay_steps=2000),
        "train": dict(batch_size=16, seq_len=128, total_batch_tokens=16 * 128, max_steps=2000,
                      log_interval=50, eval_interval=500),
    },
    # Supervised fine-tuning of a small model on conversations (docs/chat.md): with --init-from,
    # the model's shape comes from the run started from (gpt2-mini's here only for the table);
    # rows of whole conversations, in a seeded random order, trained on the mask; gpt2-mini's
    # peak rate with a short warmup, no weight decay; an evaluation every 100 steps. Measured on
    # benchmarks/chat_demo.py (BENCHMARKS.md, "Chat"): at 5e-4 the small model had not learned
    # its task after 400 steps (val loss 1.53 a reply token), at 1e-3 it had (0.51), and 1,000
    # steps took it to about 0.05.
    "chat-sft": {
        "model": dict(MODEL_PRESETS["gpt2-mini"], vocab_size=0),
        "data": dict(loader="random"),
        "optim": dict(lr=1e-3, min_lr=1e-4, warmup_steps=20, decay_steps=1000, weight_decay=0.0,
                      grad_clip=1.0),
        "train": dict(batch_size=16, seq_len=128, total_batch_tokens=16 * 128, max_steps=1000,
                      log_interval=50, eval_interval=100),
    },
}
DEFAULT_PRESET = "gpt2-shakespeare"

# What each preset is in size: the tokenizer of the data it is meant for, parameters (with that
# tokenizer's vocabulary, unpadded as on a CPU) and tokens per optimizer step; tests/test_config.py
# checks them against the presets. What a step costs is machine-dependent: --help says how to
# measure it (gptforge bench), and BENCHMARKS.md holds the figures, each naming its machine.
PRESET_SIZES: dict[str, tuple[str, int, int]] = {  # tokenizer, parameters, tokens/step
    "gpt2-shakespeare": ("gpt2", 124_439_808, 4_096),
    "shakespeare-char": ("char", 804_096, 768),
    "shakespeare-char-speedrun": ("char", 106_880, 2_048),
    "shakespeare-char-quick": ("char", 344_832, 2_048),
    "gpt2-fineweb": ("gpt2", 124_439_808, 524_288),
    "gpt2-tiny": ("char", 29_600, 256),
    "gpt2-mini": ("gpt2", 7_259_008, 2_048),
    "chat-sft": ("gpt2", 7_259_008, 2_048),  # gpt2-mini's shape; with --init-from, that model's
}


def run_preset(name: str) -> RunConfig:
    if name not in RUN_PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(RUN_PRESETS)}")
    return RunConfig.from_dict(RUN_PRESETS[name], origin=f"preset {name}")


def resolve(preset: str | None, config_file: str | None, overrides: list[str]) -> RunConfig:
    """preset -> TOML -> dotted overrides, then validated."""
    cfg = run_preset(preset or DEFAULT_PRESET)
    if config_file:
        apply_dict(cfg, load_toml(config_file), origin=str(config_file))
    apply_overrides(cfg, overrides)
    validate_run(cfg)
    return cfg


def config_line(cfg: RunConfig, preset: str | None, path: Path) -> str:
    """What the run's config changes from its preset's, in one line (the whole of it is in
    RUN/config.toml)."""
    base = run_preset(preset) if preset in RUN_PRESETS else RunConfig()
    changes = [f"{k}={json.dumps(b)}" for k, a, b in config_differences(base, cfg)]
    what = f"preset {preset}" if preset in RUN_PRESETS else "the defaults"
    return (f"config: {what}" + (f" with {', '.join(changes)}" if changes else "")
            + f" (all of it: {path})")


def keys_help() -> str:
    """Every config key with its default, allowed values and meaning, and the presets' sizes, for
    ``--help``: the same field docs and ranges the configuration reference is generated from."""
    lines = ["config keys (set with --set KEY=VALUE or in a --config TOML file; defaults shown",
             "before a preset is applied, allowed values in brackets):"]
    defaults = RunConfig()
    for section in SECTIONS:
        cls = SECTION_TYPES[section]
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            allowed = [r.doc for r in (field_range(f), RUN_RULES.get(f"{section}.{f.name}")) if r]
            lines.append(f"  {section}.{f.name} = {default!r}"
                         + (f"  [{'; '.join(allowed)}]" if allowed else ""))
            if helps.get(f.name):
                lines.append(f"      {helps[f.name]}")
    lines.append(f"every key with its type and range: {docs_page('reference/configuration')}")
    lines.append("")
    lines.append("presets (parameters with the vocabulary of the data each is meant for):")
    lines.append(f"  {'preset':<26} {'data':<5} {'parameters':>12} {'tokens/step':>12}")
    for name in RUN_PRESETS:
        if name not in PRESET_SIZES:  # tests/test_config.py keeps every preset in the table
            lines.append(f"  {name:<26} (size not listed)")
            continue
        tok, params, tokens = PRESET_SIZES[name]
        lines.append(f"  {name:<26} {tok:<5} {params:>12,} {tokens:>12,}")
    lines.append("what a preset costs on this machine: gptforge bench --preset NAME measures its")
    lines.append("tokens/s (a step takes tokens/step / tokens/s); figures measured on named machines:")
    lines.append(f"{docs_page('benchmarks')}")
    return "\n".join(lines)
