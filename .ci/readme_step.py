"""Print the command of set-up step N from the README: the first line that is not a comment after
the line ``# N.`` in the first fenced block of its "Set-up" section. .ci/run runs what this prints."""

import re
import sys


def step(readme: str, n: int) -> str:
    section = readme.split("\n## Set-up", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"#\s*{n}\.", line.strip()))
    return next(line.strip() for line in lines[start + 1:] if line.strip() and not line.strip().startswith("#"))


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(step(f.read(), int(sys.argv[2])))
