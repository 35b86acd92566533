"""gptforge serve under concurrent clients, against one request at a time and transformers.

    PYTHONPATH=src python benchmarks/serve_speed.py --json serve.json   # ~3 minutes on 2 cores

For each model (random-init weights: speed does not depend on what the weights say), a Hugging
Face GPT-2 directory is written and served on 127.0.0.1 by ``gptforge serve`` on the CPU, twice:
with continuous batching (--max-batch 16) and one request at a time (--max-batch 1, the rest
wait in its queue). For 1, 4 and 16 concurrent clients, each cell sends max(4, clients)
requests (each client sends its share in turn), each a 16-token prompt and ``--max-tokens`` new
tokens sampled at temperature 1 with its own seed, and measures the aggregate rate (completion
tokens over the cell's wall time) and each request's latency (sent to whole answer received).
With one client both servers run the same code at batch 1, so that cell is measured once.
Then ``transformers``' ``generate`` runs on the same directory at batch 1, in this process, the
same number of new tokens (min_new_tokens = max_new_tokens), as many requests as the one-client
cell. Printed as a Markdown table (and, with --json, written as JSON).
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from machine import cpu  # the CPU line every benchmark prints

from gptforge import GPT, GPTConfig
from gptforge.hf import write_hf_dir
from gptforge.tokenizer import GPT2Tokenizer

WEIGHTS = "auto"  # --weights-dtype for every server (the main() option sets it)
PROMPT = "The history of the city begins with a small village on the river, where the"


def start(model_dir: Path, max_batch: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptforge", "serve", "--ckpt", str(model_dir), "--port", "0",
         "--device", "cpu", "--max-batch", str(max_batch), "--max-queue", "64",
         "--weights-dtype", WEIGHTS],
        stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    raise SystemExit(f"the server did not start (exit code {proc.wait()})")


def one_request(port: int, seed: int, max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0,
                       "seed": seed})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r = c.getresponse()
    answer = json.loads(r.read())
    elapsed = time.perf_counter() - t0
    c.close()
    if r.status != 200:
        raise SystemExit(f"request failed: {r.status} {answer}")
    return elapsed, answer["usage"]["completion_tokens"]


def cell(port: int, clients: int, max_tokens: int) -> dict:
    """``clients`` threads send max(4, clients) requests in all; the rate and the latencies."""
    total = max(4, clients)
    results: list[tuple[float, int]] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(c, total, clients):
            r = one_request(port, 1000 + i, max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": total, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def hf_generate(model_dir: Path, requests: int, max_tokens: int) -> dict:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = torch.tensor([GPT2Tokenizer().encode(PROMPT)])
    kw = dict(do_sample=True, top_k=0, temperature=1.0, max_new_tokens=max_tokens,
              min_new_tokens=max_tokens, pad_token_id=50256)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        latencies = []
        t0 = time.perf_counter()
        for i in range(requests):
            torch.manual_seed(i)
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            latencies.append(time.perf_counter() - t)
            assert out.size(1) - ids.size(1) == max_tokens
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": 1, "requests": requests, "tokens": requests * max_tokens, "wall_s": wall,
            "tokens_per_s": requests * max_tokens / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[-1]}


def bench_model(preset: str, workdir: Path, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset)).eval()
    model_dir = workdir / preset
    model_dir.mkdir()
    write_hf_dir(model_dir, model, {"name": "gpt2"}, {})
    params = model.num_params()
    del model
    rows = []
    for max_batch, label in ((16, "gptforge serve, batching (--max-batch 16)"),
                             (1, "gptforge serve, one at a time (--max-batch 1)")):
        proc, port = start(model_dir, max_batch)
        try:
            one_request(port, 0, 4)  # warm-up
            for clients in args.clients:
                if max_batch == 1 and clients == 1:
                    continue  # the same code as the batching server's one-client cell
                r = cell(port, clients, args.max_tokens)
                rows.append({"model": preset, "params": params, "server": label, **r})
                print(f"  {preset} {label} {clients} clients: {r['tokens_per_s']:.1f} tok/s, "
                      f"p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait()
    r = hf_generate(model_dir, max(4, min(args.clients)), args.max_tokens)
    rows.append({"model": preset, "params": params,
                 "server": "transformers generate, batch 1 (no server)", **r})
    print(f"  {preset} transformers: {r['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["gpt2-mini", "gpt2"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--weights-dtype", default="auto", help="the servers' --weights-dtype")
    args = p.parse_args()
    global WEIGHTS
    WEIGHTS = args.weights_dtype
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for preset in args.presets:
            rows += bench_model(preset, Path(d), args)
    env = {"cpu": cpu(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    print(f"{env['date']}; {env['cpu']}; torch {env['torch']}, {env['threads']} threads; "
          f"{args.max_tokens} new tokens per request, 16-token prompt, temperature 1")
    print()
    print("| model | how | clients | requests | tokens/s | x one at a time | p50 latency s | p95 latency s |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r["model"]: r["tokens_per_s"] for r in rows if r["clients"] == 1 and "batching" in r["server"]}
    for r in rows:
        print(f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['server']} | {r['clients']} | "
              f"{r['requests']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base[r['model']]:.2f} | "
              f"{r['p50_s']:.2f} | {r['p95_s']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
