"""Every ```bash block of the documentation runs: the pages under docs/ and README.md, in order,
page by page, so a command the docs show that stops working breaks the suite.

Sybil reads the pages (its fenced-block lexer); this module decides how a block runs. Each page
gets a temporary directory of its own; the blocks of a page run in one xdist worker (one group
per page), and a test that runs alone first runs the page's earlier blocks. ``gptforge ...``
lines run in this process through ``gptforge.cli.main`` (no interpreter start, no second torch
import); any other line runs in ``bash -euo pipefail`` with this environment first on the PATH.

Comment lines right above a block steer it (docs/contributing.md, "The docs are tested"):

    <!-- skip: REASON -->                  not run: it needs a GPU, several machines or the network
    <!-- setup: COMMAND -->                run first: a file or a run the page assumes
    <!-- stand-in: "OLD" => "NEW" -->      OLD replaced by NEW (a few steps, a tiny preset);
                                           {port} in NEW is a free port, one per page; \\n a newline
    <!-- background: TEXT -->              the last command is a server: started, awaited until it
                                           prints TEXT, and stopped by the page's next server or
                                           when the page is done
"""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sybil import Document, Example, Region
from sybil.parsers.markdown.lexers import FencedCodeBlockLexer

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
DIRECTIVE = re.compile(r"<!--\s*(skip|setup|stand-in|background):\s*(.*?)\s*-->")
STAND_IN = re.compile(r'"((?:[^"\\]|\\.)*)"\s*=>\s*"((?:[^"\\]|\\.)*)"')
# A token holding one of these needs a shell (expansion, globbing, redirection, pipes, lists).
SHELL_CHARS = frozenset("$`~*?|&;<>()")
COMMAND_TIMEOUT_S = 300
SERVER_START_S = 90


@dataclass
class Block:
    """One ```bash block and the directives above it."""
    page: Path
    line: int
    source: str
    skip: str | None = None
    setups: list[str] = field(default_factory=list)
    stand_ins: list[tuple[str, str]] = field(default_factory=list)
    background: str | None = None

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def _directives_above(text: str, start: int) -> list[tuple[str, str]]:
    """The directive comments on the lines right above a block (no blank line between)."""
    found = []
    for line in reversed(text[:start].splitlines()):
        m = DIRECTIVE.fullmatch(line.strip())
        if m is None:
            break
        found.append((m.group(1), m.group(2)))
    return found[::-1]


def _block(document: Document, region: Region) -> Block:
    text = document.text
    block = Block(Path(document.path), text.count("\n", 0, region.start) + 1, str(region.lexemes["source"]))
    for name, value in _directives_above(text, region.start):
        if name == "skip":
            block.skip = value
        elif name == "setup":
            block.setups.append(value)
        elif name == "background":
            block.background = value
        else:
            m = STAND_IN.fullmatch(value)
            assert m, f"{block.where}: a stand-in reads \"OLD\" => \"NEW\", not {value!r}"
            block.stand_ins.append((_unescape(m.group(1)), _unescape(m.group(2))))
    assert block.skip is None or block.skip.strip(), f"{block.where}: a skip needs its reason"
    return block


def _unescape(s: str) -> str:
    """\\n is a newline (a stand-in may span lines); \\" and \\\\ are the characters."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), s)


def bash_blocks(document: Document) -> Iterator[Region]:
    """Sybil's parser: each ```bash block becomes a region whose example runs it."""
    for region in FencedCodeBlockLexer("bash")(document):
        region.parsed = _block(document, region)
        region.evaluator = lambda example: example.namespace["page"].run_block(example.parsed)
        yield region


def parse(page: Path) -> list[Example]:
    return list(Document.parse(str(page), bash_blocks).examples())


def commands(source: str) -> list[str]:
    """The block's commands: continuation lines joined, blank and comment lines left out."""
    out, current = [], ""
    for line in source.splitlines():
        current = f"{current}\n{line}" if current else line
        if line.rstrip().endswith("\\"):
            continue
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


