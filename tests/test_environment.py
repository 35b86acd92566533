"""What gptforge assumes of the machine it runs on, checked: the locale, the home directory, the
installed package. (The network: named datasets ship in the package; privileges: the tests that
need root skip with their reason; both are exercised by running the suite so, see the closing
notes of issue 30.)"""

import os
import subprocess
import sys
from pathlib import Path

from test_train import quiet, tiny_cfg

from gptforge.data import prepare
from gptforge.train import train

SRC = Path(__file__).resolve().parents[1] / "src"


def test_a_terminal_that_cannot_show_the_text_gets_escapes_not_a_traceback(tmp_path):
    """LC_ALL=C with Python's UTF-8 mode off: stdout is ASCII. A sample of a model that only
    knows non-ASCII characters is printed with backslash escapes, and the command succeeds."""
    (tmp_path / "t.txt").write_text("東京éü\n" * 400, encoding="utf-8")
    prepare([str(tmp_path / "t.txt")], tmp_path / "data", tokenizer="char", progress=False)
    train(tiny_cfg(tmp_path / "data", "train.max_steps=1", "model.block_size=16", "train.seq_len=16",
                   "train.total_batch_tokens=128"), tmp_path / "run", log=quiet)
    env = {**os.environ, "PYTHONPATH": str(SRC), "LC_ALL": "C", "PYTHONUTF8": "0"}
    out = subprocess.run([sys.executable, "-m", "gptforge", "sample", "--ckpt", str(tmp_path / "run"),
                          "--prompt", "\n", "--max-new-tokens", "20"],
                         capture_output=True, env=env, timeout=120)
    assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr.decode(errors="replace")
    assert out.stdout.isascii()
    text = out.stdout.decode("ascii")
    assert text.count("\\u6771") + text.count("\\u4eac") + text.count("\\xe9") + text.count("\\xfc") >= 10  # of 20 characters, 1 in 5 a newline


def test_nothing_is_written_into_the_installed_package(tmp_path, char_data):
    """A site-packages that is read-only (a system install, a container image) must be enough:
    training and sampling write nothing beside gptforge's own files (Python's bytecode cache
    aside, which it skips where it cannot write)."""
    package = SRC / "gptforge"

    def files() -> set[Path]:
        return {p for p in package.rglob("*") if "__pycache__" not in p.parts}

    before = files()
    train(tiny_cfg(char_data, "train.max_steps=2", "train.save_interval=1"), tmp_path / "run", log=quiet)
    from gptforge.generate import sample
    from gptforge.sampling import Sampling

    sample(str(tmp_path / "run"), "A", Sampling(max_tokens=4), device="cpu")
    assert files() == before
