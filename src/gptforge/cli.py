"""The ``gptforge`` command: a thin shell over the library, and a table of its subcommands.

``COMMANDS`` maps each command to the one function that runs it and the options it adds, in the
order ``--help`` lists them. Options more than one command takes are declared once, as groups:
the run config (``--preset/--config/--set``), the device, and ``--json FILE``.

Every user-facing problem arrives here as a ``GptforgeError`` and leaves as one line on stderr
with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import signal
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptforge.config import (
    DTYPES,
    MODEL_PRESETS,
    SampleConfig,
    TrainConfig,
    field_help,
)
from gptforge.errors import GptforgeError
from gptforge.presets import DEFAULT_PRESET, RUN_PRESETS, keys_help
from gptforge.version import DOCS_URL, __version__, docs_page

Options = Callable[[argparse.ArgumentParser], None]


# ----------------------------------------------------------------------------------------------
# The commands


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptforge.data.prepare import prepare, summary

    try:
        meta = prepare(args.inputs, args.out, **{k: getattr(args, k) for k in (
            "tokenizer", "val_fraction", "force", "errors", "url", "format", "text_field", "workers",
            "shard_tokens", "max_tokens", "seed", "vocab_size", "tokenizer_sample_mb",
            "messages_field", "max_conversation_tokens")})
    except KeyboardInterrupt:
        print("gptforge prepare: interrupted; run the same command again to continue from the "
              "last complete shard", file=sys.stderr)
        return 130
    print(summary(meta, args.out))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gptforge.launch import elastic, launch_rank, restart_count
    from gptforge.rundir import check_not_locked, hold_run_lock

    writer = launch_rank() == 0  # under torchrun, rank 0 writes the run and holds its lock
    restarted = restart_count() > 0 or elastic()  # torchrun's agents may have restarted the job
    if writer and not restarted:  # a live run is refused at once: not inside torchrun, nor after
        check_not_locked(args.out)  # importing torch (a restart waits for the dead one's lock)
    launching = _launch_of(args)
    if launching is not None:  # this process only launches and waits: it needs no torch
        return launch(launching, args.argv, run_dir=args.out)
    if restarted:
        args.resume = _resume_after_restart(args.out, args.resume)
    from gptforge.console import say
    from gptforge.distributed import PeerLost
    from gptforge.resume import FINISHED, plan_run
    from gptforge.train import train
    # The lock first: a live run is reported before anything of it is read or written.
    with hold_run_lock(args.out, enabled=writer, create=args.resume != "",
                       wait_s=RESTART_LOCK_WAIT_S if restarted else 0):
        plan = plan_run(args.out, args.resume, args.preset, args.config, args.set, args.data,
                        args.init_from, verify="sha256" if writer else "sizes")
        if plan.complete is not None:
            if writer:
                say(f"{args.out}: {plan.complete}; nothing to do")
            return 0
        if not plan.cfg.data.path:
            raise GptforgeError("no training data: pass --data DIR (made by `gptforge prepare`)")
        try:
            result = train(plan.cfg, args.out, resume=plan.resume, restart=plan.restart,
                           preset=None if plan.resume is not None else (args.preset or DEFAULT_PRESET),
                           init_from=args.init_from if plan.resume is None else None)
        except PeerLost as e:
            from gptforge.launch import report_peer_lost

            if report_peer_lost(str(e)):  # gptforge's launcher names the lost machine, once
                return 2
            raise
    # Stopped by a signal (saved, resumable): 128 + its number, as a shell reports a process a
    # signal stopped (130 for Ctrl-C, 143 for SIGTERM). 0 means the run reached its end, so a
    # job script can loop until it gets 0.
    code = 0 if result.stopped_by in FINISHED else 128 + getattr(signal, result.stopped_by, signal.SIGTERM)
    if not writer:
        return code  # rank 0 reports for the job
    for line in ["", *result.summary(args.out)]:
        say(line)
    return code


# How long a restarted job's new rank 0 waits for the run's lock: torchrun stops every worker
# before it restarts any, so the lock is normally free at once; this covers a dead holder's
# descriptor that outlives it for a moment (a forked child, an NFS server's lease).
RESTART_LOCK_WAIT_S = 60


def _resume_after_restart(out: str, resume: str | None) -> str:
    """A job torchrun restarts continues its run from the last checkpoint: no --resume means
    --resume auto, and a run started from another checkpoint (--resume PATH) continues from its
    own latest once it has one. Every start of an elastic job (--max-restarts > 0) is treated
    so, the first included: all ranks must decide alike, and torchrun's restart count may be 0
    on one machine and 1 on another after the same restart (pytorch#108158)."""
    from gptforge.rundir import CHECKPOINT_DIR, LATEST

    if resume is None:
        return "auto"
    if resume not in ("", "auto") and (Path(out) / CHECKPOINT_DIR / LATEST).is_file():
        return ""
    return resume


def _launch_of(args: argparse.Namespace):  # noqa: ANN202 - gptforge.launch.Launch | None
    """The --nproc family as a Launch, or None when this process is to train itself."""
    from gptforge.launch import Launch

    given = {k: getattr(args, k, None) for k in ("nproc", "nnodes", "rdzv_endpoint", "rdzv_id", "max_restarts")}
    if all(v is None for v in given.values()):
        return None
    return Launch(**{k: v for k, v in given.items() if v is not None})


def launch(launching, argv: list[str], run_dir: str | None = None) -> int:  # noqa: ANN001
    """``gptforge COMMAND --nproc N ...`` = ``torchrun --standalone --nproc_per_node=N -m gptforge
    COMMAND ...`` (with --nnodes, on each machine: ``torchrun --nnodes=M ... --rdzv-backend=c10d``).
    A job that fails ends the command with one line: which rank died and how, or which machine
    was lost, and (for a training run) its last checkpoint and the command that continues it."""
    from gptforge.launch import lost_peers, torchrun

    result = torchrun(launching, argv)
    if not result.failures:
        return result.code
    first = result.failures[0]
    dead = [f for f in result.failures if f.exitcode != 2]  # 2: it said what was wrong, in one line
    restarts = (f" after its {launching.max_restarts} restart{'s' * (launching.max_restarts > 1)} "
                "(--max-restarts) were used up" if launching.max_restarts else "")
    if dead:
        line = f"gptforge {argv[0]}: error: rank {dead[0].rank} {dead[0].how}, and the job stopped{restarts}"
    elif result.lost is not None:
        line = f"gptforge {argv[0]}: error: {lost_peers(result.lost)}, and the job stopped{restarts}"
    elif restarts:
        line = (f"gptforge {argv[0]}: error: the job failed the same way on every attempt (above), "
                f"and stopped{restarts}")
    else:
        return result.code
    if run_dir is not None:
        from gptforge.resume import continue_hint

        line += "; " + continue_hint(run_dir, argv) + (" (on every node)" if launching.multinode else "")
    print(line, file=sys.stderr)
    return dead[0].code if dead else first.code


def cmd_config(args: argparse.Namespace) -> int:
    from gptforge.config import format_config
    from gptforge.data import load_meta
    from gptforge.device import resolve_here_or_not
    from gptforge.presets import resolve
    from gptforge.resume import resolve_model_vocab

    if args.nproc is not None and args.nproc < 1:
        raise GptforgeError(f"--nproc {args.nproc}: give the number of processes, 1 or more")
    overrides = [*args.set, *([f"train.device={args.device}"] if args.device else [])]
    cfg = resolve(args.preset, args.config, overrides)
    if cfg.model.vocab_size == 0 and cfg.data.path:
        resolve_model_vocab(cfg, load_meta(cfg.data.path))
    resolved, note = resolve_here_or_not(cfg, args.nproc or 1, args.preset, measure=args.measure)
    print(format_config(cfg, resolved.table(), note).rstrip())
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gptforge.report import plot_runs

    out = plot_runs(args.runs, args.out, log_loss=args.log_loss)
    print(f"wrote {out}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from gptforge.report import runs_table

    print(runs_table(args.dir))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.nproc is not None:  # this process only launches and waits: it needs no torch
        if args.compare:
            raise GptforgeError("--compare runs one process: leave out --nproc for it")
        from gptforge.launch import Launch

        return launch(Launch(nproc=args.nproc), args.argv)
    import json

    from gptforge.bench import bench, compare_with_plain, format_results, result_dict

    if args.loss_slice_tokens < 1:
        raise GptforgeError("--loss-slice-tokens must be >= 1 (--no-sliced-loss turns the slices off)")
    result = bench(args.preset, args.batch_size, args.seq_len, args.steps, args.warmup,
                   args.device, args.dtype, args.compile, args.plain, args.peak_seconds, args.data,
                   args.ddp_bucket_mb, args.activation_checkpointing,
                   args.loss_slice_tokens if args.sliced_loss else 0)
    if result is None:
        return 0  # a rank other than 0 under torchrun: rank 0 reports for the job
    results = [result]
    if args.compare and not args.plain:
        results.insert(0, compare_with_plain(args.argv[1:]))
    if args.json == "-":  # machine-readable only (the child process of --compare)
        print(json.dumps(result_dict(result)))
        return 0
    print(format_results(results))
    if args.json:
        write_json(args.json, [result_dict(r) for r in results])
        print(f"wrote {args.json}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from gptforge.generate import SampleEcho, sample

    cfg = SampleConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SampleConfig)})
    sampling = checked_sampling(cfg.to_sampling(tuple(args.stop)))
    if cfg.num_samples < 1:
        raise GptforgeError(f"--num-samples {cfg.num_samples} is out of range: give 1 or more")
    shown = SampleEcho(cfg.prompt)  # one sample is printed as it is generated
    texts = sample(args.ckpt, cfg.prompt, sampling, cfg.num_samples, device=args.device,
                   use_cache=not args.no_cache, stream=shown if cfg.num_samples == 1 else None,
                   weights_dtype=cfg.weights_dtype, announce=lambda line: print(line, file=sys.stderr))
    if shown.parts:
        print(texts[0][len("".join(shown.parts)):])
        return 0
    for i, text in enumerate(texts):
        if i:
            print("-" * 40)
        print(text)
    return 0


