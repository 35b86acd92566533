"""gptforge: train GPT-2-class language models from scratch on your own text."""

from gptforge.config import GPTConfig, RunConfig
from gptforge.model import GPT
from gptforge.version import __version__

__all__ = ["GPT", "GPTConfig", "RunConfig", "__version__"]
