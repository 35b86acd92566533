"""What each command does: the function ``COMMANDS`` runs for it, given its parsed arguments.
``train`` and the launcher it shares with ``bench`` are in launching.py."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from gptforge.cli.launching import launch
from gptforge.config import SampleConfig
from gptforge.errors import GptforgeError


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

    cfg = sample_config(args.ckpt, {f.name: getattr(args, f.name) for f in dataclasses.fields(SampleConfig)})
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


def sample_config(ckpt: str, flags: dict[str, object]) -> SampleConfig:
    """Each value from its flag if given (not None), else from the [sample] section of the run
    ``ckpt`` belongs to, else gptforge's default; a line on stderr names what the run set."""
    from gptforge.generate import run_sample_config

    run = run_sample_config(ckpt)
    base = run or SampleConfig()
    unset = [name for name, value in flags.items() if value is None]
    from_run = [f"{name}={getattr(base, name)!r}" for name in unset
                if getattr(base, name) != getattr(SampleConfig(), name)]
    if from_run:
        print(f"sampling with the run's [sample] section: {', '.join(from_run)} (a flag overrides it)",
              file=sys.stderr)
    return dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})


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

    cfg = sample_config(args.ckpt, {k: getattr(args, k) for k in (
        "temperature", "top_k", "top_p", "seed", "weights_dtype")})
    sampling = checked_sampling(Sampling(
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        max_tokens=args.max_new_tokens or 1, seed=cfg.seed, stops=tuple(args.stop)))
    session = open_session(args.ckpt, sampling, args.system, args.device, cfg.weights_dtype)
    if session.weights_used is not None:
        print(session.weights_used.line(), file=sys.stderr, flush=True)
    if args.max_new_tokens is None:  # the rest of the context, as OpenAI's chat completions
        session.sampling = dc.replace(sampling, max_tokens=session.model.config.block_size)
    if args.message is not None:
        return one_shot(session, args.message)
    if not sys.stdin.isatty():  # a script: the whole of standard input is the one message
        return one_shot(session, sys.stdin.read())
    return interactive(session, os.path.basename(os.path.normpath(args.ckpt)))


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
                                 batch_size=args.batch_size, seq_len=args.seq_len,
                                 device=args.device, progress=True, weights_dtype=args.weights_dtype)
    print(result.line(what) + _weights_said(args.weights_dtype))
    if args.json:
        write_json(args.json, {"checkpoint": args.ckpt, "data": args.data, "what": what,
                               "weights_dtype": args.weights_dtype, **result.to_dict()})
    return 0


def _weights_said(dtype: str) -> str:
    """What eval's result line adds when the weights were not scored as stored."""
    return "" if dtype == "float32" else f" | weights in {dtype} (--weights-dtype)"


def eval_hellaswag(args: argparse.Namespace) -> int:
    """``gptforge eval --task hellaswag``: one result line, a note on stderr if rows were cropped."""
    from gptforge.evaluate import evaluate_hellaswag_path

    for option, given in (("--split", args.split is not None), ("--seq-len", args.seq_len != 0)):
        if given:
            raise GptforgeError(f"{option} applies to --task loss only: leave it out with "
                                "--task hellaswag")
    result, path = evaluate_hellaswag_path(args.ckpt, args.data, limit=args.limit,
                                           batch_size=args.batch_size, device=args.device,
                                           progress=sys.stderr.isatty(),
                                           weights_dtype=args.weights_dtype)
    if result.cropped:
        print(f"note: {result.cropped:,} of {result.rows:,} rows (context + ending) were longer "
              "than the model's context and were cropped from the left", file=sys.stderr)
    print(result.line() + _weights_said(args.weights_dtype))
    if args.json:
        write_json(args.json, {"task": "hellaswag", **result.summary(), "checkpoint": args.ckpt,
                               "data": path, "weights_dtype": args.weights_dtype})
    return 0


def write_json(path: str, obj: object) -> None:
    """A ``--json FILE``: written whole or not at all; a bad path is one line."""
    import json

    from gptforge.atomic import write_text

    try:
        write_text(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise GptforgeError(f"cannot write --json {path} ({e.strerror or e}): choose another path") from None
