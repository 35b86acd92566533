"""The package's layers import one way: each module only from layers below it (STYLE.md, 1)."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gptforge"

# Lower layers first. A module may import gptforge modules of strictly lower rank only.
RANK = {
    "version": 0, "errors": 0, "atomic": 0,  # writing files safely, sha256
    "sampling": 0,  # the one set of sampling values and rules (torch only inside its functions)
    "signals": 0,  # Ctrl-C, SIGTERM, SIGHUP: a request to stop after the step (train reads it)
    "cachedir": 0,  # gptforge's cache directory (named datasets, the CPU's measured dtype)
    "launch": 1,  # --nproc: torchrun in a child process, its failures in one line (no torch here)
    "ranges": 0,  # what a config field allows, declared in its metadata (config reads it)
    "config": 1, "rundir": 1,  # the run directory's names, lock, free space, guarded writes
    "console": 1,  # say, progress bars, the ETA: what every command prints (data's bars too)
    "tokenizer": 2, "presets": 2,  # presets: named run configs, and resolving one
    "trackers": 2,  # TensorBoard, W&B, MLflow
    "memory": 2,  # the micro-batch search and its trials, out-of-memory lines, the allocator
    "model": 2,  # pure: torch and its config alone
    "metrics": 3,  # metrics.jsonl, run.json and RunReport, which feeds the trackers
    "data": 3,
    "probe": 3,  # what train.dtype=auto becomes on a CPU: the model's block timed, cached
    "device": 4,  # device and precision, and what "auto" becomes (batch_size=auto: memory's search)
    "weights": 4,  # generation's weights dtype: casting, int8, what auto becomes (measured as probe)
    "optim": 4, "hf": 4,  # HF GPT-2 files <-> GPT; checkpoint dispatches to it
    "llamacpp": 4,  # GGUF files for llama.cpp, written with the gguf package (export --format gguf)
    "distributed": 5,  # process groups and wrapping: under device, which picks the device
    "hellaswag": 4,  # scoring, below train (which reports it) and evaluate (its CLI side)
    "checkpoint": 5,
    "step": 6,  # one optimizer step and what it runs on, for train and bench
    "evaluate": 6,  # the held-out loss (train's validation too) and `gptforge eval`
    "resume": 6,  # planning a run and resuming it
    "generate": 6, "report": 6, "export": 6,
    "train": 7,
    "chat": 7,  # gptforge chat: a conversation in the terminal over generate
    "bench": 8,
    "serve": 8,  # the HTTP server over generate's KV cache and sampling
    "cli": 9,
    "docgen": 10,  # the generated reference pages (python -m gptforge.docgen): config and the CLI
}
# A package is one layer outside; inside, its modules are layered the same way.
PACKAGE_RANK = {
    "data": {"shards": 0, "named": 1, "loader": 1, "sources": 2, "staging": 3, "tokenize": 4,
             "vocab": 4,
             "splits": 5, "conversations": 6, "prepare": 7, "__init__": 8},
    "serve": {"options": 0, "engine": 0, "protocol": 1, "chat": 2, "app": 3, "server": 4,
              "__init__": 5},
    "tokenizer": {"interface": 0, "chat": 0, "gpt2": 1, "char": 1, "bpe": 2, "__init__": 3},
    "cli": {"parser": 0, "options": 0, "launching": 0, "commands": 1, "__init__": 2},
}


def gptforge_imports(path: Path) -> set[tuple[str, str | None]]:
    """Every gptforge module imported anywhere in the file, lazy imports inside functions too,
    as (module, submodule of a package or None)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptforge"):
            parts = node.module.split(".")
            if len(parts) == 1:  # from gptforge import X
                out.update((alias.name, None) for alias in node.names)
            else:
                out.add((parts[1], parts[2] if len(parts) > 2 else None))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "gptforge" and len(parts) > 1:
                    out.add((parts[1], parts[2] if len(parts) > 2 else None))
                elif alias.name == "gptforge":
                    out.add(("gptforge", None))
    return out


def test_every_module_has_a_layer():
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    packages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert modules | packages == set(RANK)
    for package, ranks in PACKAGE_RANK.items():
        assert {p.stem for p in (SRC / package).glob("*.py")} == set(ranks)


