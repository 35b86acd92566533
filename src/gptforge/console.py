"""What every command prints: ``say`` (a line on stdout that survives a closed terminal), progress
bars on a terminal (``progress_bar``, and training's ``Progress``), and a run's expected wall
time (``Eta``, ``format_duration``).

Why its own module: prepare, evaluate and HellaSwag draw a bar and train says lines, but none of
them need metrics.jsonl, run.json or the trackers (metrics.py, trackers.py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from typing import Any, Callable


# ----------------------------------------------------------------------------------------------
# Lines and progress bars


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar on stderr, drawn only where stderr is a terminal. In a pipe or a log file a bar
    is a stream of carriage returns, so there it stays silent and the command's own summary line
    says what happened. Pass ``disable=True`` to turn it off on a terminal too."""
    from tqdm import tqdm

    disable = kwargs.pop("disable", False) or not sys.stderr.isatty()
    if not disable:
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
            known = size.columns > 0 and size.lines > 0
        except (OSError, ValueError):
            known = False
        # A terminal that reports no size (some emulators, pty wrappers) would get a zero-width
        # bar, and tqdm draws nothing at all for 0 rows: assume 100 x 20 there.
        kwargs.setdefault("dynamic_ncols", known)
        kwargs.setdefault("ncols", None if known else 100)
        kwargs.setdefault("nrows", None if known else 20)
    return tqdm(file=sys.stderr, disable=disable, **kwargs)


_output_gone = False


def say(line: str = "") -> None:
    """print(line), unless stdout has gone away (terminal closed: SIGHUP; a pipe's reader quit).
    Then output stops instead of the run: a training job must still save and exit cleanly."""
    global _output_gone
    if _output_gone:
        return
    try:
        print(line, flush=True)
    except OSError:  # EIO from a hung-up terminal, EPIPE from a closed pipe
        _output_gone = True
        # What is still buffered would fail again at exit (and turn the exit code into 120):
        # send stdout to /dev/null from here on.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


class Progress:
    """A bar with step / max steps, ETA, loss and tokens/s, on a terminal only.

    Log lines go through ``write`` so the bar is cleared before and redrawn after each of them and
    never garbles them. Where stderr is not a terminal (CI, log files, nohup) there is no bar and
    the periodic log lines are the whole display.
    """

    def __init__(self, total: int, initial: int, enabled: bool, target_loss: float = 0.0):
        self.bar = None
        self.target_loss = target_loss
        if enabled and sys.stderr.isatty():
            self.bar = progress_bar(total=total, initial=initial, unit="step", mininterval=0.25,
                                    leave=False)

    def wrap(self, log: Callable[[str], None]) -> Callable[[str], None]:
        if self.bar is None:
            return log

        def write(line: str) -> None:
            from tqdm import tqdm

            try:
                tqdm.write(line, file=sys.stdout)
            except OSError:  # the terminal is gone (SIGHUP): keep training, stop drawing
                self.close()

        return write

    def update(self) -> None:
        """One more step (the bar's rate and ETA come from its own clock: no device sync)."""
        if self.bar is None:
            return
        try:
            self.bar.update(1)
        except OSError:
            self.close()

    def show(self, loss: float, tok_per_s: float) -> None:
        """The latest logged loss and throughput, beside the bar."""
        if self.bar is None:
            return
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tok_per_s:,.0f}"}
        if self.target_loss:
            post["target"] = f"{self.target_loss:g}"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        bar, self.bar = self.bar, None
        if bar is not None:
            try:
                bar.close()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------
# How long a run will take


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 95 -> '1m35s', 7.5 -> '7.5s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Eta:
    """The run's expected wall time, said once, early: after MIN_STEPS steps and MIN_SECONDS
    counted from the end of the session's first step (which pays start-up and compilation).
    Host clock only: no wait for the GPU (the host runs a few steps ahead at most)."""

    MIN_STEPS, MIN_SECONDS = 5, 3.0

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.start: tuple[int, float] | None = None
        self.said = False

    def line(self, steps_done: int) -> str | None:
        now = time.perf_counter()
        if self.said:
            return None
        if self.start is None:
            self.start = (steps_done, now)
            return None
        n, elapsed = steps_done - self.start[0], now - self.start[1]
        if n < self.MIN_STEPS or elapsed < self.MIN_SECONDS:
            return None
        self.said = True
        left = self.max_steps - steps_done
        if left <= 0:
            return None
        per_step = elapsed / n
        until = datetime.datetime.now() + datetime.timedelta(seconds=per_step * left)
        when = until.strftime("%H:%M" if per_step * left < 20 * 3600 else "%Y-%m-%d %H:%M")
        return (f"estimate: {per_step:.3g} s per step, so the {left:,} steps left to "
                f"train.max_steps={self.max_steps:,} take about {format_duration(per_step * left)} "
                f"(until about {when})")
