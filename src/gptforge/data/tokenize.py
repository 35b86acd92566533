"""Tokenizing in worker processes, with the results in input order.

Batches of pieces (about BATCH_CHARS of text each) go to a pool of processes, at most IN_FLIGHT
per worker at a time, and come back in the order they went out: the output of ``prepare`` is
the same for any number of workers, and memory stays bounded by workers x IN_FLIGHT x BATCH_CHARS.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from gptforge.data.shards import token_dtype
from gptforge.data.sources import Piece
from gptforge.data.staging import PrepareInterrupted
from gptforge.tokenizer import Tokenizer, tokenizer_from_dict

BATCH_CHARS = 1024 * 1024  # text per worker task
IN_FLIGHT = 2  # tasks per worker queued or running: memory ~ workers * IN_FLIGHT * BATCH_CHARS

_worker_tok: Tokenizer | None = None


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:  # a worker whose prepare was killed must not linger
        time.sleep(1.0)
    os._exit(1)


def _init_worker(tokenizer: Any, parent: int) -> None:
    global _worker_tok
    # A record, or a trained BPE itself (it pickles as its file: a spawned worker has not read it)
    _worker_tok = tokenizer_from_dict(tokenizer) if isinstance(tokenizer, dict) else tokenizer
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of each text, back to back (the shards' dtype), and how many each text gave."""
    assert _worker_tok is not None
    arrays = [_worker_tok.encode_array(t) for t in texts]
    counts = np.array([len(a) for a in arrays], dtype=np.int64)
    dtype = token_dtype(_worker_tok.vocab_size)
    tokens = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return tokens, counts


Batch = list[tuple[int, Piece]]  # (file index, piece)


def batches(pieces: Iterator[tuple[int, Piece]]) -> Iterator[Batch]:
    batch: Batch = []
    chars = 0
    for item in pieces:
        batch.append(item)
        chars += len(item[1].text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenized(batches: Iterator[Batch], tok: Tokenizer, workers: int
               ) -> Iterator[tuple[Batch, tuple[np.ndarray, np.ndarray]]]:
    """(batch, its tokens) for every batch, in order, tokenized by ``workers`` processes."""
    global _worker_tok
    if workers <= 1:
        _worker_tok = tok
        for batch in batches:
            yield batch, _encode([p.text for _, p in batch])
        return
    # fork: workers start at once and inherit the tokenizer already built (spawn elsewhere).
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=_init_worker,
                               initargs=(tok if tok.name == "bpe" else tok.to_dict(), os.getpid()))
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_encode, [p.text for _, p in batch])))
            if len(pending) >= IN_FLIGHT * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    except BrokenProcessPool:
        raise PrepareInterrupted(
            "a tokenizer process died (out of memory?): run the same command again to continue, "
            "with fewer --workers if memory is short"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
