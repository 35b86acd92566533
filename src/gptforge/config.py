"""Typed configuration: one dataclass per concern, presets, TOML files and dotted overrides.

A run is resolved in this order, each layer overriding the one before:
    preset (``--preset``)  ->  TOML file (``--config``)  ->  ``--set section.key=value`` overrides.
Every value is checked at this boundary: a wrong value raises ``ConfigError`` naming the key and
what is allowed, and an unknown key is an error rather than silently ignored.

A field's docstring (the string literal under it) is its meaning and its metadata its range
(ranges.py): validation, ``--help`` and docs/reference/configuration.md (docgen.py) read both.
This module imports nothing heavier than the standard library, so it is cheap to import anywhere.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from gptforge import sampling
from gptforge.errors import GptforgeError
from gptforge.ranges import (
    AUTO,
    Range,
    allows,
    at_least,
    below_one,
    between,
    disables,
    non_negative,
    one_of,
    out_of_range,
    positive,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(GptforgeError):
    """A configuration value, key or file is wrong."""


# AUTO ("auto"): a value that depends on the device a run starts on (device.resolve_for decides it).

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHTS_DTYPES = ("auto", "float32", "bfloat16", "int8")  # generation's (weights.py)
LOADERS = ("sequential", "random")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
PARALLEL = ("ddp", "fsdp")


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class GPTConfig:
    """Shape of a GPT-2 model. Names follow GPT-2's own (n_layer, n_head, n_embd, block_size)."""

    n_layer: int = field(default=12, metadata=at_least(1))
    "number of transformer blocks"
    n_head: int = field(default=12, metadata=at_least(1))
    "attention heads per block (n_embd must divide by it)"
    n_embd: int = field(default=768, metadata=allows(
        lambda v, m: v >= 1 and v % m.n_head == 0,
        lambda m: f"must be >= 1 and divisible by model.n_head={m.n_head}",
        "must be >= 1 and divisible by model.n_head"))
    "width of the residual stream"
    block_size: int = field(default=1024, metadata=at_least(1))
    "longest context the model can attend over (positions in wpe)"
    vocab_size: int = field(default=50257, metadata=allows(
        lambda v, _: 0 <= v <= 131_072,  # tokenizer.MAX_VOCAB_SIZE
        "must be between 1 and 131,072 (the largest vocabulary prepare trains), or 0 to take it "
        "from the data"))
    "tokens the model can read and predict; 0 in a run config means: take it from the data"
    pad_vocab_multiple: int | str = field(default=1, metadata=at_least(1, "(1 means no padding)",
                                                                     auto=True))
    "round the embedding table up to a multiple of this (64 gives 50,304 rows for faster matmuls); auto: 64 on CUDA and MPS, 1 on the CPU, fixed when a run starts (it is the model's shape); padded ids are never predicted"
    dropout: float = field(default=0.0, metadata=below_one())
    "dropout probability on attention, residual and embeddings (0 disables)"
    bias: bool = True
    "biases in Linear and LayerNorm layers, as in GPT-2"

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        if m == AUTO:
            raise ValueError("model.pad_vocab_multiple is 'auto': resolve it for a device first "
                             "(device.resolve_for)")
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named model shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a small one for CPU."""
        if name not in MODEL_PRESETS:
            raise ConfigError(
                f"unknown model preset {name!r}: choose one of {', '.join(MODEL_PRESETS)}"
            )
        cfg = cls(**{**MODEL_PRESETS[name], **overrides})
        validate(cfg, "model")
        return cfg


# GPT-2's published shapes (Radford et al. 2019, table 2; the released checkpoints), plus small
# shapes that train in seconds on a CPU for tests and laptops.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "gpt2-mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
}


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class DataConfig:
    path: str = ""
    "directory written by `gptforge prepare` (meta.json and its train and val shards)"
    loader: str = field(default="sequential", metadata=one_of(LOADERS))
    "sequential: consecutive windows, wrapping at the end (the original recipe); random: seeded random windows drawn uniformly over all shards"
    mask: bool = True
    "with conversation data (prepare of messages), train only on what the mask marks: the assistants' replies and their end of turn; false: on every token of each conversation (a comparison)"
    verify: str = field(default="sha256", metadata=one_of(("sha256", "sizes"), "choose sha256 or sizes"))
    "what train checks of the shards before it starts: sha256 (each shard against meta.json; reads every byte of the data once) or sizes (headers and sizes only)"


@dataclass
class OptimConfig:
    name: str = field(default="adamw", metadata=one_of(OPTIMIZERS))
    "adamw: AdamW for every parameter; muon: Muon for the blocks' matrices, AdamW for embeddings, gains and biases"
    lr: float = field(default=6e-4, metadata=positive())
    "peak learning rate (AdamW's), reached at the end of warmup"
    min_lr: float = field(default=6e-5, metadata=allows(
        lambda v, o: math.isfinite(v) and 0 <= v <= o.lr,
        lambda o: f"must be between 0 and optim.lr={o.lr}", "must be between 0 and optim.lr"))
    "learning rate at the end of the cosine decay, and after it"
    warmup_steps: int = field(default=1000, metadata=non_negative())
    "steps of linear warmup: lr = lr * (step + 1) / warmup_steps"
    decay_steps: int = field(default=300_000, metadata=allows(
        lambda v, o: v >= o.warmup_steps, lambda o: f"must be >= optim.warmup_steps={o.warmup_steps}",
        "must be >= optim.warmup_steps"))
    "step at which the decay reaches min_lr"
    schedule: str = field(default="cosine", metadata=one_of(SCHEDULES))
    "after warmup: cosine (half cosine down to min_lr at decay_steps) or wsd (hold lr, then a linear cooldown to min_lr over the last cooldown_steps before decay_steps)"
    cooldown_steps: int = field(default=0, metadata=allows(
        lambda v, o: 0 <= v <= o.decay_steps - o.warmup_steps and (o.schedule != "wsd" or v >= 1),
        lambda o: f"must be between 1 and optim.decay_steps - optim.warmup_steps = "
                  f"{o.decay_steps - o.warmup_steps} with schedule=wsd (0 otherwise)",
        "must be between 1 and optim.decay_steps - optim.warmup_steps with schedule=wsd (0 otherwise)"))
    "with schedule=wsd: length of the linear cooldown that ends at decay_steps"
    beta1: float = field(default=0.9, metadata=below_one())
    "AdamW beta1"
    beta2: float = field(default=0.95, metadata=below_one())
    "AdamW beta2"
    eps: float = field(default=1e-8, metadata=positive())
    "AdamW epsilon"
    weight_decay: float = field(default=0.1, metadata=non_negative())
    "AdamW weight decay, applied to 2-D weights (matmuls, embeddings) only"
    grad_clip: float = field(default=1.0, metadata=disables())
    "clip the global gradient norm to this (0 disables clipping)"
    muon_lr: float = field(default=0.02, metadata=positive())
    "with name=muon: peak learning rate of the Muon matrices (follows the same warmup and decay)"
    muon_momentum: float = field(default=0.95, metadata=below_one())
    "with name=muon: Nesterov momentum of the Muon matrices"
    ns_steps: int = field(default=5, metadata=between(1, 20))
    "with name=muon: Newton-Schulz iterations that orthogonalize each update"


@dataclass
class TrainConfig:
    batch_size: int | str = field(default=16, metadata=at_least(1, auto=True))
    "sequences per micro-step per process; auto: on CUDA the largest that fits, found by trial steps at start-up and kept in the run's config (it must divide total_batch_tokens / (seq_len x processes)), elsewhere the preset's"
    seq_len: int = field(default=64, metadata=at_least(1))
    "tokens per sequence (at most model.block_size)"
    total_batch_tokens: int = field(default=4096, metadata=at_least(1))
    "tokens per optimizer step over all processes; accumulation steps = this / (batch_size * seq_len * processes)"
    max_steps: int = field(default=300_000, metadata=at_least(1))
    "stop after this many optimizer steps"
    target_loss: float = field(default=0.0, metadata=disables())
    "stop once the training loss of a step is below this (0 disables)"
    target_val_loss: float = field(default=0.0, metadata=disables())
    "stop once an evaluation's validation loss is below this (0 disables; needs eval_interval)"
    log_interval: int = field(default=100, metadata=at_least(1))
    "print a log line and write metrics.jsonl every this many steps"
    eval_interval: int = field(default=0, metadata=disables())
    "compute validation loss every this many steps when the data has a val split (0 disables; always done at the end)"
    eval_max_batches: int = field(default=0, metadata=disables())
    "cap on validation batches per evaluation (0: the whole val split)"
    hellaswag_interval: int = field(default=0, metadata=disables())
    "score HellaSwag (acc, acc_norm) every this many steps and at the end (0 disables; needs GPT-2 BPE data)"
    hellaswag_data: str = ""
    "HellaSwag .jsonl file for hellaswag_interval (empty: the validation set, downloaded once and cached)"
    save_interval: int = field(default=0, metadata=disables())
    "write a checkpoint every this many steps (0: only at the end)"
    keep_last: int = field(default=3, metadata=at_least(1))
    "how many step checkpoints to keep (older ones are deleted)"
    device: str = field(default="auto", metadata=allows(
        lambda v, _: v in DEVICES or (v.startswith("cuda:") and v[5:].isdigit()),
        f"choose one of {', '.join(DEVICES)} or cuda:N"))
    "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"
    dtype: str = field(default="auto", metadata=one_of(DTYPES))
    "auto (on CUDA bf16 autocast where the GPU has it, else fp32; on a CPU the faster of fp32 and bf16 autocast for this model, measured at start-up and cached; on MPS fp32), float32, bfloat16 or float16"
    seed: int = field(default=1337, metadata=allows(lambda v, _: 0 <= v < 2**63,
                                                    "must be a non-negative integer"))
    "seed for model initialisation, data order and dropout"
    compile: bool | str = AUTO
    "torch.compile the training forward and backward; auto: on CUDA only (the first step pays the compilation; torch caches it for later runs)"
    parallel: str = field(default="ddp", metadata=one_of(PARALLEL))
    "with several processes (torchrun): ddp replicates the model; fsdp shards parameters, gradients and optimizer state"
    dist_timeout_s: int = field(default=900, metadata=at_least(1))
    "seconds a collective may wait before the job fails (a dead rank then stops the others)"
    ddp_bucket_mb: int = field(default=25, metadata=at_least(1))
    "DDP gradient bucket size in MB: each bucket's all-reduce starts as soon as its gradients are ready, overlapping the backward pass"
    activation_checkpointing: bool = False
    "keep only each block's input for the backward pass and recompute the rest there: far less activation memory for about a third more compute; the same losses and gradients"
    sliced_loss: bool = True
    "compute the final LayerNorm, the head and the cross-entropy over slices of train.loss_slice_tokens positions, never holding all the logits (with GPT-2's vocabulary the largest activation: 823 MB in fp32 at 4 x 1024); the same loss and gradients up to float rounding; false: all at once"
    loss_slice_tokens: int = field(default=1024, metadata=at_least(1))
    "positions per slice with train.sliced_loss: at most this many x the vocabulary's logits exist at once"
    keep_freed_memory: bool = True
    "keep freed memory in the process for reuse instead of returning it to the OS each step (Linux; faster on CPU)"
    tensorboard: bool = False
    "also write the logged numbers as TensorBoard scalars to RUN/tensorboard (needs the tensorboard package)"
    wandb: bool = False
    "also log the numbers and the config to Weights & Biases (needs the wandb package; WANDB_MODE=offline keeps them local)"
    wandb_project: str = field(default="gptforge", metadata=allows(
        lambda v, _: 0 < len(v) <= 128 and not any(c in v for c in "/\\#?%:"),
        "must be 1 to 128 characters, none of / \\ # ? % :"))
    "the W&B project that the run goes to"
    mlflow: bool = False
    "also log the numbers and the config to MLflow at MLFLOW_TRACKING_URI, else ./mlruns (needs the mlflow-skinny package)"
    run_name: str = ""
    "the run's name in W&B and MLflow (empty: the name of the --out directory)"


def sampling_rule(name: str) -> Any:
    """A sampling value's range: sampling.py's rule, the one that sample, chat and serve share."""
    return allows(lambda v, _: sampling.Sampling(**{name: v}).problem() is None,
                  f"give {sampling.RULES[name]}")


@dataclass
class SampleConfig:
    """``gptforge sample``'s options; the sampling defaults and rules are sampling.py's, the
    one set that sample, chat and serve share."""

    prompt: str = "\n"
    "text to continue"
    max_new_tokens: int = field(default=sampling.DEFAULT_MAX_TOKENS, metadata=sampling_rule("max_tokens"))
    "tokens to generate per sample (fewer where the end of text or of a turn comes first)"
    top_k: int = field(default=sampling.DEFAULT_TOP_K, metadata=sampling_rule("top_k"))
    "sample among the k most likely tokens (0: all; 1: greedy)"
    top_p: float = field(default=sampling.DEFAULT_TOP_P, metadata=sampling_rule("top_p"))
    "then among the most likely tokens whose probabilities sum to p (nucleus sampling; 1: all)"
    temperature: float = field(default=sampling.DEFAULT_TEMPERATURE, metadata=sampling_rule("temperature"))
    "divide logits by this before sampling, 0 to 2 (lower is more conservative; 0: greedy)"
    num_samples: int = field(default=1, metadata=at_least(1))
    "independent samples to draw, generated as one batch"
    seed: int = field(default=sampling.DEFAULT_SEED, metadata=sampling_rule("seed"))
    "random seed: the same seed gives the same text (for a given --weights-dtype)"
    weights_dtype: str = field(default="auto", metadata=one_of(WEIGHTS_DTYPES))
    "the weights' dtype for generation: auto (the fastest here: measured once on a CPU and cached, bf16 on a CUDA GPU that has it), float32, bfloat16, or int8 (CPU only; pip install 'gptforge[int8]'); not train's --dtype"

    def to_sampling(self, stops: tuple[str, ...] = ()) -> sampling.Sampling:
        return sampling.Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                 max_tokens=self.max_new_tokens, seed=self.seed, stops=stops)


@dataclass
class RunConfig:
    # A run pads its vocabulary where that is faster (GPTConfig alone stays unpadded).
    model: GPTConfig = field(default_factory=lambda: GPTConfig(pad_vocab_multiple=AUTO))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "config") -> "RunConfig":
        cfg = cls()
        apply_dict(cfg, d, origin)
        return cfg


SECTIONS = ("model", "data", "optim", "train", "sample")

# ----------------------------------------------------------------------------------------------
# Reading values from dicts, TOML files and the command line


def _fields(obj: Any) -> dict[str, Any]:
    hints = get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a value against a field type (int, float, bool, str, or one of them | str for
    fields that also take "auto"), converting only where lossless."""
    if isinstance(typ, types.UnionType) or get_origin(typ) is Union:
        if value == AUTO:
            return AUTO
        (base,) = [t for t in get_args(typ) if t is not str]
        try:
            return _coerce(value, base, key)
        except ConfigError:
            raise ConfigError(f"{key} must be {base.__name__} or \"auto\", got {value!r}") from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    pass
                else:
                    if as_float.is_integer():
                        return int(as_float)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the four scalar types are used
        raise AssertionError(f"unsupported config type {typ} for {key}")
    raise ConfigError(f"{key} must be {typ.__name__}, got {value!r}")


