"""Generation speed: with and without the KV cache (GPT-2 124M, random init, batch 1, greedy);
and, with --ckpt, each weights dtype against transformers and llama.cpp on the same weights.

    PYTHONPATH=src python benchmarks/generate_speed.py
    PYTHONPATH=src python benchmarks/generate_speed.py --ckpt RUN --data DIR --out DIR

With --ckpt (a trained run; --data its prepared directory, for the validation loss): gptforge's
``generate`` with float32, bfloat16 and int8 weights, ``transformers``' fp32 ``generate`` on the
``gptforge export`` of the same checkpoint, and llama.cpp (llama-cpp-python) on its GGUF export
in f32 and quantized to q8_0 by llama.cpp's own quantizer; each greedy from a fixed prompt, at
batch 1, on torch's and llama.cpp's threads alike. Reports tokens/s after the first token (the
prompt's prefill left out), the first 32 greedy tokens against gptforge fp32's (the position of
the first difference), and each gptforge dtype's loss on the first --val-tokens of the
validation split. See compare_engines.

Every figure is measured; nothing is extrapolated. For each length in --tokens, the cached path
generates that many tokens from a one-token prompt (<|endoftext|>). The uncached path recomputes
the whole context for every token, so its cost grows with the length; it runs in full only up
to --no-cache-max new tokens. Beyond that, the script measures what the uncached path costs per
token at the end of a full context instead: --tail tokens after a prompt of block_size - tail
random tokens, with both paths, so the ratio at that point is measured too.

Printed as a Markdown table (and, with --json, written as JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from gptforge import GPT, GPTConfig
from gptforge.generate import generate
from gptforge.tokenizer import GPT2_EOT_ID


def timed_generate(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool) -> dict[str, float]:
    """Generate n tokens greedily; total time, time to the first token, and the rest's rate."""
    stamps: list[float] = []
    start = time.perf_counter()
    out = generate(model, prompt, n, top_k=1, use_cache=use_cache,
                   on_token=lambda _b, _t: stamps.append(time.perf_counter()))
    assert len(out[0]) == n and len(stamps) == n
    total = stamps[-1] - start
    first = stamps[0] - start  # the prompt's forward pass (prefill) plus one token
    rest = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")
    return {"new_tokens": n, "prompt_tokens": prompt.size(1), "total_s": total,
            "tokens_per_s": n / total, "first_token_s": first, "after_first_tokens_per_s": rest}


PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n"
COMPARED = 32  # greedy tokens compared across dtypes and engines


def first_difference(a: list[int], b: list[int], n: int = COMPARED) -> str:
    """'equal', or the position (0-based) of the first of the n tokens that differs."""
    for i, (x, y) in enumerate(zip(a[:n], b[:n])):
        if x != y:
            return f"differs from token {i}"
    return "equal"


