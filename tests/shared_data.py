"""Where the tests find Tiny Shakespeare: ../shared beside the checkout (CI puts it there)."""

from pathlib import Path

SHAKESPEARE = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt")
