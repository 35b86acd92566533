"""What a config field allows, declared beside the field: validation checks it, the reference
and ``--help`` print it, from the one declaration.

A field carries its range in its dataclass metadata, e.g.
``n_layer: int = field(default=12, metadata=at_least(1))``. ``Range.text`` is the wording of the
error (``model.n_layer=0 is out of range: must be >= 1``); ``Range.doc`` is the same words as the
reference shows them (``>= 1``). A range that depends on another key of its section (``optim.min_lr``
at most ``optim.lr``) words its error with the value given and its reference without it.

This module imports no gptforge module: config.py builds on it, and raises the error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

AUTO = "auto"  # a value decided when a run starts, on its device (config.AUTO)
RANGE = "range"  # the metadata key a field's Range is kept under

# What a reference shows of an error's wording: "must be >= 1" reads ">= 1" in a column of ranges.
_VERBS = ("must be ", "choose ", "give ")


@dataclass(frozen=True)
class Range:
    """The values a field (or a key, for a rule across sections) may take."""

    ok: Callable[[Any, Any], bool]  # (the value, the object holding it) -> allowed
    text: str | Callable[[Any], str]  # the error's words; a callable words them from that object
    reference: str = ""  # the reference's words where ``text`` is a callable (it names values)

    def allowed(self, holder: Any) -> str:
        return self.text(holder) if callable(self.text) else self.text

    @property
    def doc(self) -> str:
        words = self.reference or self.text
        assert isinstance(words, str), "a Range worded by a callable needs its reference words"
        for verb in _VERBS:
            if words.startswith(verb):
                return words[len(verb):]
        return words


def allows(ok: Callable[[Any, Any], bool], text: str | Callable[[Any], str],
           reference: str = "") -> Mapping[str, Range]:
    """A field's metadata: a range of its own."""
    return {RANGE: Range(ok, text, reference)}


def at_least(low: int, note: str = "", auto: bool = False) -> Mapping[str, Range]:
    """``>= low`` (or "auto" where the field also takes it); ``note`` says what an edge value means."""
    text = f"must be >= {low}{f' {note}' if note else ''}{' or auto' if auto else ''}"
    return allows(lambda v, _: (auto and v == AUTO) or v >= low, text)


def disables() -> Mapping[str, Range]:
    """A count or threshold where 0 turns the feature off."""
    return allows(lambda v, _: math.isfinite(v) and v >= 0, "must be >= 0 (0 disables)")


def non_negative() -> Mapping[str, Range]:
    return allows(lambda v, _: math.isfinite(v) and v >= 0, "must be >= 0")


def positive() -> Mapping[str, Range]:
    return allows(lambda v, _: math.isfinite(v) and v > 0, "must be a positive number")


def below_one() -> Mapping[str, Range]:
    """A probability or a decay rate: [0, 1)."""
    return allows(lambda v, _: 0.0 <= v < 1.0, "must be in [0, 1)")


def between(low: int, high: int) -> Mapping[str, Range]:
    return allows(lambda v, _: low <= v <= high, f"must be between {low} and {high}")


def one_of(choices: tuple[str, ...], text: str = "") -> Mapping[str, Range]:
    return allows(lambda v, _: v in choices, text or f"choose one of {', '.join(choices)}")


def field_range(cls_field: dataclasses.Field) -> Range | None:
    return cls_field.metadata.get(RANGE)


def out_of_range(obj: Any) -> tuple[str, Any, str] | None:
    """The first field of ``obj`` (in declaration order) outside its range, as (name, value, the
    error's words), or None."""
    for f in dataclasses.fields(obj):
        r = field_range(f)
        value = getattr(obj, f.name)
        if r is not None and not r.ok(value, obj):
            return f.name, value, r.allowed(obj)
    return None