def rate(stamps: list[float]) -> float:
    """Tokens per second after the first (the prompt's prefill left out)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def ours(model, ids: list[int], n: int) -> tuple[list[int], float]:
    stamps: list[float] = []
    out = generate(model, torch.tensor([ids]), n, top_k=1,
                   on_token=lambda _b, _t: stamps.append(time.perf_counter()))[0]
    return out, rate(stamps)


def val_loss(model, tokens: "np.ndarray", block: int) -> float:
    """Mean loss over consecutive windows of ``block`` tokens of ``tokens``."""
    losses = []
    with torch.inference_mode():
        for i in range(0, len(tokens) - block - 1, block):
            x = torch.from_numpy(tokens[i : i + block + 1].astype("int64"))
            losses.append(float(model(x[None, :-1], x[None, 1:])[1]))
    return sum(losses) / len(losses)


def transformers_generate(hf_dir: str, ids: list[int], n: int) -> tuple[list[int], float]:
    from transformers import GPT2LMHeadModel

    class Stamps:  # a streamer: put() is called with the prompt, then with each new token
        def __init__(self) -> None:
            self.t: list[float] = []

        def put(self, value) -> None:  # noqa: ANN001
            self.t.append(time.perf_counter())

        def end(self) -> None:
            pass

    model = GPT2LMHeadModel.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, do_sample=False)  # warm-up
        stamps = Stamps()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, streamer=stamps, pad_token_id=0)
    return out[0, len(ids):].tolist(), rate(stamps.t[1:])


def llama_generate(gguf: str, ids: list[int], n: int, threads: int,
                   extra_bufts: bool = True) -> tuple[list[int], float]:
    import numpy as np
    from llama_cpp import Llama

    if not extra_bufts:  # see compare_engines: llama.cpp's AMX buffer crashed in q8_0 here
        import llama_cpp

        default = llama_cpp.llama_cpp.llama_model_default_params

        def params():  # noqa: ANN202
            p = default()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        llm = Llama(gguf, n_ctx=1024, n_threads=threads, n_threads_batch=threads, logits_all=True,
                verbose=False)
    finally:
        if not extra_bufts:
            llama_cpp.llama_cpp.llama_model_default_params = default

    def run(k: int) -> tuple[list[int], list[float]]:
        llm.reset()
        llm.eval(ids)
        got, stamps = [], []
        for _ in range(k):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(nxt)
            stamps.append(time.perf_counter())
            llm.eval([nxt])
        return got, stamps

    run(4)  # warm-up
    got, stamps = run(n)
    return got, rate(stamps)


def quantize_q8_0(src: str, dst: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), as its llama-quantize tool runs it."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise RuntimeError("llama.cpp could not quantize to q8_0")


def compare_engines(args: argparse.Namespace) -> None:
    import datetime
    from pathlib import Path

    from machine import cpu

    from gptforge import weights
    from gptforge.checkpoint import load_model
    from gptforge.evaluate import eval_tokens
    from gptforge.export import export_gguf, export_hf
    from gptforge.tokenizer import tokenizer_from_dict

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    model, record = load_model(args.ckpt)
    tok = tokenizer_from_dict(record)
    ids = tok.encode(PROMPT)
    val = eval_tokens(args.data, "val", record)[0][: args.val_tokens + 1] if args.data else None
    rows = []
    for dtype in ("float32", "bfloat16", "int8"):
        m = weights.cast(load_model(args.ckpt)[0], dtype)
        ours(m, ids, 4)  # warm-up
        got, r = ours(m, ids, args.new)
        loss = val_loss(m, val, args.val_window) if val is not None else float("nan")
        rows.append({"engine": "gptforge", "weights": dtype, "tokens": got, "tokens_per_s": r,
                     "val_loss": loss})
        del m
    export_hf(args.ckpt, out / "hf", force=True)
    got, r = transformers_generate(str(out / "hf"), ids, args.new)
    rows.append({"engine": "transformers", "weights": "float32", "tokens": got, "tokens_per_s": r})
    try:
        export_gguf(args.ckpt, out / "f32.gguf", force=True)
        quantize_q8_0(str(out / "f32.gguf"), str(out / "q8_0.gguf"))
        for name in ("f32", "q8_0"):
            # q8_0 without llama.cpp's extra buffer types: on the AMX Xeon its AMX buffer
            # (repacked q8_0) crashed at the first forward pass (llama-cpp-python 0.3.36)
            got, r = llama_generate(str(out / f"{name}.gguf"), ids, args.new, threads,
                                    extra_bufts=name == "f32")
            weights_name = name if name == "f32" else f"{name} (no extra buffer types)"
            rows.append({"engine": "llama.cpp", "weights": weights_name, "tokens": got,
                         "tokens_per_s": r})
    except ImportError as e:
        print(f"llama.cpp left out: {e}")
    base = next(r for r in rows if r["engine"] == "transformers")["tokens_per_s"]
    ref = rows[0]["tokens"]
    date = datetime.date.today().isoformat()
    print(f"{cpu()}; torch {torch.__version__}, {threads} threads; {date}")
    print(f"{model.num_params():,} parameters, batch 1, greedy, {len(ids)}-token prompt, "
          f"{args.new} new tokens (tokens/s after the first)\n")
    print("| engine | weights | tokens/s | x transformers fp32 | first 32 greedy tokens vs gptforge fp32 | val loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        loss = f"{r['val_loss']:.4f}" if "val_loss" in r else "-"
        print(f"| {r['engine']} | {r['weights']} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base:.2f}x | {first_difference(ref, r['tokens'])} | {loss} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": cpu(), "date": date, "rows": rows}, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="model preset (default: gpt2, 124M)")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="new tokens per run")
    p.add_argument("--no-cache-max", type=int, default=256,
                   help="longest uncached run measured in full (default: 256)")
    p.add_argument("--tail", type=int, default=4,
                   help="tokens measured at the end of a full context (0: skip) (default: 4)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--ckpt", help="compare dtypes and engines on this trained run (see above)")
    p.add_argument("--data", help="with --ckpt: its prepared data directory (validation loss)")
    p.add_argument("--out", default="/tmp/generate-speed", help="with --ckpt: where exports go")
    p.add_argument("--new", type=int, default=128, help="with --ckpt: greedy tokens timed")
    p.add_argument("--val-tokens", type=int, default=8192, help="with --ckpt: tokens scored")
    p.add_argument("--val-window", type=int, default=64,
                   help="with --ckpt: tokens per scored window (gpt2-shakespeare's seq_len)")
    args = p.parse_args()
    if args.ckpt:
        compare_engines(args)
        return

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(args.preset)).eval()
    block = model.config.block_size
    one = torch.tensor([[GPT2_EOT_ID]])
    with torch.no_grad():
        model(one)  # warm-up: first-call allocations are not generation speed

    rows: list[dict] = []
    for n in args.tokens:
        rows.append({"what": f"{n} new tokens", "cache": True, **timed_generate(model, one, n, True)})
        if n <= args.no_cache_max:
            rows.append({"what": f"{n} new tokens", "cache": False,
                         **timed_generate(model, one, n, False)})
    if args.tail:
        prompt = torch.randint(0, model.config.vocab_size, (1, block - args.tail))
        for cache in (True, False):
            rows.append({"what": f"{args.tail} tokens at context {block - args.tail}..{block - 1}",
                         "cache": cache, **timed_generate(model, prompt, args.tail, cache)})

    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
           "params": model.num_params(), "block_size": block}
    print(f"model {args.preset} ({env['params']:,} parameters), batch 1, greedy, CPU fp32, "
          f"torch {env['torch']}, {env['threads']} threads")
    print()
    print("| run | KV cache | total s | tokens/s | first token s | tokens/s after the first |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {'yes' if r['cache'] else 'no'} | {r['total_s']:.1f} | "
              f"{r['tokens_per_s']:.2f} | {r['first_token_s']:.2f} | {r['after_first_tokens_per_s']:.2f} |")
    print()
    by = {(r["what"], r["cache"]): r for r in rows}
    for what in dict.fromkeys(r["what"] for r in rows):
        if (what, True) in by and (what, False) in by:
            key = "after_first_tokens_per_s" if "context" in what else "tokens_per_s"
            ratio = by[(what, True)][key] / by[(what, False)][key]
            print(f"cache / no cache, {what} ({key.replace('_', ' ')}): {ratio:.1f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
