"""Prove a refactor changed nothing a run produces: the same runs under two source trees, compared.

    python benchmarks/same_runs.py --base /path/to/old/checkout/src --new src --out /tmp/same

Each scenario runs once per tree (``python -m gptforge`` with PYTHONPATH set to that tree's src),
on the CPU in fp32 with a fixed seed, and then the two runs' outputs are compared:

- metrics.jsonl, record by record, every field but the timings (dt_ms, tok_per_s);
- every checkpoint: model.safetensors and optimizer.safetensors byte for byte; config.json and
  trainer_state.json as JSON, but for what cannot match (git_commit, wall_s) and config keys that
  only one tree has (a key the change adds; listed in a note, with its value); the manifest's
  sha256 of the safetensors files;
- the log lines (stdout and stderr), with timings masked;
- for prepare: meta.json but for its creation time, and every shard byte for byte.

Scenarios: prepare (char and GPT-2), a plain run with evaluation and saves, a run stopped and
resumed, a 2-process DDP run (torchrun, gloo), and a Muon run. Differences are printed; the exit
code is the number of scenarios that differ. ``--allow-log PATTERN`` (a regex, repeatable) names
log lines that are expected to differ (a deliberate change in what train prints), and
``--new-field NAME`` a metrics.jsonl field that only the new tree writes. ``--new-set KEY=VALUE``
is passed to the new tree's train commands only: a key the base tree does not know, set so that
the two trees compute the same thing (``train.sliced_loss=false``: the sliced head and loss equal
the unsliced ones within float rounding, not bit for bit, so a refactor's proof turns them off;
the new tree's config line then names the override: add ``--allow-log "^config: preset"``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from gptforge.data.named import bundled_path

SHAKESPEARE = Path(bundled_path("shakespeare"))  # the copy that ships in the package
TIMINGS = {"dt_ms", "tok_per_s"}
COMMON = ["--preset", "gpt2-tiny", "--set", "train.device=cpu", "--set", "train.dtype=float32",
          "--set", "train.log_interval=1", "--set", "train.eval_interval=5",
          "--set", "train.save_interval=10", "--set", "train.keep_last=10"]
MASKS = [(re.compile(r"dt: [0-9.]+ms \| tok/sec: [0-9.]+"), "dt: Xms | tok/sec: X"),
         (re.compile(r"in [0-9.]+s"), "in Xs"), (re.compile(r"\([0-9.]+s\)"), "(Xs)"),
         (re.compile(r"pid \d+"), "pid P"),
         (re.compile(r"[0-9.]+ MB/s"), "X MB/s"), (re.compile(r"[0-9.]+ s,"), "X s,"),
         (re.compile(r"first step took [0-9.]+s"), "first step took Xs"),
         # the wall-time estimate (console.Eta): seconds per step, the total and the clock time
         (re.compile(r"[0-9.e+-]+ s per step"), "X s per step"),
         (re.compile(r"take about \S+ \(until about [0-9: -]+\)"), "take about X (until about X)")]


def gptforge(src: Path, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=900)
    if out.returncode not in (0,):
        raise SystemExit(f"gptforge {' '.join(args)} failed under {src}:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def scenarios(data: dict[str, Path]) -> dict[str, list[list[str]]]:
    char = str(data["char"])
    return {
        "plain": [["train", "--data", char, "--out", "{run}", *COMMON, "--set", "train.max_steps=30"]],
        "resumed": [["train", "--data", char, "--out", "{run}", *COMMON, "--set", "train.max_steps=15"],
                    ["train", "--out", "{run}", "--resume", "--set", "train.max_steps=30"]],
        "ddp": [["train", "--data", char, "--out", "{run}", *COMMON, "--set", "train.max_steps=20",
                 "--set", "train.total_batch_tokens=512", "--nproc", "2"]],
        "muon": [["train", "--data", char, "--out", "{run}", *COMMON, "--set", "train.max_steps=30",
                  "--set", "optim.name=muon"]],
        "gpt2-bpe": [["train", "--data", str(data["gpt2"]), "--out", "{run}", *COMMON,
                      "--set", "train.max_steps=12", "--set", "train.seq_len=16"]],
    }


def masked(text: str, allow: list[re.Pattern], root: Path) -> list[str]:
    lines = []
    # both trees train on the base tree's prepared data (compared on its own above)
    text = text.replace(str(root.parent / "base"), "TREE").replace(str(root), "TREE")
    for line in text.splitlines():
        for pattern, repl in MASKS:
            line = pattern.sub(repl, line)
        if not any(a.search(line) for a in allow):
            lines.append(line)
    return lines


def json_without(path: Path, drop: set[str]) -> object:
    obj = json.loads(path.read_text())

    def strip(o: object) -> object:
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in drop}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    return strip(obj)


NOTES: list[str] = []


def keys_of_one_side(a: dict, b: dict) -> list[str]:
    """Config keys that only one tree has (a key added or removed by the change), as
    ``section.key=value (new|base only)``; they are taken out of both dicts, so that the keys both
    trees know are compared. A run is the same run when every key they share is equal."""
    apart = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) ^ set(sb)):
            side, value = ("base only", sa.pop(key)) if key in sa else ("new only", sb.pop(key))
            apart.append(f"{section}.{key}={json.dumps(value)} ({side})")
    return apart


def compare_runs(a: Path, b: Path, new_fields: frozenset[str] = frozenset()) -> list[str]:
    problems = []
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    ma = [{k: v for k, v in r.items() if k not in TIMINGS} for r in ma]
    mb = [{k: v for k, v in r.items() if k not in TIMINGS | new_fields} for r in mb]
    if ma != mb:
        first = next((i for i, (x, y) in enumerate(zip(ma, mb)) if x != y), min(len(ma), len(mb)))
        problems.append(f"metrics.jsonl differs from record {first}: "
                        f"{ma[first] if first < len(ma) else None} vs {mb[first] if first < len(mb) else None}")
    ca = sorted(p.name for p in (a / "checkpoints").iterdir())
    cb = sorted(p.name for p in (b / "checkpoints").iterdir())
    if ca != cb:
        problems.append(f"checkpoints differ: {ca} vs {cb}")
    for name in ca:
        da, db = a / "checkpoints" / name, b / "checkpoints" / name
        if not da.is_dir():
            if da.read_text() != db.read_text():
                problems.append(f"{name} differs")
            continue
        for f in ("model.safetensors", "optimizer.safetensors"):
            if (da / f).read_bytes() != (db / f).read_bytes():
                problems.append(f"{name}/{f} differs")
        config_a, config_b = json_without(da / "config.json", {"git_commit"}), json_without(db / "config.json", {"git_commit"})
        added = keys_of_one_side(config_a["config"], config_b["config"])
        if config_a != config_b:
            problems.append(f"{name}/config.json differs")
        if json_without(da / "trainer_state.json", {"wall_s"}) != json_without(db / "trainer_state.json", {"wall_s"}):
            problems.append(f"{name}/trainer_state.json differs")
        if added:
            NOTES.append(f"config keys of one tree only (not compared): {', '.join(added)}")
        man_a, man_b = json_without(da / "manifest.json", set()), json_without(db / "manifest.json", set())
        for f in ("model.safetensors", "optimizer.safetensors"):
            if man_a["files"][f] != man_b["files"][f]:
                problems.append(f"{name}/manifest.json differs for {f}")
    return problems


def compare_data(a: Path, b: Path) -> list[str]:
    problems = []
    drop = {"created", "gptforge_version"}
    if json_without(a / "meta.json", drop) != json_without(b / "meta.json", drop):
        problems.append("meta.json differs")
    files = sorted(p.name for p in a.iterdir())
    if files != sorted(p.name for p in b.iterdir()):
        problems.append("the prepared files differ")
    for f in files:
        if f.endswith(".bin") and (a / f).read_bytes() != (b / f).read_bytes():
            problems.append(f"{f} differs")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="src directory of the reference tree")
    ap.add_argument("--new", required=True, type=Path, help="src directory of the tree to check")
    ap.add_argument("--out", required=True, type=Path, help="scratch directory (emptied)")
    ap.add_argument("--allow-log", action="append", default=[], metavar="REGEX",
                    help="log lines matching this are expected to differ (repeatable)")
    ap.add_argument("--only", action="append", default=[], help="run only these scenarios")
    ap.add_argument("--new-field", action="append", default=[], metavar="NAME",
                    help="a metrics.jsonl field only the new tree writes (a deliberate addition): "
                         "left out of the comparison (repeatable)")
    ap.add_argument("--new-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a --set for the new tree's train commands only (repeatable), e.g. "
                         "train.sliced_loss=false")
    args = ap.parse_args()
    allow = [re.compile(p) for p in args.allow_log]
    shutil.rmtree(args.out, ignore_errors=True)
    failed = 0
    data: dict[str, Path] = {}
    logs: dict[str, dict[str, str]] = {}
    for tree, src in (("base", args.base), ("new", args.new)):
        root = args.out / tree
        root.mkdir(parents=True)
        for tok in ("char", "gpt2"):
            logs.setdefault(f"prepare-{tok}", {})[tree] = gptforge(
                src, "prepare", str(SHAKESPEARE), "--out", str(root / f"data-{tok}"), "--tokenizer", tok,
                cwd=root)
    for tok in ("char", "gpt2"):
        problems = compare_data(args.out / "base" / f"data-{tok}", args.out / "new" / f"data-{tok}")
        la, lb = (masked(logs[f"prepare-{tok}"][t], allow, args.out / t) for t in ("base", "new"))
        if la != lb:
            problems.append(f"prepare's output differs: {la} vs {lb}")
        print(f"prepare {tok}: {'same' if not problems else 'DIFFERENT'}")
        for p in problems:
            print(f"  {p}")
        failed += bool(problems)
    data = {"char": args.out / "base" / "data-char", "gpt2": args.out / "base" / "data-gpt2"}
    for name, commands in scenarios(data).items():
        if args.only and name not in args.only:
            continue
        out: dict[str, list[str]] = {}
        for tree, src in (("base", args.base), ("new", args.new)):
            run = args.out / tree / name
            text = ""
            for cmd in commands:
                extra = [a for kv in args.new_set for a in ("--set", kv)] if tree == "new" else []
                text += gptforge(src, *[c.replace("{run}", str(run)) for c in cmd], *extra,
                                 cwd=args.out / tree)
            out[tree] = masked(text, allow, args.out / tree)
        problems = compare_runs(args.out / "base" / name, args.out / "new" / name,
                                frozenset(args.new_field))
        if out["base"] != out["new"]:
            diff = [f"- {x}" for x in out["base"] if x not in out["new"]] + \
                   [f"+ {x}" for x in out["new"] if x not in out["base"]]
            problems.append("log lines differ:\n    " + "\n    ".join(diff[:20]))
        print(f"{name}: {'same' if not problems else 'DIFFERENT'}")
        for p in problems:
            print(f"  {p}")
        failed += bool(problems)
    for note in dict.fromkeys(NOTES):
        print(f"note: {note}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
