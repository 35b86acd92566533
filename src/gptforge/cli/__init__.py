"""The ``gptforge`` command: a thin shell over the library, and a table of its subcommands.

``COMMANDS`` maps each command to the one function that runs it (commands.py; ``train`` in
launching.py) and the options it adds (options.py), in the order ``--help`` lists them. Options
more than one command takes are declared once, as groups: the run config
(``--preset/--config/--set``), the device, and ``--json FILE``.

Every user-facing problem arrives here as a ``GptforgeError`` and leaves as one line on stderr
with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from gptforge.cli.commands import (
    cmd_bench,
    cmd_chat,
    cmd_config,
    cmd_eval,
    cmd_export,
    cmd_plot,
    cmd_prepare,
    cmd_runs,
    cmd_sample,
    cmd_serve,
)
from gptforge.cli.launching import cmd_train
from gptforge.cli.options import (
    bench_run_options,
    bench_shape_options,
    chat_options,
    config_cmd_options,
    config_options,
    device_option,
    eval_options,
    export_options,
    json_option,
    plot_options,
    prepare_options,
    runs_options,
    sample_options,
    serve_arguments,
    train_io_options,
    train_start_options,
)
from gptforge.cli.parser import OneLineErrorParser, whole_text_values
from gptforge.errors import GptforgeError
from gptforge.presets import keys_help
from gptforge.version import DOCS_URL, __version__, docs_page

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

Options = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    help: str  # one line in `gptforge --help`
    description: str  # the head of `gptforge NAME --help`
    options: tuple[Options, ...]  # what the command adds, in --help's order
    epilog: Callable[[], str] | None = None
    relaunches: bool = False  # --nproc N runs the same command line again under torchrun


COMMANDS: tuple[Command, ...] = (
    Command("prepare", cmd_prepare, "tokenize text, JSON lines or Parquet into training shards",
            "Tokenize documents (text files, JSON lines, Parquet; files, directories or globs; or "
            "a named dataset: shakespeare) into DIR/train-NNNNNN.bin and DIR/val-NNNNNN.bin shards "
            "and DIR/meta.json. An interrupted run continues where it stopped when the same "
            "command is run again.",
            (prepare_options,)),
    Command("train", cmd_train, "train a model", "Train a GPT-2 model on prepared data.",
            (train_io_options, config_options, train_start_options), keys_help, relaunches=True),
    Command("sample", cmd_sample, "generate text from a trained model",
            "Generate text from a run's latest checkpoint, a checkpoint directory or a Hugging "
            "Face GPT-2 directory.",
            (sample_options, device_option)),
    Command("chat", cmd_chat, "talk to a chat model in the terminal, or ask it once",
            "Talk to a model fine-tuned on conversations (docs/chat.md): replies stream as they "
            "are generated; the conversation stays within the model's context (the oldest "
            "exchanges are dropped, with a notice); /reset, /quit; Ctrl-C stops a reply. "
            "--message TEXT (or piped standard input) asks once and prints the reply.",
            (chat_options, device_option)),
    Command("serve", cmd_serve, "serve a model over an OpenAI-compatible HTTP API, with a web page",
            "Serve a run, checkpoint or Hugging Face GPT-2 directory: POST /v1/completions "
            "(OpenAI's protocol, streaming or not; requests share forward passes), GET /v1/models, "
            "GET /health, and a page to try it at /. Needs pip install 'gptforge[serve]'.",
            (serve_arguments,)),
    Command("export", cmd_export, "write a checkpoint for transformers, or as GGUF for llama.cpp",
            "Write a checkpoint as a directory that transformers loads offline: "
            "GPT2LMHeadModel.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR); with "
            "--format gguf, as one GGUF file for llama.cpp.",
            (export_options,)),
    Command("eval", cmd_eval, "loss, bits per byte, perplexity on a split or text file, or HellaSwag",
            "Score every token of a prepared split or a text file (consecutive windows; not a "
            "sampled estimate), or, with --task hellaswag, HellaSwag's acc and acc_norm.",
            (eval_options, device_option, json_option)),
    Command("config", cmd_config, "print the complete config a run would use, resolved",
            "Print, as TOML, the complete config `train` would run with (every section and key), "
            "and a [resolved] table of what its auto settings become on a device type with N "
            "processes. The output is a valid --config file.",
            (config_options, config_cmd_options), keys_help),
    Command("bench", cmd_bench, "measure training throughput, FLOP/s and MFU",
            "Time full training steps (forward, backward, clipping, optimizer) on random tokens, "
            "the way `train` runs them.",
            (bench_shape_options, device_option, bench_run_options, json_option), relaunches=True),
    Command("plot", cmd_plot, "plot losses, learning rate, grad norm and throughput of runs",
            "Draw one PNG comparing runs: loss against steps and tokens (train and val), learning "
            "rate, gradient norm and tokens/s.",
            (plot_options,)),
    Command("runs", cmd_runs, "list the runs under a directory",
            "A table of the runs under DIR: preset, status, steps, tokens, losses, wall time, "
            "throughput and latest checkpoint.",
            (runs_options,)),
)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="gptforge",
        description="Train GPT-2-class language models from scratch on your own text.",
        epilog=f"documentation: {DOCS_URL} (every command's options: {docs_page('reference/cli')})",
    )
    p.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        sp = sub.add_parser(command.name, help=command.help, description=command.description,
                            epilog=command.epilog() if command.epilog else None)
        for add in command.options:
            add(sp)
        sp.set_defaults(func=command.run, **({"argv": None} if command.relaunches else {}))
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


def _escape_unprintable(e: UnicodeError) -> tuple[str | bytes, int]:
    """An encoding error handler for the terminal: a byte that came in undecodable (a path in
    another encoding, surrogate-escaped) goes out as that byte again; any other character the
    terminal's encoding lacks, as a backslash escape."""
    if not isinstance(e, UnicodeEncodeError):
        raise e
    c = e.object[e.start]
    if "\udc80" <= c <= "\udcff":
        return bytes([ord(c) - 0xDC00]), e.start + 1
    return c.encode("ascii", "backslashreplace").decode("ascii"), e.start + 1


def _printable_output() -> None:
    """Text the terminal's encoding cannot show (a sample in Greek under a Latin-1 locale, any
    non-ASCII under LC_ALL=C with Python's UTF-8 mode off) is printed as backslash escapes
    rather than stopping the command with a UnicodeEncodeError; paths keep their bytes."""
    codecs.register_error("gptforge-terminal", _escape_unprintable)
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="gptforge-terminal")


def main(argv: list[str] | None = None) -> None:
    _printable_output()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(whole_text_values(parser, argv))
    if hasattr(args, "argv"):  # train --nproc re-launches itself with the same arguments
        args.argv = argv
    warnings.formatwarning = _one_line_warning
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
    except GptforgeError as e:
        from gptforge.launch import repeated_error

        line = f"gptforge {args.command}: error: {e}"
        if not repeated_error(line):  # said once by an elastic job, not on every restart
            print(line, file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"gptforge {args.command}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
