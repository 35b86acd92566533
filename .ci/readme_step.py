"""Print the commands of set-up step N from the README, one a line: the lines that are neither
blank nor comments after the line ``# N.`` in the first fenced block of its "Set-up" section, up
to the next numbered step. .ci/run runs what this prints (in ``bash -e``, so every line must
succeed)."""

import re
import sys


def step(readme: str, n: int) -> str:
    section = readme.split("\n## Set-up", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    lines = [line.strip() for line in block.splitlines()]
    start = next(i for i, line in enumerate(lines) if re.match(rf"#\s*{n}\.", line))
    commands = []
    for line in lines[start + 1:]:
        if re.match(r"#\s*\d+\.", line):
            break
        if line and not line.startswith("#"):
            commands.append(line)
    if not commands:
        raise SystemExit(f"README.md: set-up step {n} has no command")
    return "\n".join(commands)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(step(f.read(), int(sys.argv[2])))
