"""HellaSwag scoring speed: GPT-2 124M (random init), generated HellaSwag-format examples.

    PYTHONPATH=src python benchmarks/hellaswag_speed.py

Speed does not depend on the weights, so a randomly initialised 124M model stands in for GPT-2;
the real validation set cannot be downloaded here, so the examples are generated: random words
in HellaSwag's shape, half with short contexts and endings (like its ActivityNet part), half
with long ones (like its WikiHow part). Their token counts are printed; the rate in tokens/s is
what carries over to the real file. Each configuration scores the same examples (after one
untimed warm-up batch) through ``gptforge.hellaswag.score``, the function ``gptforge eval --task
hellaswag`` calls. The baseline is one example (4 rows) per forward pass, as build-nanogpt scores.

Printed as a Markdown table (and, with --json, written as JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import random

import torch

from gptforge import GPT, GPTConfig
from gptforge import hellaswag as hs
from gptforge.device import autocast

WORDS = ("the a man woman person dog child girl boy runs jumps swims into onto water then he she "
         "they quickly slowly ball park car house sings dances paints wall kitchen table cuts "
         "onion knife bike road guitar plays smiles camera shows you your should make sure "
         "before after using with hands floor begins continues").split()


def generated_examples(n: int, seed: int) -> list[hs.Example]:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    out = []
    for i in range(n):
        short = i % 2 == 0
        ctx_words, end_words = ((10, 35), (5, 20)) if short else ((40, 110), (15, 45))
        out.append(hs.Example(ctx=words(*ctx_words).capitalize() + ".",
                              endings=tuple(words(*end_words) + "." for _ in range(4)),
                              label=rng.randrange(4)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="model preset (default: gpt2, 124M)")
    p.add_argument("--examples", type=int, default=48, help="examples per configuration (default: 48)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16],
                   help="examples per forward pass; the first is the baseline (default: 1 4 16)")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="precisions to measure (bfloat16: autocast) (default: float32)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(args.preset)).eval()
    items = hs.render_examples(generated_examples(args.examples, seed=0), model.config.block_size)
    row_tokens = [len(r) for it in items for r in it.rows]
    print(f"{args.examples} examples, {len(row_tokens)} rows of {min(row_tokens)}..{max(row_tokens)} "
          f"tokens (mean {sum(row_tokens) / len(row_tokens):.1f}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    device = torch.device("cpu")
    results = []
    for dtype in args.dtypes:
        amp_dtype = torch.bfloat16 if dtype == "bfloat16" else None

        def amp():
            return autocast(device, amp_dtype)

        for b in args.batch_sizes:
            hs.score(model, items[:b], batch_size=b, amp=amp)  # warm-up
            r = hs.score(model, items, batch_size=b, amp=amp)
            results.append({"dtype": dtype, "batch_size": b, "examples": r.examples,
                            "tokens": r.tokens, "wall_s": r.wall_s, "tok_per_s": r.tok_per_s,
                            "examples_per_s": r.examples / r.wall_s, "acc_norm": r.acc_norm})
    base = results[0]["tok_per_s"]
    print("| precision | examples per pass | s | tokens/s | examples/s | vs baseline |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | {r['batch_size']} | {r['wall_s']:.1f} | {r['tok_per_s']:,.0f} | "
              f"{r['examples_per_s']:.2f} | {r['tok_per_s'] / base:.2f}x |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
