"""The one exception type that reaches a person.

Anything raised as ``GptforgeError`` is a user mistake or an environment problem: the CLI prints
its message as one line and exits with status 2. Everything else is a bug and keeps its traceback.
"""


class GptforgeError(Exception):
    """A problem the user can fix; the message says what was wrong and what to do."""
