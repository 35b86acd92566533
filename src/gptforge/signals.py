"""Stopping a run cleanly on a signal: Ctrl-C, ``kill`` (SIGTERM, what a scheduler sends before
it preempts a job) or a closed terminal become a request that the training loop reads after
each step; it then saves a checkpoint and ends (train.py)."""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """Turns SIGINT, SIGTERM and SIGHUP (the terminal was closed) into a request to stop after
    the current step. A signal this process was started ignoring stays ignored: under
    ``nohup`` a closed terminal must not stop the run.

    A second Ctrl-C restores the default handler's behaviour (KeyboardInterrupt) for the impatient.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                    if hasattr(signal, name))

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopFlag":
        for sig in self.SIGNALS:
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal_name is not None
