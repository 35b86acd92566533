"""The generated reference pages (docs/reference/configuration.md, cli.md) are the code's: they
are regenerated with `python -m gptforge.docgen`, and drift fails here."""

import dataclasses
import shutil
from pathlib import Path

import pytest

from gptforge import docgen
from gptforge.cli import COMMANDS, build_parser
from gptforge.config import RUN_RULES, SECTION_TYPES, field_help
from gptforge.presets import RUN_PRESETS
from gptforge.ranges import field_range

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_pages_are_what_the_code_generates():
    assert docgen.stale_pages(ROOT) == [], "regenerate them: python -m gptforge.docgen"


def test_every_key_is_in_the_reference_with_its_range_and_meaning():
    page = docgen.configuration_page()
    rows = {line.split(" | ")[0][3:-1]: line for line in page.splitlines() if line.startswith("| `")}
    for section, cls in SECTION_TYPES.items():
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            row = rows[f"{section}.{f.name}"]
            assert docgen.md(helps[f.name], table=True) in row, f.name  # every key has a meaning
            for rule in (field_range(f), RUN_RULES.get(f"{section}.{f.name}")):
                if rule is not None:
                    assert docgen.md(rule.doc, table=True) in row, f.name
    assert all(f"| `{name}`" in page for name in RUN_PRESETS)


def test_every_option_of_every_command_is_in_the_cli_reference():
    page = docgen.cli_page()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in COMMANDS:
        assert f"\n## gptforge {command.name}\n" in page
        for action in sub.choices[command.name]._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page or f", {flag}" in page, (command.name, flag)


def test_check_names_a_drifted_page_and_writing_mends_it(tmp_path, capsys):
    shutil.copytree(ROOT / "docs" / "reference", tmp_path / "docs" / "reference")
    page = tmp_path / "docs" / "reference" / "configuration.md"
    page.write_text(page.read_text(encoding="utf-8").replace("number of transformer blocks", "layers"),
                    encoding="utf-8")
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert "docs/reference/configuration.md differs from the code" in capsys.readouterr().err
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0


@pytest.mark.parametrize("text, markdown", [
    ("lr * (step + 1) / warmup_steps", r"lr \* (step + 1) / warmup\_steps"),
    ("at most train.seq_len + 1", "at most `train.seq_len` + 1"),
    ("ends at <|im_end|>", "ends at &lt;\\|im\\_end\\|>"),
    ("e.g. --set optim.lr=3e-4 (the way `train` does)", "e.g. --set `optim.lr=3e-4` (the way `train` does)"),
])
def test_text_renders_as_written(text, markdown):
    assert docgen.md(text, table=True) == markdown
