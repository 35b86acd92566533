"""Generation speed with and without the KV cache: GPT-2 124M (random init), batch 1, greedy.

    PYTHONPATH=src python benchmarks/generate_speed.py

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="model preset (default: gpt2, 124M)")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="new tokens per run")
    p.add_argument("--no-cache-max", type=int, default=256,
                   help="longest uncached run measured in full (default: 256)")
    p.add_argument("--tail", type=int, default=4,
                   help="tokens measured at the end of a full context (0: skip) (default: 4)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

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