def apply_dict(cfg: RunConfig, d: dict[str, Any], origin: str) -> None:
    """Set ``cfg``'s fields from a nested dict ``{section: {key: value}}``; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{origin}: expected a table of sections, got {type(d).__name__}")
    for section, values in d.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{origin}: unknown section [{section}]; sections are {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table of keys")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value, origin)


def set_value(cfg: RunConfig, dotted: str, value: Any, origin: str = "--set") -> None:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        raise ConfigError(
            f"{origin}: {dotted!r} is not a config key; keys look like train.max_steps "
            f"(sections: {', '.join(SECTIONS)})"
        )
    obj = getattr(cfg, section)
    types = _fields(obj)
    if key not in types:
        raise ConfigError(
            f"{origin}: unknown key {dotted!r}; {section} keys are {', '.join(types)}"
        )
    setattr(obj, key, _coerce(value, types[key], dotted))


def parse_override(text: str) -> tuple[str, str]:
    """``'optim.lr=3e-4'`` -> ``('optim.lr', '3e-4')``; the value is typed later by its field."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
    value = value.strip()
    # Accept quoted strings from shells that keep the quotes ('--set sample.prompt="Hi"').
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = value[1:-1]
    return key.strip(), value


RESOLVED = "resolved"  # the table `gptforge config` adds: derived values, recomputed, never read