# The flag of each sampling value (sample and chat share them).
SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
                  "max_tokens": "--max-new-tokens", "seed": "--seed", "stops": "--stop"}


def checked_sampling(sampling):  # noqa: ANN001, ANN201 - (Sampling) -> Sampling
    """The sampling values of a command line, checked by sampling.py's one set of rules."""
    from gptforge.sampling import RULES

    found = sampling.problem()
    if found is not None:
        name, value = found
        shown = " ".join(f"{s!r}" for s in value) if name == "stops" else value
        raise GptforgeError(f"{SAMPLING_FLAGS[name]} {shown} is out of range: give {RULES[name]}")
    return sampling


def cmd_chat(args: argparse.Namespace) -> int:
    import dataclasses as dc
    import os

    from gptforge.chat import interactive, one_shot, open_session
    from gptforge.sampling import Sampling

    sampling = checked_sampling(Sampling(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        max_tokens=args.max_new_tokens or 1, seed=args.seed, stops=tuple(args.stop)))
    session = open_session(args.ckpt, sampling, args.system, args.device, args.weights_dtype)
    if session.weights_used is not None:
        print(session.weights_used.line(), file=sys.stderr, flush=True)
    if args.max_new_tokens is None:  # the rest of the context, as OpenAI's chat completions
        session.sampling = dc.replace(sampling, max_tokens=session.model.config.block_size)
    if args.message is not None:
        return one_shot(session, args.message)
    if not sys.stdin.isatty():  # a script: the whole of standard input is the one message
        return one_shot(session, sys.stdin.read())
    return interactive(session, os.path.basename(os.path.normpath(args.ckpt)))


