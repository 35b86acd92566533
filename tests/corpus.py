"""Where the tests find Tiny Shakespeare: the copy that ships in the package (sha256 checked), so
that a fresh clone with nothing beside it runs the whole suite."""

from gptforge.data.named import bundled_path

SHAKESPEARE = bundled_path("shakespeare")
