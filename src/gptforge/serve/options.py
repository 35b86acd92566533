"""The options of ``gptforge serve``: one typed dataclass whose field docstrings are the CLI help.

Defaults and range checks live here, beside the server, so the CLI only maps flags to fields.
Importing this module costs nothing (no torch, no web stack): the CLI imports it to build --help.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass

from gptforge.config import WEIGHTS_DTYPES
from gptforge.errors import GptforgeError

# The request body limit: a prompt fills at most the model's context (GPT-2: 1,024 tokens, a few
# kilobytes of text), so 1 MiB leaves room for a list of prompts and refuses what is no request.
DEFAULT_MAX_BODY_BYTES = 1 << 20
MAX_BODY_BYTES_LIMIT = 4 << 20


@dataclass
class ServeOptions:
    ckpt: str = ""
    "run directory, checkpoint directory or Hugging Face GPT-2 directory (what sample accepts)"
    host: str = "127.0.0.1"
    "address to listen on (0.0.0.0: every interface; set an --api-key before exposing it)"
    port: int = 8000
    "TCP port to listen on (0: any free port, printed at start-up)"
    device: str = "auto"
    "auto, cpu, cuda, cuda:N or mps"
    weights_dtype: str = "auto"
    "the weights' dtype: auto (the fastest here: measured once on a CPU and cached, bf16 on a CUDA GPU that has it), float32, bfloat16, or int8 (CPU only; pip install 'gptforge[int8]')"
    model_name: str = ""
    "the model's id in the API (/v1/models, the 'model' field); empty: the --ckpt directory's name"
    max_batch: int = 16
    "rows decoded together in one forward pass (a request takes prompts x n rows); their KV cache is allocated at start-up"
    max_queue: int = 64
    "requests that may wait for a free row; beyond that the server answers 503 at once"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    "largest request body accepted, in bytes (at most 4 MiB); a larger one gets 413"
    grace_s: float = 10.0
    "on SIGTERM or Ctrl-C, seconds that running requests get to finish before they are cancelled"
    access_log: bool = False
    "log one line per HTTP request"
    api_key: str = ""
    "require this key (Authorization: Bearer KEY, the openai client's api_key) on every route but the page and /health; empty: the GPTFORGE_API_KEY environment variable (which ps cannot show), else no key"


# How --help names each option's value.
SERVE_METAVARS = {"ckpt": "PATH", "host": "HOST", "port": "PORT", "device": "DEVICE", "weights_dtype": "DTYPE",
                  "model_name": "NAME", "max_batch": "ROWS", "max_queue": "REQUESTS",
                  "max_body_bytes": "BYTES", "grace_s": "SECONDS", "api_key": "KEY"}
API_KEY_ENV = "GPTFORGE_API_KEY"


def validate_options(opts: ServeOptions) -> None:
    """Range checks; raises GptforgeError naming the option and what is allowed."""
    def check(ok: bool, flag: str, value: object, allowed: str, what: str = "out of range") -> None:
        if not ok:
            raise GptforgeError(f"--{flag} {value} is {what}: {allowed}")

    if not opts.ckpt:
        raise GptforgeError("--ckpt is required: give a run, checkpoint or Hugging Face GPT-2 directory")
    check(0 <= opts.port <= 65535, "port", opts.port, "give 0..65535 (0: any free port)")
    check(1 <= opts.max_batch <= 4096, "max-batch", opts.max_batch, "give 1..4096")
    check(1 <= opts.max_queue <= 1_000_000, "max-queue", opts.max_queue, "give 1..1000000")
    check(1024 <= opts.max_body_bytes <= MAX_BODY_BYTES_LIMIT, "max-body-bytes",
          opts.max_body_bytes, f"give 1024..{MAX_BODY_BYTES_LIMIT}")
    check(math.isfinite(opts.grace_s) and opts.grace_s >= 0, "grace-s", opts.grace_s,
          "give a number of seconds >= 0")
    check(bool(opts.host.strip()), "host", repr(opts.host), "give an address such as 127.0.0.1",
          what="empty")
    if opts.api_key and (len(opts.api_key) < 8 or not opts.api_key.isprintable() or " " in opts.api_key):
        raise GptforgeError("--api-key (or GPTFORGE_API_KEY) must be 8 or more printable "
                            "characters without spaces: e.g. python -c 'import secrets; "
                            "print(secrets.token_urlsafe(24))'")
    check(opts.weights_dtype in WEIGHTS_DTYPES, "weights-dtype", opts.weights_dtype,
          f"give {', '.join(WEIGHTS_DTYPES)}", what="not a weights dtype")
    check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", opts.device) is not None, "device",
          opts.device, "give auto, cpu, cuda, cuda:N or mps", what="not a device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One option per field of ServeOptions, its docstring as the help."""
    from gptforge.config import field_help

    helps = field_help(ServeOptions)
    for f in dataclasses.fields(ServeOptions):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=helps.get(f.name, ""))
        else:  # an empty default is left unset, so that --help shows none
            p.add_argument(flag, type=type(default), default=default or None,
                           required=f.name == "ckpt", metavar=SERVE_METAVARS.get(f.name),
                           help=helps.get(f.name, ""))
