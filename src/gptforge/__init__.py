"""gptforge: train GPT-2-class language models from scratch on your own text."""

from gptforge.config import GPTConfig, RunConfig
from gptforge.model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "RunConfig", "__version__"]
