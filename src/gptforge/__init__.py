"""gptforge: train GPT-2-class language models from scratch on your own text."""

from __future__ import annotations

import os

from gptforge.config import GPTConfig, RunConfig
from gptforge.model import GPT
from gptforge.version import __version__

__all__ = ["GPT", "GPTConfig", "RunConfig", "__version__", "load"]


def load(path: str | os.PathLike[str]) -> GPT:
    """The model in a run directory, a checkpoint directory or a Hugging Face GPT-2 directory,
    in eval mode on the CPU. (Imported here lazily, so ``import gptforge`` stays light.)"""
    from gptforge.checkpoint import load_model

    return load_model(path)[0]
