"""gptforge's cache directory: what is kept across runs and commands on this machine (named
datasets fetched once, what ``train.dtype=auto`` measured on this CPU).

``$GPTFORGE_CACHE``, else ``$XDG_CACHE_HOME/gptforge``, else ``~/.cache/gptforge``. Where HOME is
unset and the user has no home in the password database (a bare container, a service account),
``~`` cannot be expanded: the cache then lives in the system's temporary directory, one per user,
rather than in a directory literally named ``~`` under the working directory.
"""

from __future__ import annotations

import os
import tempfile


def default_cache_dir() -> str:
    if os.environ.get("GPTFORGE_CACHE"):
        return os.environ["GPTFORGE_CACHE"]
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "gptforge")
    home = os.path.expanduser("~")
    if home == "~" or not os.path.isabs(home):
        return os.path.join(tempfile.gettempdir(), f"gptforge-cache-{os.getuid()}")
    return os.path.join(home, ".cache", "gptforge")
