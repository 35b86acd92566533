"""gptforge: train GPT-2-class language models from scratch on your own text.

``import gptforge`` is light: the model (and with it torch) loads on first use of ``gptforge.GPT``
or ``gptforge.load``, so commands that need no torch (``gptforge prepare``, the launcher of
``--nproc``) start without paying for it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from gptforge.config import GPTConfig, RunConfig
from gptforge.version import __version__

if TYPE_CHECKING:
    from gptforge.model import GPT

__all__ = ["GPT", "GPTConfig", "RunConfig", "__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "GPT":
        from gptforge.model import GPT

        return GPT
    raise AttributeError(f"module 'gptforge' has no attribute {name!r}")


def load(path: str | os.PathLike[str]) -> GPT:
    """The model in a run directory, a checkpoint directory or a Hugging Face GPT-2 directory,
    in eval mode on the CPU."""
    from gptforge.checkpoint import load_model

    return load_model(path)[0]