def serve_arguments(p: argparse.ArgumentParser) -> None:
    from gptforge.serve.options import add_arguments  # no web stack: help only

    add_arguments(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from gptforge.serve import ServeOptions, serve

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)}
    return serve(ServeOptions(**{k: v for k, v in given.items() if v is not None}))


def cmd_export(args: argparse.Namespace) -> int:
    from gptforge.export import export_gguf, export_hf

    if args.format == "gguf":
        if args.weights_only:
            raise GptforgeError("--weights-only is for --format hf: leave it out")
        result = export_gguf(args.ckpt, args.out, force=args.force)
        for note in result.notes:
            print(f"note: {note}")
        print(f"wrote {result.path}: load it with llama.cpp (llama-cli -m FILE, or "
              "llama_cpp.Llama(FILE) in Python)")
        return 0
    result = export_hf(args.ckpt, args.out, force=args.force, weights_only=args.weights_only)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.path}: {', '.join(result.files)}")
    if not args.weights_only:
        print("load it with transformers: GPT2LMHeadModel.from_pretrained(DIR), "
              "AutoTokenizer.from_pretrained(DIR)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gptforge.evaluate import evaluate_path

    if args.task == "hellaswag":
        return eval_hellaswag(args)
    if not args.data:
        raise GptforgeError("--data is required with --task loss: give a prepared directory or a "
                            "UTF-8 text file")
    if args.limit:
        raise GptforgeError("--limit applies to --task hellaswag only: leave it out")
    result, what = evaluate_path(args.ckpt, args.data, split=args.split or "val",
                                 batch_size=args.batch_size,
                                 seq_len=args.seq_len, device=args.device, progress=True)
    print(result.line(what))
    if args.json:
        write_json(args.json, {"checkpoint": args.ckpt, "data": args.data, "what": what,
                               **result.to_dict()})
    return 0


def eval_hellaswag(args: argparse.Namespace) -> int:
    """``gptforge eval --task hellaswag``: one result line, a note on stderr if rows were cropped."""
    from gptforge.evaluate import evaluate_hellaswag_path

    for option, given in (("--split", args.split is not None), ("--seq-len", args.seq_len != 0)):
        if given:
            raise GptforgeError(f"{option} applies to --task loss only: leave it out with "
                                "--task hellaswag")
    result, path = evaluate_hellaswag_path(args.ckpt, args.data, limit=args.limit,
                                           batch_size=args.batch_size, device=args.device,
                                           progress=sys.stderr.isatty())
    if result.cropped:
        print(f"note: {result.cropped:,} of {result.rows:,} rows (context + ending) were longer "
              "than the model's context and were cropped from the left", file=sys.stderr)
    print(result.line())
    if args.json:
        write_json(args.json, {"task": "hellaswag", **result.summary(), "checkpoint": args.ckpt,
                               "data": path})
    return 0


def write_json(path: str, obj: object) -> None:
    """A ``--json FILE``: written whole or not at all; a bad path is one line."""
    import json

    from gptforge.atomic import write_text

    try:
        write_text(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise GptforgeError(f"cannot write --json {path} ({e.strerror or e}): choose another path") from None


# ----------------------------------------------------------------------------------------------
# Options: the groups several commands share, then each command's own


def config_options(p: argparse.ArgumentParser) -> None:
    """A run's config: preset -> TOML file -> overrides (train, config)."""
    p.add_argument("--preset", default=None, choices=list(RUN_PRESETS),
                   help=f"starting configuration (default: {DEFAULT_PRESET})")
    p.add_argument("--config", metavar="FILE", help="TOML file of [section] keys, applied over the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=3e-4 (repeatable)")


def device_option(p: argparse.ArgumentParser) -> None:
    """Where a command computes (sample, eval, bench)."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def json_option(p: argparse.ArgumentParser) -> None:
    """A machine-readable copy of the result (eval, bench)."""
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON to FILE")


def prepare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, directories (read recursively, hidden files skipped) or glob "
                        "patterns; .txt/.md (one document per file), .jsonl/.json (one per line), "
                        ".parquet (one per row), text and JSON lines optionally .gz/.zst/.xz/.bz2; "
                        "or 'shakespeare' for Tiny Shakespeare (ships with gptforge: nothing is "
                        "downloaded)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", default="gpt2", metavar="gpt2|char|bpe|PATH", help=(
        "gpt2: GPT-2 BPE (50,257 tokens); char: one token per character; bpe: a byte-level BPE "
        "trained on these inputs, kept in DIR as tokenizer.json; PATH: reuse the tokenizer of a "
        "tokenizer.json, a prepared DIR or a run (default: gpt2)"))
    p.add_argument("--vocab-size", type=int, metavar="N", help="with bpe (required): 259 (the "
                   "bytes, <|im_start|>, <|im_end|> and <|endoftext|>) to 131,072 tokens; past "
                   "65,536 the shards are uint32")
    p.add_argument("--tokenizer-sample-mb", type=float, metavar="MB", help="with bpe: train on a "
                   "deterministic sample of about MB megabytes of larger inputs; 0: all (default: 100; the "
                   f"time and memory it took on named machines: {docs_page('benchmarks')})")
    p.add_argument("--format", default=None, choices=["text", "jsonl", "parquet"],
                   help="read every input as this format, whatever its extension")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field or Parquet column holding the text (default: text)")
    p.add_argument("--messages-field", default=None, metavar="NAME",
                   help="read conversations (OpenAI's list of role/content messages) from this "
                        "JSON field or Parquet column: ChatML ids plus a mask of what is trained "
                        "on (docs/chat.md); without it, JSON lines or Parquet whose records have "
                        "no --text-field but a 'messages' field are read as conversations")
    p.add_argument("--max-conversation-tokens", type=int, default=None, metavar="N",
                   help="split conversations longer than N tokens on turn boundaries (each part "
                        "keeps the system message; the count is reported); without it, train "
                        "refuses at start-up a conversation longer than train.seq_len + 1")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction held out for validation: whole documents (chosen by a seeded "
                        "hash) when there are many, the last tokens of a single text; 0 trains "
                        "on everything (default: 0.1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the choice of validation documents (default: 0)")
    p.add_argument("--shard-tokens", type=int, default=None, metavar="N",
                   help="tokens per shard file (default: 100,000,000, i.e. 200 MB)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="stop after N tokens (train and val together), e.g. to try a huge corpus")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizer processes (default: all cores); the output is the same for any N")
    p.add_argument("--errors", default="strict", choices=["strict", "replace"],
                   help="invalid UTF-8: strict stops with the file and byte offset; replace substitutes U+FFFD (default: strict)")
    p.add_argument("--force", action="store_true",
                   help="replace data (finished or not) that other arguments made in DIR")
    p.add_argument("--url", default=None,
                   help="download a named dataset from this address (a mirror) instead of using the "
                        "copy that ships with gptforge or its canonical address")


def train_io_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="prepared data directory (from gptforge prepare)")
    p.add_argument("--out", required=True, metavar="RUN",
                   help="run directory: config, metrics.jsonl and checkpoints go here")


def train_start_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="auto|PATH",
                   help="continue the run in --out (or from checkpoint PATH) exactly where it "
                        "stopped; 'auto': continue it if it has a checkpoint, else start it, and "
                        "exit 0 if it is complete (the same command for the first start and "
                        "every restart of a preemptible job)")
    p.add_argument("--init-from", metavar="PATH", default=None,
                   help="start from the weights of a local Hugging Face GPT-2 directory or a "
                        "gptforge run/checkpoint (fine-tuning); the model shape comes from there")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (launches torchrun; one per GPU, "
                        "or N CPU processes with gloo); with --nnodes, N on each machine")
    p.add_argument("--nnodes", type=int, default=None, metavar="M",
                   help="train on M machines: run the same command on each (docs/distributed.md); "
                        "torchrun decides which one writes the run, so --out must be shared storage")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="where the machines meet: an address of one of them (the first) and a free "
                        "port there, the same on every machine (torchrun's c10d rendezvous)")
    p.add_argument("--rdzv-id", default=None, metavar="ID",
                   help="the job's name at the endpoint, the same on every machine (default: gptforge)")
    p.add_argument("--max-restarts", type=int, default=None, metavar="R",
                   help="restart the whole job up to R times when a process dies (torchrun's elastic "
                        "restarts); the run continues from its last checkpoint")


def sample_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="run directory, checkpoint directory or Hugging Face GPT-2 directory")
    defaults, helps = SampleConfig(), field_help(SampleConfig)
    for f in dataclasses.fields(SampleConfig):  # one option per field, its docstring as help
        default = getattr(defaults, f.name)
        text = helps.get(f.name, "")
        if f.name == "prompt":
            text += " (default: a newline)"  # a literal newline would break the help layout
        p.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default, help=text)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample where TEXT appears, leaving TEXT out (repeatable, up to 4); "
                        "samples also end at <|endoftext|> and, with a chat model, <|im_end|>")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole context for every token instead of using the KV "
                        "cache (slower; same tokens)")


def chat_options(p: argparse.ArgumentParser) -> None:
    from gptforge import sampling as s

    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="a chat model: a run or checkpoint fine-tuned on conversations, or its "
                        "Hugging Face export")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message that starts the conversation (it is never dropped)")
    p.add_argument("-m", "--message", default=None, metavar="TEXT",
                   help="ask once: print the reply to TEXT and exit (standard input that is not "
                        "a terminal is read as one message too)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="the longest reply (default: until the model ends its turn or the "
                        "context is full, as OpenAI's chat completions)")
    p.add_argument("--temperature", type=float, default=s.DEFAULT_TEMPERATURE,
                   help="0 to 2; 0 is greedy")
    p.add_argument("--top-k", type=int, default=s.DEFAULT_TOP_K, help="0: all tokens")
    p.add_argument("--top-p", type=float, default=s.DEFAULT_TOP_P, help="nucleus sampling; 1: all")
    p.add_argument("--seed", type=int, default=s.DEFAULT_SEED,
                   help="seeds the session's replies: the same seed and messages give the same replies")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="also end a reply where TEXT appears (repeatable, up to 4)")
    p.add_argument("--weights-dtype", default="auto", metavar="DTYPE",
                   help=field_help(SampleConfig)["weights_dtype"])


def export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="PATH", help="run directory or checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR|FILE",
                   help="directory to write (hf), or the .gguf file (gguf)")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: a Hugging Face GPT-2 directory (transformers); gguf: one GGUF file "
                        "for llama.cpp, Ollama and LM Studio (needs pip install 'gptforge[gguf]')")
    p.add_argument("--force", action="store_true", help="replace DIR (or FILE) if it already holds files")
    p.add_argument("--weights-only", action="store_true",
                   help="export a char-level model anyway: config and weights, with the char "
                        "vocabulary in gptforge_tokenizer.json (transformers has no tokenizer for it)")


def eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="run directory, checkpoint directory or Hugging Face GPT-2 directory")
    p.add_argument("--task", default="loss", choices=["loss", "hellaswag"],
                   help="loss: loss, bits per byte and perplexity of --data; hellaswag: HellaSwag, completion "
                        "style as llm.c and build-nanogpt score it (default: loss)")
    p.add_argument("--data", metavar="DIR|FILE",
                   help="prepared data directory (from gptforge prepare) or a UTF-8 text file; "
                        "with --task hellaswag a HellaSwag .jsonl file (default there: the "
                        "validation set, downloaded once and cached)")
    p.add_argument("--split", default=None, choices=["val", "train"],
                   help="split of a prepared directory (default: val)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="windows per forward pass; with --task hellaswag, examples (of 4 rows) "
                        "per forward pass (default: 4)")
    p.add_argument("--seq-len", type=int, default=0, metavar="N",
                   help="tokens per window (default: the model's context)")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="with --task hellaswag: score only the first N examples (default: all)")


def config_cmd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"],
                   help="resolve for this device type, here or not (sets train.device; default: "
                        "train.device, where auto is what this machine has)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="resolve for N processes (accumulation steps) (default: 1)")
    p.add_argument("--measure", action="store_true",
                   help="on a CPU, measure now what train.dtype=auto becomes for this model and "
                        "micro-batch (fp32 and bf16 autocast timed on the run's shapes), again "
                        "where an answer is cached; it is cached for train")


def bench_shape_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="gpt2",
                   help=f"model preset ({', '.join(MODEL_PRESETS)}) or run preset")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step per process (default: 64 on CUDA, 16 elsewhere)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: 1024 on CUDA, 64 elsewhere)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (start-up, compile)")


def bench_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="precision, as train.dtype")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the step (default: as train.compile=auto, on CUDA only)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="batches from this prepared directory's train split, and the model takes its "
                        "vocabulary, as train does (default: random tokens)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="benchmark DDP with N processes on this machine (launches torchrun)")
    p.add_argument("--ddp-bucket-mb", type=int, default=25, metavar="MB",
                   help="DDP gradient bucket size, as train.ddp_bucket_mb")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward pass, as train.activation_checkpointing")
    p.add_argument("--sliced-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="the head and loss in slices of --loss-slice-tokens positions, as train.sliced_loss")
    p.add_argument("--loss-slice-tokens", type=int, default=TrainConfig.loss_slice_tokens, metavar="N",
                   help="positions per slice, as train.loss_slice_tokens")
    p.add_argument("--plain", action="store_true",
                   help="the baseline: fp32, eager, default allocator, default AdamW")
    p.add_argument("--compare", action="store_true",
                   help="also measure the plain baseline (in a child process) and report the ratio")
    p.add_argument("--peak-seconds", type=float, default=2.0,
                   help="how long to measure the matmul peak that MFU is judged against")


def plot_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the PNG")
    p.add_argument("--log-loss", action="store_true", help="log-scale loss axes (default: linear)")


def runs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default=".", metavar="DIR",
                   help="directory holding run directories (default: the current directory)")


# ----------------------------------------------------------------------------------------------
# The table


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows every option's default after its meaning; an
    address is never broken across lines (so it can be copied)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False,
                             break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text.lower() and action.option_strings
                and action.default not in (None, argparse.SUPPRESS, False, [])):
            text += " (default: %(default)s)"
        return text


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes get the same treatment as every other error: one line, exit code 2.
    Every (sub)command's help shows each option's default."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    args = parser.parse_args(argv)
    if hasattr(args, "argv"):  # train --nproc re-launches itself with the same arguments
        args.argv = list(sys.argv[1:] if argv is None else argv)
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
