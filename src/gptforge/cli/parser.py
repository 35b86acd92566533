"""How the command line is read: usage mistakes as one line with exit code 2, every option's
default in ``--help``, and free text (a prompt, a message, an API key) taken whole even when it
begins with a dash."""

from __future__ import annotations

import argparse
import textwrap

# Options whose value is free text: argparse would take a value beginning with "-" for an option
# of its own ("expected one argument"), and secrets.token_urlsafe, which docs/chat.md suggests
# for --api-key, begins with "-" once in 64 keys.
WHOLE_TEXT_METAVARS = ("TEXT", "KEY")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows every option's default after its meaning; an
    address is never broken across lines (so it can be copied)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False,
                             break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text.lower() and action.option_strings
                and action.default not in (None, argparse.SUPPRESS, False, [])):
            text += " (default: %(default)s)"
        return text


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes get the same treatment as every other error: one line, exit code 2.
    Every (sub)command's help shows each option's default."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def whole_text_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with each free-text option's value attached to it (``--api-key -x..`` becomes
    ``--api-key=-x..``) where the value begins with a dash and is not an option of the command,
    so that it is read as the value; a missing value is still the usual one-line error."""
    commands = next((a.choices for a in parser._actions  # noqa: SLF001 - argparse keeps no public list
                     if isinstance(a, argparse._SubParsersAction)), {})  # noqa: SLF001
    command = commands.get(argv[0]) if argv else None
    if command is None:
        return list(argv)
    known = command._option_string_actions  # noqa: SLF001
    out, i = [argv[0]], 1
    while i < len(argv):
        word = argv[i]
        if word == "--":  # what follows is positional, as argparse reads it
            return out + argv[i:]
        action = known.get(word)
        value = argv[i + 1] if i + 1 < len(argv) else None
        if (action is not None and action.metavar in WHOLE_TEXT_METAVARS and value is not None
                and value.startswith("-") and value not in known):
            out.append(f"{max(action.option_strings, key=len)}={value}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out
