"""Where and in what precision to compute: device choice, the precision a run computes in, what
"auto" settings become on each device type, autocast and backend switches.

The training loop stays free of device specifics: it asks this module for a resolved run
(``resolve_for``) and its ``Precision``. What fits in the device's memory is memory.py's; the
step timer is step.py's, and the batches' way to the device data/loader.py's (``BatchFeeder``).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import locale
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gptforge.config import AUTO, ConfigError, RunConfig, TrainConfig, grad_accum_steps
from gptforge.memory import HEADROOM, micro_batch_candidates
from gptforge.presets import DEFAULT_PRESET, RUN_PRESETS, run_preset
from gptforge.probe import DtypeChoice, ProbeShape, cached_choice, measured_choice


def pick_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available: use auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device={name} but only {torch.cuda.device_count()} CUDA devices exist"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name} but MPS is not available: use auto or cpu")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEASURED = "measured at start-up"  # what train.dtype=auto is on a CPU whose answer is not cached


def dtype_name(name: str, device_type: str, present: bool = True,
               shape: ProbeShape | None = None) -> str:
    """train.dtype on ``device_type``. ``auto``: on CUDA bf16 where the device has it (for a CUDA
    device that is not here, planning a run elsewhere, bf16: every data-centre GPU since Ampere
    has it); on MPS fp32; on a CPU what the probe measured for ``shape`` on this machine, if it
    is cached (probe.py), else ``MEASURED``: train measures it when it starts."""
    if name == AUTO:
        if device_type == "cuda":
            name = "bfloat16" if not present or torch.cuda.is_bf16_supported() else "float32"
        elif device_type == "cpu":
            choice = cached_choice(shape) if shape is not None and present else None
            name = choice.dtype if choice is not None else MEASURED
        else:
            name = "float32"
    if name == "float16" and device_type == "cpu":
        raise ConfigError("train.dtype=float16 is not supported on the CPU: use bfloat16 or float32")
    return name


def probe_shape(cfg: RunConfig, world_size: int = 1, preset: str | None = None) -> ProbeShape:
    """What the CPU's dtype probe times for ``cfg`` (its vocabulary known) on a CPU: the model's
    shape and the micro-batch's (``train.batch_size=auto`` is ``preset``'s there)."""
    m, t = cfg.model, cfg.train
    batch_size = int(t.batch_size if t.batch_size != AUTO else preset_micro_batch(t, world_size, preset))
    accum = max(1, t.total_batch_tokens // (batch_size * t.seq_len * world_size))
    pad = m.pad_vocab_multiple if isinstance(m.pad_vocab_multiple, int) else 1
    return ProbeShape(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                      vocab=(m.vocab_size + pad - 1) // pad * pad, batch=batch_size,
                      seq_len=t.seq_len, accum=accum, checkpointing=t.activation_checkpointing,
                      bias=m.bias, keep_freed=t.keep_freed_memory)


def cpu_auto_dtype(shape: ProbeShape, again: bool = False) -> DtypeChoice:
    """train.dtype=auto on this CPU for ``shape``: the cached answer, or measured now (probe.py);
    ``again`` measures even where an answer is cached."""
    return measured_choice(shape, again=again)


def pick_autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32 (see ``dtype_name``). On a CPU, ``auto`` must
    have been measured first (``cpu_auto_dtype``): it depends on the model's shape."""
    name = dtype_name(name, device.type)
    if name == MEASURED:
        raise ValueError("train.dtype=auto on a CPU: measure it first (device.cpu_auto_dtype)")
    return None if name == "float32" else DTYPES[name]