def test_imports_point_down_only():
    for name, rank in RANK.items():
        files = ({f"{name}.{p.stem}": p for p in (SRC / name).glob("*.py")} if name in PACKAGE_RANK
                 else {name: SRC / f"{name}.py"})
        for where, path in files.items():
            for dep, sub in gptforge_imports(path):
                assert dep in RANK, f"{where} imports {dep}, which is not a layer"
                if dep == name:  # inside the package
                    inner = PACKAGE_RANK[name]
                    mine = inner[path.stem]
                    assert sub in inner and inner[sub] < mine, f"{where} imports {dep}.{sub}"
                else:
                    assert RANK[dep] < rank, f"{where} (layer {rank}) imports {dep} (layer {RANK[dep]})"


def test_model_imports_only_torch_and_its_config():
    tree = ast.parse((SRC / "model.py").read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0] if node.module != "gptforge.config" else "config")
    assert roots <= {"__future__", "torch", "config"}


def test_core_import_pulls_no_optional_extras():
    code = ("import sys, gptforge, gptforge.cli, gptforge.train, gptforge.generate, "
            "gptforge.hf, gptforge.export, gptforge.evaluate, gptforge.checkpoint, gptforge.data, "
            "gptforge.serve; gptforge.cli.build_parser(); "
            "bad = [m for m in ('transformers', 'matplotlib', 'tensorboard', 'wandb', 'mlflow', "
            "'pyarrow', 'zstandard', 'fastapi', 'starlette', 'uvicorn', 'pydantic', 'openai', 'gguf', "
            "'selenium') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(SRC.parent), "PATH": ""})
    assert result.returncode == 0, result.stdout + result.stderr


def test_loading_a_checkpoint_imports_no_data_pipeline():
    """checkpoint.py needs sha256 (atomic.py), not prepare, the sources or the downloader."""
    code = ("import sys, gptforge.checkpoint; "
            "print(sorted(m for m in sys.modules if m.startswith('gptforge.data')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(SRC.parent), "PATH": ""})
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_run_directory_names_live_in_rundir_only():
    """The names inside a run directory are constants in rundir.py; other modules use those."""
    for path in SRC.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        text = path.read_text(encoding="utf-8")
        for literal in ('"run.json"', '"metrics.jsonl"', '"config.toml"', '"checkpoints"', '"latest"'):
            assert f"= {literal}" not in text, f"{path.name} defines {literal} again"


# The CLI in a process of its own that says, last, whether it imported torch.
CLI_SAYING_TORCH = ("import sys\nfrom gptforge.cli import main\ntry:\n    main(sys.argv[1:])\n"
                    "finally:\n    print('torch imported:', 'torch' in sys.modules)")


def test_prepare_runs_without_importing_torch(tmp_path):
    """`gptforge prepare` needs no torch: importing it would cost about a second of its start-up
    (the data package imports its loader, which needs torch, only on first use)."""
    (tmp_path / "a.jsonl").write_text('{"text": "to be or not to be"}\n' * 50, encoding="utf-8")
    for tokenizer in ("gpt2", "char"):
        result = subprocess.run(
            [sys.executable, "-c", CLI_SAYING_TORCH, "prepare", str(tmp_path / "a.jsonl"), "--out",
             str(tmp_path / tokenizer), "--tokenizer", tokenizer, "--val-fraction", "0"],
            capture_output=True, text=True, env={"PYTHONPATH": str(SRC.parent), "PATH": ""})
        assert result.returncode == 0 and result.stdout.splitlines()[-1] == "torch imported: False", (
            result.stdout + result.stderr)


def test_commands_that_need_no_torch_do_not_import_it():
    """`import gptforge`, the CLI's parser and the --nproc launcher stay light (torch alone takes
    seconds to import): the model loads on first use."""
    code = ("import sys, gptforge, gptforge.cli, gptforge.launch, gptforge.rundir; "
            "gptforge.cli.build_parser(); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(SRC.parent), "PATH": ""})
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stdout + result.stderr
    code = "import gptforge; print(gptforge.GPT.__name__, gptforge.GPT.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(SRC.parent), "PATH": ""})
    assert result.stdout.split() == ["GPT", "gptforge.model"], result.stderr