def gptforge_argv(command: str) -> list[str] | None:
    """The arguments of a plain ``gptforge ...`` line, which can run in this process; None for
    anything a shell must expand or connect."""
    try:
        tokens = shlex.split(command.replace("\\\n", " "), comments=True)
    except ValueError:
        return None
    if not tokens or tokens[0] != "gptforge" or any(SHELL_CHARS & set(t) for t in tokens):
        return None
    return tokens[1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PageRun:
    """One page's blocks, run in order in the page's own directory."""

    def __init__(self, page: Path, workdir: Path) -> None:
        self.examples = parse(page)
        self.workdir = workdir
        self.port = free_port()
        self.done = 0
        self.failed: str | None = None
        self.servers: list[subprocess.Popen] = []
        for example in self.examples:
            example.namespace["page"] = self

    def run_through(self, index: int) -> None:
        """Runs the blocks up to index that have not run yet (skipped ones stay skipped)."""
        while self.done <= index:
            example = self.examples[self.done]
            if self.failed:
                pytest.fail(f"an earlier block of the page failed ({self.failed})", pytrace=False)
            if example.parsed.skip is None:
                try:
                    example.evaluate()
                except BaseException:
                    self.failed = example.parsed.where
                    raise
            self.done += 1

    def run_block(self, block: Block) -> None:
        source = block.source
        for old, new in block.stand_ins:
            assert old in source, f"{block.where}: the stand-in's {old!r} is not in the block"
            source = source.replace(old, new.replace("{port}", str(self.port)))
        here = os.getcwd()
        os.chdir(self.workdir)
        try:
            for setup in block.setups:
                self.run(setup, block)
            lines = commands(source)
            assert lines, f"{block.where}: a bash block with no command"
            if block.background is not None:
                *lines, server = lines
            for line in lines:
                self.run(line, block)
            if block.background is not None:
                self.start_server(server, block)
        finally:
            os.chdir(here)

    def run(self, command: str, block: Block) -> None:
        argv = gptforge_argv(command)
        if argv is not None:
            code = run_in_process(argv)
        else:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=self.workdir,
                                  env=environment(), stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=COMMAND_TIMEOUT_S)
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
            code = proc.returncode
        assert code == 0, f"{block.where}: `{command}` exited with {code} (its output is above)"

    def start_server(self, command: str, block: Block) -> None:
        """Starts the block's server with its output in a file (a pipe nobody reads could fill
        and stop it), and waits until the output shows block.background. One server at a time
        per page: a new one stops the one before, so that both can take the page's port."""
        self.stop_servers()
        log = self.workdir / f"server-{len(self.servers)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", command], cwd=self.workdir, env=environment(),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.servers.append(proc)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline and proc.poll() is None:
            if block.background in log.read_text(encoding="utf-8", errors="replace"):
                return
            time.sleep(0.2)
        raise AssertionError(f"{block.where}: `{command}` did not print {block.background!r} within "
                             f"{SERVER_START_S} s (exit code {proc.poll()}):\n{log.read_text(errors='replace')}")

    def stop_servers(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.servers.clear()


def run_in_process(argv: list[str]) -> int:
    from gptforge.cli import main

    stdin = sys.stdin
    sys.stdin = io.StringIO("")  # as for the shell's commands: empty, not a terminal
    try:
        main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdin = stdin
    return 0


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _cases() -> list:
    cases = []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        for index, example in enumerate(parse(page)):
            cases.append(pytest.param(page, index, id=f"{name}:{example.line}",
                                      marks=pytest.mark.xdist_group(f"docs:{name}")))
    return cases


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory) -> Iterator[dict[Path, PageRun]]:
    runs: dict[Path, PageRun] = {}
    yield runs
    for run in runs.values():
        run.stop_servers()


@pytest.mark.parametrize("page, index", _cases())
def test_the_docs_commands_run(page: Path, index: int, page_runs, tmp_path_factory) -> None:
    if page not in page_runs:
        page_runs[page] = PageRun(page, tmp_path_factory.mktemp(page.stem))
    run = page_runs[page]
    block = run.examples[index].parsed
    if block.skip is not None:
        pytest.skip(f"{block.where}: {block.skip}")
    run.run_through(index)


def test_the_docs_shell_blocks_are_bash():
    """A shell block fenced as sh, shell or console would never run: the pages say bash."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in re.finditer(r"^\s*```\s*(sh|shell|console|zsh|shell-session)\s*$", text, re.MULTILINE):
            pytest.fail(f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: "
                        f"fence shell commands as ```bash, so that the docs' test runs them")


def test_a_command_that_fails_fails_its_block(tmp_path):
    """The runner itself: a gptforge line that fails (in process) and a shell line that fails
    both fail the block, and a stand-in that no longer matches is an error, not a no-op."""
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```bash\ngptforge sample --ckpt does-not-exist\n```\n\n"
                    "```bash\nfalse\n```\n\n<!-- stand-in: \"absent\" => \"x\" -->\n```bash\ntrue\n```\n",
                    encoding="utf-8")
    run = PageRun(page, tmp_path)
    for example, message in zip(run.examples, ["exited with 2", "exited with 1", "is not in the block"]):
        with pytest.raises(AssertionError, match=message):
            example.evaluate()