@dataclass(frozen=True)
class Precision:
    """How a training step computes: fp32, or autocast to bf16/fp16 (fp16 with a GradScaler)."""

    device: torch.device
    dtype: torch.dtype | None  # the autocast dtype; None: plain fp32

    @classmethod
    def pick(cls, device: torch.device, name: str) -> "Precision":
        """train.dtype (or bench's --dtype) on ``device``; see ``pick_autocast_dtype``."""
        return cls(device, pick_autocast_dtype(device, name))

    @property
    def label(self) -> str:
        """``float32``, ``bfloat16 autocast`` or ``float16 autocast``, as the logs show it."""
        return "float32" if self.dtype is None else str(self.dtype).replace("torch.", "") + " autocast"

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's loss scaling (bf16 and fp32 have fp32's range and need none)."""
        return torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None


# ----------------------------------------------------------------------------------------------
# What "auto" becomes


@dataclass(frozen=True)
class Resolved:
    """A run's settings as they apply on one device type and number of processes."""

    device: str  # device type: cuda, mps or cpu
    dtype: str  # autocast precision, or float32 for none
    compile: bool
    padded_vocab_size: int  # 0: the vocabulary comes from the data, not known yet
    grad_accum_steps: int | str  # str: train.batch_size=auto on CUDA, known once it has run
    tokens_per_step: int
    pad_vocab_multiple: int  # what model.pad_vocab_multiple becomes (the model's shape)
    batch_size: str = ""  # what train.batch_size=auto does here ("": a number was given)

    def table(self) -> dict[str, Any]:
        """The [resolved] table of `gptforge config`, and the line train logs at start."""
        d = asdict(self)
        del d["pad_vocab_multiple"]  # shown through padded_vocab_size
        if not self.batch_size:
            del d["batch_size"]
        return d


def device_type_of(name: str) -> str:
    """``cuda:1`` -> cuda; ``auto`` -> what this machine would pick."""
    return pick_device("auto").type if name == AUTO else name.split(":")[0]


def resolve_for(cfg: RunConfig, device_type: str, world_size: int = 1, present: bool = True,
                preset: str | None = None) -> Resolved:
    """What ``cfg``'s auto settings become on ``device_type`` with ``world_size`` processes.

    CUDA: compile on, the vocabulary padded to a multiple of 64 (50,257 -> 50,304 rows: the output
    matmul's shape then suits the tensor cores), bf16 autocast, ``train.batch_size=auto`` searched
    at start-up. MPS: padded, eager. CPU: today's measured defaults, eager and unpadded (neither
    pays here, BENCHMARKS.md). Off CUDA, batch_size=auto is the micro-batch of ``preset`` (the run
    preset the config started from). ``present=False`` resolves for a device this machine does not
    have, for planning a run elsewhere.
    """
    m, t = cfg.model, cfg.train
    pad = m.pad_vocab_multiple
    if pad == AUTO:
        pad = 64 if device_type in ("cuda", "mps") else 1
    compile_ = t.compile if t.compile != AUTO else device_type == "cuda"
    padded = (m.vocab_size + pad - 1) // pad * pad
    accum: int | str
    batch = ""
    shape = probe_shape(cfg, world_size, preset) if device_type == "cpu" and m.vocab_size else None
    dtype = dtype_name(t.dtype, device_type, present, shape)
    if t.batch_size != AUTO:
        accum = grad_accum_steps(t, world_size)
    elif device_type == "cuda":
        sizes = micro_batch_candidates(t, world_size)
        accum = f"total_batch_tokens / (batch_size x seq_len x processes): {sizes[-1]} .. 1"
        with_ac = " (with activation checkpointing)" if t.activation_checkpointing else ""
        batch = (f"auto: searched at start-up, the largest of {_listed(sizes)} whose trial forward "
                 f"and backward{with_ac} fits in {HEADROOM:.0%} of the GPU's memory with the optimizer's "
                 "state, on every process (the smallest over processes wins); logged, and kept in "
                 "the run's config")
    else:
        size = preset_micro_batch(t, world_size, preset)
        accum = t.total_batch_tokens // (size * t.seq_len * world_size)
        batch = (f"auto: {size}, preset {preset or DEFAULT_PRESET}'s micro-batch (the search for the "
                 "largest that fits runs on CUDA only)")
    return Resolved(device=device_type, dtype=dtype, compile=bool(compile_), padded_vocab_size=padded,
                    grad_accum_steps=accum, tokens_per_step=t.total_batch_tokens,
                    pad_vocab_multiple=pad, batch_size=batch)


