"""The package version and the documentation's address, in their own module so that any layer
can read them.

``__version__`` is the one place the version is written: pyproject.toml reads it from here
(``dynamic = ["version"]``), so an editable and a built install report the same. A bump goes with
a section of its own in CHANGELOG.md (tests/test_release.py); docs/reference/compatibility.md
says what a version may change.
"""

__version__ = "0.1.0"

# The documentation site (MkDocs, deployed to GitHub Pages from docs/); --help names its pages
# instead of quoting figures that hold for one machine.
DOCS_URL = "https://gptforge.github.io/gptforge/"


def docs_page(page: str, anchor: str = "") -> str:
    """The address of docs/PAGE.md on the site (MkDocs' directory URLs): ``docs_page(
    "reference/configuration", "presets")`` -> ``DOCS_URL/reference/configuration/#presets``."""
    return f"{DOCS_URL}{page}/" + (f"#{anchor}" if anchor else "")
