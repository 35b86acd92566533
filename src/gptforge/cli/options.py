"""What each command accepts: the groups several commands share (the run config, the device,
``--json FILE``), then each command's own options, in the order ``--help`` lists them."""

from __future__ import annotations

import argparse
import dataclasses

from gptforge.config import DTYPES, MODEL_PRESETS, SampleConfig, TrainConfig, field_help
from gptforge.presets import DEFAULT_PRESET, RUN_PRESETS
from gptforge.version import docs_page


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
    """sample's values, and chat's sampling values: a flag, else the run's [sample] section (its
    config: ``train --set sample.temperature=0.8``), else gptforge's default; None marks unset."""
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="run directory, checkpoint directory or Hugging Face GPT-2 directory")
    defaults, helps = SampleConfig(), field_help(SampleConfig)
    for f in dataclasses.fields(SampleConfig):  # one option per field, its docstring as help
        default = getattr(defaults, f.name)
        shown = "a newline" if f.name == "prompt" else default  # a newline would break the layout
        p.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=None,
                       metavar="TEXT" if f.name == "prompt" else None,
                       help=f"{helps.get(f.name, '')} (default: {shown}, or the run's sample.{f.name})")
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
    p.add_argument("--temperature", type=float, default=None,
                   help=f"0 to 2; 0 is greedy (default: {s.DEFAULT_TEMPERATURE}, or the run's sample.temperature)")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"0: all tokens (default: {s.DEFAULT_TOP_K}, or the run's sample.top_k)")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"nucleus sampling; 1: all (default: {s.DEFAULT_TOP_P}, or the run's sample.top_p)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the session's replies: the same seed and messages give the same replies "
                        f"(default: {s.DEFAULT_SEED}, or the run's sample.seed)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="also end a reply where TEXT appears (repeatable, up to 4)")
    p.add_argument("--weights-dtype", default=None, metavar="DTYPE",
                   help=field_help(SampleConfig)["weights_dtype"]
                   + " (default: auto, or the run's sample.weights_dtype)")


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
    p.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="the weights' dtype while scoring: float32, the checkpoint as stored, so "
                        "that reported losses do not move with the machine; bfloat16 or int8 (CPU "
                        "only; pip install 'gptforge[int8]') to score what sample and serve run "
                        "(the loss itself is computed in float32) (default: float32)")


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


def serve_arguments(p: argparse.ArgumentParser) -> None:
    from gptforge.serve.options import add_arguments  # no web stack: help only

    add_arguments(p)
