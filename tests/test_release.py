"""Releases a user can follow: one version, printed and recorded; a changelog section for it;
--help that points at the documentation instead of quoting one machine's figures."""

import re
import sys
from pathlib import Path

import pytest

from gptforge import __version__
from gptforge.cli import COMMANDS, build_parser, main
from gptforge.version import DOCS_URL, docs_page

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_the_version_is_written_in_one_place():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gptforge.version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)


def test_gptforge_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"gptforge {__version__}\n"


def test_this_version_is_the_changelogs_newest_release():
    """A version bump comes with its section in CHANGELOG.md (Keep a Changelog's form)."""
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", changelog, re.MULTILINE)
    assert releases and releases[0][0] == __version__, (
        f"CHANGELOG.md's newest release is not gptforge {__version__}: add its section")
    assert changelog.index("## [Unreleased]") < changelog.index(f"## [{__version__}]")
    section = changelog.split(f"## [{__version__}]")[1].split("\n## [")[0]
    assert re.search(r"^### (Added|Changed|Deprecated|Removed|Fixed|Security)$", section, re.MULTILINE)


def helps() -> dict[str, str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {"": parser.format_help(),
            **{c.name: sub.choices[c.name].format_help() for c in COMMANDS}}


def test_help_points_to_the_docs_and_to_bench_not_to_one_machines_figures():
    texts = helps()
    assert docs_page("reference/configuration") in texts["train"]
    assert "gptforge bench --preset NAME" in texts["train"] and docs_page("benchmarks") in texts["train"]
    assert DOCS_URL in texts[""] and docs_page("reference/cli") in texts[""]
    timing = re.compile(r"\d\s?(s|ms|min|h|hours?|minutes?|seconds?)\b")
    for name, text in texts.items():
        for machine in ("EPYC", "Xeon", "AMD", "Intel"):
            assert machine not in text, (name, machine)
        assert not timing.search(text), (name, timing.search(text))


def test_the_pages_help_names_exist():
    """Each docs address in --help is a page in docs/ (the site's own pages once it is built:
    mkdocs.yml is there), on the site mkdocs.yml publishes."""
    named = {m.group(1) for text in helps().values()
             for m in re.finditer(re.escape(DOCS_URL) + r"([a-z0-9/_-]+)/", text)}
    assert {"reference/configuration", "reference/cli", "benchmarks"} <= named
    site = ROOT / "mkdocs.yml"
    for page in named:
        if page.startswith("reference/") or site.is_file():
            assert (ROOT / "docs" / f"{page}.md").is_file(), page
    if site.is_file():
        assert re.search(rf"^site_url: {re.escape(DOCS_URL)}$", site.read_text(encoding="utf-8"),
                         re.MULTILINE), f"mkdocs.yml's site_url must be {DOCS_URL} (gptforge.version)"