def load_toml(path: str | Path) -> dict[str, Any]:
    """A config file's sections. A [resolved] table (what `gptforge config` prints after the
    sections) is dropped: it only reports what the sections resolve to."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist: check the path given to --config")
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML ({e}): fix it or remove --config")
    d.pop(RESOLVED, None)
    return d


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> None:
    """Apply ``--set KEY=VALUE`` texts in order (not validated yet: see validate_run)."""
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value)


# ----------------------------------------------------------------------------------------------
# Validation: each field's range is declared beside it (ranges.py); the rules that join sections
# are declared here. Every error names the key and what is allowed.

# Rules across sections: key -> its Range, checked against the whole RunConfig.
RUN_RULES: dict[str, Range] = {
    "train.seq_len": Range(lambda v, cfg: v <= cfg.model.block_size,
                           lambda cfg: f"must be <= model.block_size={cfg.model.block_size}",
                           "must be <= model.block_size"),
    # Muon orthogonalizes whole matrices; FSDP holds each rank's shard of them.
    "train.parallel": Range(lambda v, cfg: not (cfg.optim.name == "muon" and v == "fsdp"),
                            "optim.name=muon needs whole matrices on every rank: use train.parallel=ddp",
                            "ddp when optim.name=muon (Muon needs whole matrices on every rank)"),
}


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def validate(obj: Any, section: str) -> None:
    """Range checks for one section; raises ConfigError naming the key."""
    found = out_of_range(obj)
    if found is not None:
        name, value, allowed = found
        _check(False, f"{section}.{name}", allowed, value)


def validate_run(cfg: RunConfig) -> None:
    for section in SECTIONS:
        validate(getattr(cfg, section), section)
    for key, rule in RUN_RULES.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        _check(rule.ok(value, cfg), key, rule.allowed(cfg), value)


# Keys a resumed run may change: when it stops, how often it reports, evaluates and saves, and
# where and how it runs. Every other key defines the experiment, and a command line that
# continues a run must give the run's own value (config_differences).
RESUMABLE_KEYS = frozenset({
    "data.path",  # data may move; resuming checks its tokenizer and token count
    "data.verify",
    "train.max_steps", "train.target_loss", "train.target_val_loss",
    "train.log_interval", "train.eval_interval", "train.eval_max_batches", "train.save_interval",
    "train.hellaswag_interval", "train.hellaswag_data",
    "train.keep_last", "train.device", "train.dtype", "train.compile", "train.parallel",
    "train.dist_timeout_s", "train.ddp_bucket_mb", "train.activation_checkpointing",
    "train.sliced_loss", "train.loss_slice_tokens",  # the same numbers up to float rounding
    "train.keep_freed_memory",
    "train.tensorboard", "train.wandb", "train.wandb_project", "train.mlflow", "train.run_name",
    *(f"sample.{f.name}" for f in dataclasses.fields(SampleConfig)),
})


def dotted_items(cfg: RunConfig) -> dict[str, Any]:
    """``{"model.n_layer": 12, ...}``: every key of every section, in section order."""
    return {f"{section}.{k}": v for section in SECTIONS
            for k, v in dataclasses.asdict(getattr(cfg, section)).items()}


def config_differences(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every key where a and b differ, in section order."""
    da, db = dotted_items(a), dotted_items(b)
    return [(k, da[k], db[k]) for k in da if da[k] != db[k]]


