"""Does chat fine-tuning work, on a CPU, in minutes? And what is the mask worth?

    python benchmarks/chat_demo.py --out /tmp/chat-demo [--task repeat] [--sft-steps 1000]

The task (``--task repeat``, the default): repeat a few words the user gives. A user asks
"Repeat: river stone apple" and the assistant answers "river stone apple" (the first word without
the space it has in the request: other tokens). The words come from a list of 48 common ones, 3 to
5 of them, so held-out conversations are new combinations; the reply must match exactly.
``--task reverse`` asks for them in reverse order, which takes longer to learn.

The steps, each through the real ``gptforge`` commands:

1. a base model: Tiny Shakespeare (it ships with gptforge) with a 2,048-token BPE trained on it
   (which reserves the chat tokens), ``gpt2-mini``'s shape (4 layers, 128 wide, context 256)
   pre-trained for ``--pretrain-steps``; it writes Shakespeare and has never seen the task;
2. conversations: 4,000 for fine-tuning and 200 held out, written as JSON lines of OpenAI's
   ``messages`` (a system message, the request, the reply) and prepared with the base's tokenizer;
3. fine-tuning with the ``chat-sft`` preset from the base, ``--sft-steps`` steps: once on the
   mask (the replies only), once with ``data.mask=false`` (every token of the conversations);
4. exact-match accuracy of each of the three models on the 200 held-out conversations, greedy
   (temperature 0), through gptforge chat's own session (tokenizer/chat.py renders the prompt).

Prints a Markdown table and writes it with the raw figures to OUT/chat_demo.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ("apple river stone cloud bread horse queen sword tower candle garden winter summer "
         "silver golden forest mirror castle dragon letter window forty purple yellow orange "
         "thunder velvet marble copper hammer ribbon pocket lantern meadow harbor island "
         "blanket button spider rabbit monkey pepper honey butter coffee violin guitar rocket").split()


TASKS = {  # name: (system message, the request's word, the answer from the words)
    "reverse": ("Reverse the order of the words the user gives.", "Reverse", lambda w: w[::-1]),
    "repeat": ("Repeat the words the user gives, in order.", "Repeat", lambda w: w),
}


def conversation(rng: random.Random, task: str) -> tuple[list[dict[str, str]], str]:
    system, verb, answer_of = TASKS[task]
    words = rng.sample(WORDS, rng.randint(3, 5))
    answer = " ".join(answer_of(words))
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"{verb}: " + " ".join(words)},
            {"role": "assistant", "content": answer}], answer


def gptforge(*args: str) -> float:
    """Run a gptforge command; its wall time."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gptforge", *args], check=True,
                   env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - t0


def exact_match(run: Path, held_out: list[tuple[list[dict[str, str]], str]]) -> float:
    sys.path.insert(0, str(SRC))
    from gptforge.chat import ChatSession
    from gptforge.checkpoint import load_model
    from gptforge.sampling import Sampling
    from gptforge.tokenizer import tokenizer_from_dict

    model, record = load_model(run)
    tok = tokenizer_from_dict(record)
    right = 0
    for messages, answer in held_out:
        session = ChatSession(model, tok, Sampling(temperature=0, max_tokens=24),
                              system=messages[0]["content"])
        reply = session.reply(messages[1]["content"], lambda text: None)
        right += reply.text.strip() == answer
    return right / len(held_out)


def pretrain(out: Path, steps: int, common: list[str]) -> dict[str, float]:
    """Tiny Shakespeare, a 2,048-token BPE trained on it, gpt2-mini's shape for ``steps``."""
    times = {"prepare text": gptforge("prepare", "shakespeare", "--out", str(out / "text"),
                                      "--tokenizer", "bpe", "--vocab-size", "2048")}
    times["pretrain"] = gptforge("train", "--data", str(out / "text"), "--out", str(out / "base"),
                                 "--preset", "gpt2-mini", *common, f"--set=train.max_steps={steps}",
                                 f"--set=optim.decay_steps={steps}", "--set=train.eval_interval=0")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--sft-steps", type=int, default=1000)
    ap.add_argument("--train", type=int, default=4000, help="fine-tuning conversations")
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--task", choices=list(TASKS), default="repeat")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cpu_t = {"device": "cpu", "dtype": "auto"}
    common = [f"--set=train.{k}={v}" for k, v in cpu_t.items()]
    times = {}

    # 1. the base model (kept from an earlier run into the same --out)
    if (out / "base" / "checkpoints").is_dir():
        times["pretrain"] = json.loads((out / "chat_demo.json").read_text())["times_s"]["pretrain"]
    else:
        times.update(pretrain(out, args.pretrain_steps, common))

    # 2. the conversations, held-out ones never seen in training
    rng = random.Random(0)
    held, seen = [], set()
    while len(held) < args.held_out:
        messages, answer = conversation(rng, args.task)
        if messages[1]["content"] not in seen:
            seen.add(messages[1]["content"])
            held.append((messages, answer))
    train = []
    while len(train) < args.train:
        messages, _ = conversation(rng, args.task)
        if messages[1]["content"] not in seen:
            train.append(messages)
    for old in ("sft-data", "sft", "sft-no-mask"):  # an earlier run's, of this or another task
        shutil.rmtree(out / old, ignore_errors=True)
    (out / "sft.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in train),
                                   encoding="utf-8")
    times["prepare conversations"] = gptforge("prepare", str(out / "sft.jsonl"), "--out",
                                              str(out / "sft-data"), "--tokenizer", str(out / "base"),
                                              "--val-fraction", "0.05")

    # 3. fine-tuning, with the mask and without
    for name, mask in (("sft", "true"), ("sft-no-mask", "false")):
        times[name] = gptforge("train", "--data", str(out / "sft-data"), "--out", str(out / name),
                               "--init-from", str(out / "base"), "--preset", "chat-sft", *common,
                               f"--set=train.max_steps={args.sft_steps}",
                               f"--set=optim.decay_steps={args.sft_steps}", f"--set=data.mask={mask}")

    # 4. exact match on the held-out conversations
    rows = []
    for name, what in (("base", "before fine-tuning (the base model)"),
                       ("sft", "fine-tuned on the mask (replies only)"),
                       ("sft-no-mask", "fine-tuned on every token (data.mask=false)")):
        acc = exact_match(out / name, held)
        rows.append({"model": name, "what": what, "exact_match": acc,
                     "train_s": times.get(name, times["pretrain"])})
        print(f"{what}: exact match {acc:.1%}", flush=True)
    machine = cpu()
    lines = [f"{machine}; {datetime.date.today()}; task {args.task}; pre-training "
             f"{args.pretrain_steps} steps, fine-tuning {args.sft_steps} steps of "
             f"{args.train:,} conversations",
             "", "| model | exact match on 200 held-out conversations | training time |",
             "|---|---:|---:|"]
    lines += [f"| {r['what']} | {r['exact_match']:.1%} | {r['train_s']:.0f} s |" for r in rows]
    print("\n".join(lines))
    (out / "chat_demo.json").write_text(json.dumps(
        {"machine": machine, "date": str(datetime.date.today()), "args": vars(args) | {"out": str(out)},
         "times_s": times, "results": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
