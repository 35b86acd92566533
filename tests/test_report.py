"""The experience of a run: progress bar, plots, run table, help and errors (trackers: test_trackers.py)."""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from test_train import quiet, run_cli, tiny_cfg

from gptforge.cli import build_parser, main
from gptforge.config import SECTION_TYPES
from gptforge.metrics import RunRecord, read_metrics, read_run_record
from gptforge.report import (
    describe_run,
    format_count,
    plot_panels,
    read_series,
    runs_table,
)
from gptforge.train import train

SRC = Path(__file__).resolve().parents[1] / "src"




@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    train(tiny_cfg(char_data, "train.max_steps=30", "train.eval_interval=10", "train.log_interval=5"),
          root / "a", log=quiet, preset="gpt2-tiny")
    train(tiny_cfg(char_data, "train.max_steps=20", "optim.lr=3e-3", "train.eval_interval=10"),
          root / "b", log=quiet, preset="gpt2-tiny")
    return root


def test_plot_renders_a_png_with_content(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    out = tmp_path / "plots" / "cmp.png"
    assert run_cli("plot", str(runs / "a"), str(runs / "b"), "--out", str(out), "--log-loss") == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(str(out))
    assert img.shape[0] >= 600 and img.shape[1] >= 1000
    non_white = (img[..., :3] < 0.9).any(axis=-1).mean()
    assert 0.02 < non_white < 0.6  # lines, text and axes, on a mostly white page
    assert not list(out.parent.glob(".tmp-*"))
    assert run_cli("plot", str(tmp_path), "--out", str(tmp_path / "x.png")) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_counts_read_100k_1_2M_3_4B():
    assert [format_count(n) for n in (0, 7, 950, 999.4, 999.6, 1_000, 1_200, 100_000, 1_234_567,
                                      1.2e6, 3.4e9, 2.5e12)] == [
        "0", "7", "950", "999", "1k", "1k", "1.2k", "100k", "1.23M", "1.2M", "3.4B", "2.5T"]


def test_plot_shows_validation_and_hellaswag_panels_when_runs_have_them(runs, tmp_path):
    learning, running = plot_panels(read_series([runs / "a", runs / "b"]))
    assert [p.title for p in learning] == ["loss vs steps", "loss vs tokens", "validation loss",
                                           "validation bits per byte"]
    assert [p.ykey for p in running] == ["lr", "norm", "tok_per_s"]
    assert [p.xkey for p in learning] == ["step", "tokens", "tokens", "tokens"]
    # a run with HellaSwag numbers (written by hand) adds their panel beside the losses
    hand = tmp_path / "hand"
    hand.mkdir()
    records = [dict(step=s, loss=3.0 - s / 100, tokens=(s + 1) * 524_288) for s in range(0, 100, 10)]
    records[-1].update(val_loss=2.2, hellaswag_acc=0.27, hellaswag_acc_norm=0.29)
    (hand / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    learning, _ = plot_panels(read_series([runs / "a", hand]))
    assert learning[-1].title == "HellaSwag acc_norm" and learning[-1].xkey == "tokens"
    assert len(learning) == 5  # run a has bits per byte: five panels share the row
    # a run from before bits per byte (no val_bpb) has no bpb panel and "-" in the table
    assert "val_bpb" not in [p.ykey for p in plot_panels(read_series([hand]))[0]]
    assert describe_run(hand, tmp_path)["best bpb"] == "-"
    pytest.importorskip("matplotlib")
    assert run_cli("plot", str(runs / "a"), str(hand), "--out", str(tmp_path / "hs.png")) == 0
    assert describe_run(hand, tmp_path, compact=True)["tokens"] == "47.7M"  # 91 x 524,288


def test_runs_table_shows_each_run_and_its_status(runs, char_data, tmp_path, capsys):
    # a crashed run: its record says running, but its process is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = runs / "c"
    crashed.mkdir(exist_ok=True)
    RunRecord(crashed, preset="gpt2-mini")
    rec = read_run_record(crashed)
    rec["pid"] = dead.pid
    (crashed / "run.json").write_text(json.dumps(rec))
    assert run_cli("runs", str(runs)) == 0
    table = capsys.readouterr().out.splitlines()
    header, rows = table[0], {line.split()[0]: line.split() for line in table[2:]}
    for col in ["preset", "status", "steps", "tokens", "best val", "best bpb", "last loss", "wall",
                "tok/s", "latest checkpoint"]:
        assert col in header
    assert rows["a"][1:4] == ["gpt2-tiny", "finished", "30"]
    bpbs = [r["val_bpb"] for r in read_metrics(runs / "a" / "metrics.jsonl") if "val_bpb" in r]
    assert rows["a"][6] == f"{min(bpbs):.4f}"  # best bpb: the lowest val_bpb
    assert rows["a"][-1] == "step_0000030"
    assert rows["b"][2:4] == ["finished", "20"]
    assert rows["c"][1:3] == ["gpt2-mini", "crashed"]
    assert "no runs under" in runs_table(tmp_path)


def test_a_crash_is_recorded(char_data, tmp_path, monkeypatch):
    from gptforge.model import GPT

    def boom(self, idx, targets=None):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(GPT, "forward", boom)
    with pytest.raises(RuntimeError):
        train(tiny_cfg(char_data, "train.max_steps=5"), tmp_path / "run", log=quiet)
    rec = read_run_record(tmp_path / "run")
    assert rec["status"] == "crashed" and "simulated failure" in rec["error"]


def test_progress_bar_on_a_terminal_never_garbles_log_lines(char_data, tmp_path):
    main_fd, sub_fd = pty.openpty()
    fcntl.ioctl(sub_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 x 120 chars
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptforge", "train", "--data", str(char_data), "--out", str(tmp_path / "run"),
         "--preset", "gpt2-tiny", "--set", "train.max_steps=60", "--set", "train.log_interval=10",
         "--set", "train.device=cpu"],
        stdin=sub_fd, stdout=sub_fd, stderr=sub_fd, env=env)
    os.close(sub_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=60) == 0
    os.close(main_fd)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert re.search(r"\d+/60 \[", out), out[-2000:]  # the bar: step / max steps
    assert "tok/s=" in out and "loss=" in out
    lines = [line.rstrip("\r").split("\r")[-1] for line in out.split("\n")]  # the pty ends lines with \r\n
    steps = [line for line in lines if "| loss:" in line]
    assert len(steps) == 7  # steps 0, 10, ..., 50 and the last, 59
    pattern = re.compile(r"^step +\d+ \| loss: \d+\.\d{6} \| lr: \S+ \| norm: \d+\.\d{4} \| "
                         r"dt: \d+\.\d{2}ms \| tok/sec: \d+\.\d{2}$")
    assert all(pattern.match(line.strip()) for line in steps), steps


def test_no_bar_when_output_is_not_a_terminal(char_data, tmp_path, capsys):
    """In this process, whose stdout and stderr pytest captures: not terminals, as a pipe is not."""
    assert not sys.stderr.isatty()
    assert run_cli("train", "--data", str(char_data), "--out", str(tmp_path / "run"), "--preset", "gpt2-tiny",
                   "--set", "train.max_steps=20", "--set", "train.device=cpu") == 0
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err and "/20 [" not in out.err
    assert out.out.count("| loss:") == 3  # steps 0, 10 and the last


def test_train_help_lists_every_config_key_with_default_and_meaning(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for section, cls in SECTION_TYPES.items():
        for name in cls.__dataclass_fields__:
            assert re.search(rf"^  {section}\.{name} = .+\n      \S", text, re.M), f"{section}.{name}"


def test_every_option_of_every_subcommand_has_help_and_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) >= {"prepare", "train", "sample", "plot", "runs"}
    for name, sp in sub.choices.items():
        formatter = sp._get_formatter()
        for action in sp._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            shown = formatter._expand_help(action) if action.help else ""
            if action.default not in (None, False, [], "==SUPPRESS=="):
                assert "default" in shown.lower(), f"{name} {action.option_strings[0]}: {shown}"


def test_usage_errors_are_one_line_exit_2(capsys):
    assert run_cli("train") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "--help" in err
