"""Where a serving step's time goes: the real engine, its parts timed on its own thread.

    PYTHONPATH=src python benchmarks/serve_profile.py                # ~30 s on 2 cores
    PYTHONPATH=src python benchmarks/serve_profile.py --ops          # + torch.profiler's top ops

For each model (random-init weights, GPT-2's tokenizer) and each batch (1 and 16 rows), one
engine (``gptforge.serve.engine.Engine``, as ``gptforge serve`` builds it) runs on a thread of its
own, as the server's does: that many requests of a 16-token prompt and 64 new tokens at
temperature 1 (top-k 50, the server's default), each with its own seed, submitted at once and
stepped until all are done; the best of ``--repeats`` runs is kept. Each event goes to an asyncio
loop on another thread through ``call_soon_threadsafe``, as the web server's do.

The engine's own methods, the KV cache's and the model's forward pass are wrapped with timers
that count exclusive time (a nested call's time is its own, not its caller's):

- forward: the model's arithmetic and its Python (the forward pass less the cache's calls);
- cache: ``RaggedKVCache``/``KVCache`` bookkeeping (positions, masks, writes, moving rows);
- sampling: turning a step's logits into one token a row (``Engine._sample``);
- delivery: each token to its row: the detokeniser, stop strings, the end checks;
- hand-off: the events crossing to the event loop's thread;
- prefill: each admitted prompt's own forward pass, first token and row set-up, all of it;
- scheduling: the rest of ``Engine.step`` (admitting, compacting rows, Python glue).

Printed as a Markdown table: milliseconds a decode step (each part's total over the run divided
by the decode steps) and its share of the run. The script runs against any gptforge tree with
these method names, so the same command profiles the code before and after a change.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from machine import cpu  # the CPU line every benchmark prints

import gptforge.model as model_module
from gptforge import GPT, GPTConfig
from gptforge.sampling import Sampling
from gptforge.serve.engine import Engine, Job
from gptforge.tokenizer import GPT2Tokenizer

PROMPT = "The history of the city begins with a small village on the river, where the"
PARTS = ("forward", "cache", "sampling", "delivery", "hand-off", "prefill", "scheduling")


class Clock:
    """Exclusive time per label: entering a label pauses the one it was called from."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []  # [label, started]

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            now = time.perf_counter()
            inner = "prefill" if any(s[0] == "prefill" for s in self.stack) else label
            if self.stack:
                parent = self.stack[-1]
                self.spent[parent[0]] += now - parent[1]
            self.stack.append([inner, now])
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.spent[inner] += end - self.stack.pop()[1]
                if self.stack:
                    self.stack[-1][1] = end
        return timed


def instrument(engine: Engine, clock: Clock) -> None:
    """Wrap the engine's, the caches' and the model's methods with the clock."""
    for name, label in (("step", "scheduling"), ("_prefill", "prefill"), ("_sample", "sampling"),
                        ("_deliver", "delivery")):
        setattr(engine, name, clock.wrap(label, getattr(engine, name)))
    engine.model.forward = clock.wrap("forward", engine.model.forward)
    for cls in (model_module.KVCache, model_module.RaggedKVCache):
        for name in ("prepare", "append", "advance", "load", "move"):
            if hasattr(cls, name):
                setattr(cls, name, clock.wrap("cache", getattr(cls, name)))


def profile(preset: str, rows: int, repeats: int, ops: bool) -> dict:
    """Build, warm up and run an engine on a thread of its own; the clock's best run."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    result: dict = {}

    def main() -> None:
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset(preset, vocab_size=50257)).eval()
        tok = GPT2Tokenizer()
        engine = Engine(model, tok, torch.device("cpu"), max_batch=16, max_queue=64)
        engine.warm_up()
        ids = tok.encode(PROMPT)
        received: list[Any] = []
        best = None
        for r in range(repeats + 1):  # the first run warms up
            clock = Clock()
            original = {n: getattr(engine, n) for n in ("step", "_prefill", "_sample", "_deliver")}
            forward = engine.model.forward
            instrument(engine, clock)
            emit = clock.wrap("hand-off", lambda e: loop.call_soon_threadsafe(received.append, e))
            jobs = [Job([ids], 1, Sampling(max_tokens=64, temperature=1.0, seed=1000 + i), emit)
                    for i in range(rows)]
            steps0 = engine.stats.steps
            for job in jobs:
                engine.submit(job)
            t0 = time.perf_counter()
            with torch.inference_mode():
                while engine.step():
                    pass
            wall = time.perf_counter() - t0
            for n, f in original.items():
                setattr(engine, n, f)
            engine.model.forward = forward
            run = {"wall": wall, "steps": engine.stats.steps - steps0, "spent": dict(clock.spent)}
            if r and (best is None or wall < best["wall"]):
                best = run
        result.update(best)
        if ops:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile
            jobs = [Job([ids], 1, Sampling(max_tokens=64, temperature=1.0, seed=i), lambda e: None)
                    for i in range(rows)]
            for job in jobs:
                engine.submit(job)
            with torch_profile(activities=[ProfilerActivity.CPU]) as p, torch.inference_mode():
                while engine.step():
                    pass
            result["ops"] = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)

    saved = {(cls, n): getattr(cls, n) for cls in (model_module.KVCache, model_module.RaggedKVCache)
             for n in ("prepare", "append", "advance", "load", "move") if hasattr(cls, n)}
    thread = threading.Thread(target=main, name="gptforge-engine")
    thread.start()
    thread.join()
    for (cls, n), f in saved.items():
        setattr(cls, n, f)
    loop.call_soon_threadsafe(loop.stop)
    result.update(preset=preset, rows=rows, tokens=rows * 64)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["gpt2-mini", "gpt2"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ops", action="store_true", help="also print torch.profiler's top ops")
    args = p.parse_args()
    results = [profile(preset, rows, args.repeats, args.ops)
               for preset in args.presets for rows in args.rows]
    print(f"{time.strftime('%Y-%m-%d')}; {cpu()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; 16-token prompt, 64 new tokens a request")
    print()
    print("| model | rows | tokens/s | ms a step | " + " | ".join(PARTS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(PARTS))
    for r in results:
        total = sum(r["spent"].values())
        cells = [f"{1e3 * r['spent'].get(k, 0.0) / r['steps']:.2f} "
                 f"({100 * r['spent'].get(k, 0.0) / total:.0f}%)" for k in PARTS]
        print(f"| {r['preset']} | {r['rows']} | {r['tokens'] / r['wall']:.0f} | "
              f"{1e3 * r['wall'] / r['steps']:.2f} | " + " | ".join(cells) + " |")
    for r in results:
        if "ops" in r:
            print(f"\n{r['preset']}, {r['rows']} rows, torch.profiler (self CPU time):\n{r['ops']}")


if __name__ == "__main__":
    main()