def resolve_here_or_not(cfg: RunConfig, world_size: int, preset: str | None = None,
                        measure: bool = False) -> tuple[Resolved, str]:
    """``resolve_for`` on the device type ``train.device`` names (auto: this machine's), whether or
    not this machine has one, and a note saying which it is (`gptforge config`'s [resolved]).
    On a CPU, ``measure`` measures train.dtype=auto now (again, where it is cached)."""
    device = device_type_of(cfg.train.device)
    present = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(
        device, lambda: True)()
    auto_cpu = device == "cpu" and cfg.train.dtype == AUTO
    if measure and not (auto_cpu and cfg.model.vocab_size):
        raise ConfigError("--measure measures train.dtype=auto on a CPU for a known vocabulary: "
                          "leave train.dtype at auto, use the CPU, and set data.path")
    choice = cpu_auto_dtype(probe_shape(cfg, world_size, preset), again=True) if measure else None
    resolved = resolve_for(cfg, device, world_size, present=present, preset=preset)
    note = (f"what the sections give on {device}{'' if present else ' (not on this machine)'}"
            f" with {world_size} process{'es' if world_size > 1 else ''}; derived, ignored when read back")
    if cfg.model.vocab_size == 0:
        note += "; padded_vocab_size 0: the vocabulary comes from the data (set data.path)"
    if auto_cpu and cfg.model.vocab_size:
        choice = choice or cached_choice(probe_shape(cfg, world_size, preset))
        if choice is not None:  # (what was measured, where the cache could not keep it)
            resolved = dataclasses.replace(resolved, dtype=choice.dtype)
        note += "; " + (choice.line() if choice else "train.dtype=auto: not measured on this CPU "
                        "for this shape yet: train measures it at start-up, `gptforge config "
                        "--measure` now")
    return resolved, note


# ----------------------------------------------------------------------------------------------
# train.batch_size=auto where nothing is searched (the search itself: memory.py)


def _listed(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 6 else (
        f"{', '.join(map(str, sizes[:3]))} .. {', '.join(map(str, sizes[-2:]))}")


def preset_micro_batch(t: TrainConfig, world_size: int, preset: str | None) -> int:
    """batch_size=auto where nothing is searched: the run preset's own micro-batch (the default
    preset's when the config came from none), or the largest size under it that keeps the step."""
    name = preset if preset in RUN_PRESETS else DEFAULT_PRESET
    wanted = int(run_preset(name).train.batch_size)
    return max(b for b in micro_batch_candidates(t, world_size) if b <= wanted or b == 1)


# ----------------------------------------------------------------------------------------------
# Autocast and backend switches


def open_encoding() -> str:
    """The encoding ``open()`` uses when given none: UTF-8 in Python's UTF-8 mode, else the
    locale's."""
    return "utf-8" if sys.flags.utf8_mode else locale.getpreferredencoding(False)


def check_compile_locale() -> None:
    """torch.compile's inductor reads its kernel templates (UTF-8 files) in the locale's encoding
    (torch 2.13, torch/_inductor/utils.py load_template): under an ASCII or Latin-1 locale with
    Python's UTF-8 mode off it stops with a UnicodeDecodeError deep inside torch. Say so first."""
    encoding = open_encoding()
    if codecs.lookup(encoding).name != "utf-8":
        raise ConfigError(
            f"train.compile: torch.compile cannot load its kernel templates under this locale's "
            f"encoding ({encoding}): run with PYTHONUTF8=1 or a UTF-8 locale (LC_ALL=C.UTF-8), or "
            "set train.compile=false")


def eager(compiled: bool = True) -> contextlib.AbstractContextManager:
    """Inside, compiled modules run eagerly. Evaluation uses the bare module, but under FSDP that
    module's blocks are compiled in place, and evaluation's own shapes (HellaSwag's vary by
    batch) would recompile them. (torch.compiler.set_stance: torch >= 2.6.)"""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if compiled and set_stance else contextlib.nullcontext()


def configure_backends(device: torch.device) -> None:
    """Process-wide switches for speed: on CUDA, TF32 tensor cores for the matmuls and
    convolutions autocast leaves in fp32 (10-bit mantissa, fp32 range)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