def grad_accum_steps(train: TrainConfig, world_size: int = 1) -> int:
    """Micro-steps per optimizer step, derived from the batch keys; errors when they do not divide."""
    if train.batch_size == AUTO:
        raise ValueError("train.batch_size is 'auto': resolve it first (step.fit_micro_batch)")
    per_micro = train.batch_size * train.seq_len * world_size
    if train.total_batch_tokens % per_micro != 0:
        procs = f" x {world_size} processes" if world_size > 1 else ""
        raise ConfigError(
            f"train.total_batch_tokens={train.total_batch_tokens} is not a multiple of "
            f"train.batch_size x train.seq_len{procs} = {per_micro}: change one of them"
        )
    return train.total_batch_tokens // per_micro


def format_config(cfg: RunConfig, resolved: dict[str, Any] | None = None, note: str = "") -> str:
    """The config as TOML (a valid --config file: JSON's scalars are TOML's), printed at start and
    saved with the run; with ``resolved``, a [resolved] table after it, headed by ``note``."""
    lines = []
    tables = [(section, dataclasses.asdict(getattr(cfg, section))) for section in SECTIONS]
    if resolved is not None:
        tables.append((RESOLVED, resolved))
    for section, values in tables:
        lines.append(f"[{section}]")
        if section == RESOLVED and note:
            lines.append(f"# {note}")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def field_help(obj_type: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body)."""
    import inspect

    try:
        tree = ast.parse(inspect.getsource(obj_type))
    except (OSError, TypeError):  # source not available (e.g. zipped install)
        return {}
    cls = tree.body[0]
    out: dict[str, str] = {}
    body = cls.body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            out[node.target.id] = nxt.value.value
    return out


SECTION_TYPES: dict[str, type] = {
    "model": GPTConfig, "data": DataConfig, "optim": OptimConfig,
    "train": TrainConfig, "sample": SampleConfig,
}
