"""Continuous batching: requests share each forward pass, joining and leaving between steps.

The engine owns the model, a ``RaggedKVCache`` with one row per sequence in flight, and a bounded
queue of waiting jobs (a job is one request: its prompts times ``n`` choices, one row each).
One ``step``:

1. drop the rows of cancelled jobs (a client went away): their rows are free at once;
2. admit waiting jobs, oldest first, while their rows fit: each prompt runs once on its own, into
   a ``KVCache`` of its length (the call ``generate`` makes for a prompt), its keys and values are
   copied into a free row for each of its choices, and each choice samples its first token;
3. one decode pass over every row in use: each row feeds its last token at its own position.

Why a row's tokens are the ones its request would get alone: its prompt is run exactly as alone;
in a decode pass its query sits at its own position and the cache's mask lets it see its own
keys only (others get exactly zero weight), so the only cross-row effect is the float rounding
of a batched matmul; and it draws with the one sampling step ``generate`` uses too
(sampling.py's ``draw``) from its own ``torch.Generator``, seeded from the request's seed plus
the choice's index. With one row in
flight the shapes are those of ``generate`` exactly, so a lone request (greedy or seeded) prints
what ``gptforge sample`` prints. A request never slides its window: the server refuses a prompt
plus ``max_tokens`` longer than the context, so positions never move.

Rows in use stay at the front of the cache (a finished row's place takes the last row), so a
decode pass runs over exactly the rows in use. The engine runs in a thread of its own (torch
releases the GIL in its kernels, so the web server's event loop keeps answering); ``step`` can
also be called directly, which the tests use to decide exactly when requests join.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gptforge.generate import TextStream
from gptforge.model import GPT, KVCache, RaggedKVCache
from gptforge.sampling import Sampling, draw
from gptforge.tokenizer import Tokenizer, stop_ids


class Text(NamedTuple):
    """More text of one choice (whole characters, never past a stop string)."""
    choice: int
    text: str


class End(NamedTuple):
    """A choice is complete: ``reason`` is "stop" (a stop string or end of text) or "length"."""
    choice: int
    reason: str
    tokens: int  # tokens generated, the one that ended it included


class Abort(NamedTuple):
    """The whole job was ended by the server (shutting down, or an internal error)."""
    message: str
    status: int


Event = Text | End | Abort


class Overloaded(Exception):
    """The waiting queue is full, or the server is shutting down: try again later."""


class Job:
    """One request: prompts (token ids) times n choices; choice i*n + j is prompt i's j-th.

    ``emit`` receives the job's events on the engine's thread.
    """

    def __init__(self, prompts: list[list[int]], n: int, params: Sampling,
                 emit: Callable[[Event], None]):
        self.prompts = prompts
        self.n = n
        self.params = params
        self.emit = emit
        self.rows = len(prompts) * n
        self.open = self.rows  # choices not yet ended
        self.cancelled = False


@dataclass
class _Row:
    job: Job
    choice: int
    gen: torch.Generator
    stream: TextStream
    last: int = 0  # the token to feed next
    tokens: int = 0
    done: bool = False


@dataclass
class Stats:
    served: int = 0  # jobs whose every choice ended
    cancelled: int = 0  # jobs dropped because their client went away
    rejected: int = 0  # jobs refused because the queue was full
    aborted: int = 0  # jobs ended by shutdown or an internal error
    steps: int = 0  # decode passes
    peak_rows: int = 0


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, device: torch.device,
                 max_batch: int = 16, max_queue: int = 64):
        self.model = model.eval()
        self.tok = tokenizer
        self.device = device
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.block_size = model.config.block_size
        self.stop_ids = stop_ids(tokenizer)  # the end of text, and of a turn for a chat model
        self.cache = RaggedKVCache(model.config.n_layer, max_batch, self.block_size)
        self.rows: list[_Row] = []  # the engine thread's own; row i is cache row i
        self.stats = Stats()
        self.weights = None  # the weights' dtype and why (a weights.WeightsChoice), from the loader
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._deadline: float | None = None  # set by drain: when jobs still running are aborted
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- the web server's side (any thread) ------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Rows generating now (a copy of the list: the engine's thread changes it)."""
        return sum(not row.done for row in list(self.rows))

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    def cache_bytes(self) -> int:
        """Memory of the ragged cache once allocated: keys and values, every layer and row."""
        c = self.model.config
        itemsize = self.model.transformer.wpe.weight.element_size()  # the activations' dtype
        return 2 * c.n_layer * self.max_batch * self.block_size * c.n_embd * itemsize

    def submit(self, job: Job) -> None:
        """Queue a job; raises Overloaded at once when the queue is full or the server stops."""
        if not 1 <= job.rows <= self.max_batch:
            raise ValueError(f"a job takes 1..{self.max_batch} rows, got {job.rows}")
        with self._cond:
            if self._deadline is not None or self._stop:
                raise Overloaded("the server is shutting down: send the request elsewhere")
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise Overloaded(f"the server is busy: {len(self._queue)} requests are already "
                                 "waiting (its --max-queue); retry in a moment")
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job whose client went away: out of the queue now, its rows at the next step."""
        if job.open == 0 or job.cancelled:
            return
        job.cancelled = True
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
            self.stats.cancelled += 1
            self._cond.notify()

    def drain(self, grace_s: float) -> None:
        """Take no more jobs; those queued or running get ``grace_s`` seconds, then are aborted."""
        with self._cond:
            if self._deadline is None:
                self._deadline = time.monotonic() + grace_s
            self._cond.notify()

    @staticmethod
    def launch(build: Callable[[], Engine]) -> Engine:
        """Build an engine on a thread of its own, warm it up there and leave that thread running
        its loop; return the engine once it is warm, or raise here what building it raised.

        Everything the model computes runs on that one thread. OpenMP (torch's CPU threads) keeps
        a team of worker threads for each thread that has run a parallel region, and once there
        are more of them than cores its workers stop spinning between regions. A model loaded
        and warmed up on the caller's thread left such a team behind: on 2 cores every decode
        step (hundreds of small regions) then ran about 2.5x slower on the engine's thread
        (BENCHMARKS.md, "Serving")."""
        built: list[Engine | BaseException] = []
        ready = threading.Event()

        def main() -> None:
            try:
                engine = build()
                engine.warm_up()
            except BaseException as e:  # handed to the caller, which reports it
                built.append(e)
                ready.set()
                return
            built.append(engine)
            ready.set()
            engine._loop()

        thread = threading.Thread(target=main, name="gptforge-engine", daemon=True)
        thread.start()
        ready.wait()
        if isinstance(built[0], BaseException):
            raise built[0]
        built[0]._thread = thread
        return built[0]

    def stop(self) -> None:
        """End the engine thread; jobs still queued or running are aborted."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self._abort_all("the server stopped before the request completed", 503)

    # -- the engine's thread ------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stop or self._queue or self.rows):
                        self._cond.wait()
                    if self._stop:
                        return
                try:
                    self.step()
                except Exception as e:  # a bug or an out-of-memory: fail the jobs, keep serving
                    traceback.print_exc(file=sys.stderr)
                    self._abort_all(f"internal error: {type(e).__name__}: {e}", 500)

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling round; False when there was nothing to do."""
        self._drop_cancelled()
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._abort_all("the server is shutting down: the request was cancelled", 503)
        admitted = self._admit()
        for job in admitted:
            self._prefill(job)
        if self.rows:
            self._decode()
        return bool(admitted or self.rows)

    def warm_up(self) -> None:
        """One tiny request through every code path: allocates the cache, loads the kernels."""
        job = Job([[0]], 1, Sampling(max_tokens=2, temperature=0), lambda e: None)
        with self._cond:
            self._queue.append(job)
        while job.open:
            self.step()
        self.stats = Stats()

    def _admit(self) -> list[Job]:
        admitted = []
        free = self.max_batch - len(self.rows)
        with self._cond:
            while self._queue and self._queue[0].rows <= free:
                job = self._queue.popleft()
                free -= job.rows
                admitted.append(job)
        return admitted

    def _prefill(self, job: Job) -> None:
        """Run each prompt once, copy it into a row per choice, sample each first token."""
        n_layer = self.model.config.n_layer
        for p, ids in enumerate(job.prompts):
            cache = KVCache(n_layer, len(ids))
            logits, _ = self.model(torch.tensor([ids], device=self.device), kv_cache=cache,
                                   last_only=True)
            new = []
            for j in range(job.n):
                choice = p * job.n + j
                stream = TextStream(self.tok, job.params.stops,
                                    lambda text, c=choice: job.emit(Text(c, text)))
                self.cache.load(len(self.rows), cache)
                row = _Row(job, choice, self._generator(job.params.seed, j), stream)
                self.rows.append(row)
                new.append(row)
            first = logits[:, -1, :].float().expand(job.n, -1)  # (n, V)
            self._deliver(new, self._sample(first, new))
        self.stats.peak_rows = max(self.stats.peak_rows, len(self.rows))
        self._compact()

    def _decode(self) -> None:
        idx = torch.tensor([[r.last] for r in self.rows], device=self.device)  # (B, 1)
        logits, _ = self.model(idx, kv_cache=self.cache)
        self._deliver(self.rows, self._sample(logits[:, -1, :].float(), self.rows))
        self.stats.steps += 1
        self._compact()

    def _generator(self, seed: int | None, choice: int) -> torch.Generator:
        seed = secrets.randbits(63) if seed is None else seed + choice
        return torch.Generator(device=self.device).manual_seed(seed)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """One token per row from logits (B, V), each row with its own settings and generator,
        the whole batch in one call (sampling.py's ``draw``, which ``generate`` uses too)."""
        return draw(logits, [row.job.params.draw_key for row in rows], [row.gen for row in rows])

    def _deliver(self, rows: list[_Row], tokens: list[int]) -> None:
        """Hand each row its token: text to its stream, and End when the row is complete."""
        for row, tok in zip(rows, tokens):
            row.tokens += 1
            row.last = tok
            if tok in self.stop_ids or row.stream.push(tok):
                reason = "stop"  # the model ended the text or its turn, or a stop string is complete
            elif row.tokens >= row.job.params.max_tokens:
                reason = "length"
            else:
                continue
            row.stream.finish()  # sends what was held back as a possible stop string's start
            row.done = True  # before End goes out, so that /health never counts it after
            job = row.job
            job.open -= 1
            if job.open == 0:
                self.stats.served += 1
            job.emit(End(row.choice, reason, row.tokens))

    def _compact(self) -> None:
        """Remove finished rows, moving the last rows into their places."""
        i = 0
        while i < len(self.rows):
            while self.rows and self.rows[-1].done:
                self.rows.pop()
            if i >= len(self.rows):
                break
            if self.rows[i].done:
                last = len(self.rows) - 1
                self.cache.move(last, i)
                self.rows[i] = self.rows.pop()
            i += 1

    def _drop_cancelled(self) -> None:
        if any(r.job.cancelled for r in self.rows):
            for row in self.rows:
                if row.job.cancelled:
                    row.done = True
            self._compact()

    def _abort_all(self, message: str, status: int) -> None:
        with self._cond:
            jobs = list(self._queue)
            self._queue.clear()
        for row in self.rows:
            if row.job not in jobs:
                jobs.append(row.job)
        self.rows = []
        for job in jobs:
            if job.open and not job.cancelled:
                job.open = 0
                self.stats.aborted += 1
                job.emit(Abort(message, status))
