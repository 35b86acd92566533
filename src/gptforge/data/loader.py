"""Batches from a split: a deterministic, resumable loader, consecutive evaluation windows, and
the feeder that takes the loader's batches to the device (``BatchFeeder``).

``tokens`` is anything that behaves like a 1-D uint16 array: a shard's memmap, a plain array, or
a ``TokenStream`` over all the shards of a split (``load_split``), whose slices and index arrays
may cross shard boundaries. So a split of many shards is one stream of tokens here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Union

import numpy as np
import torch

from gptforge.data.shards import TokenStream
from gptforge.errors import GptforgeError

Tokens = Union[np.ndarray, TokenStream]  # 1-D uint16 token ids


def _too_short(tokens: Tokens, n: int, b: int, t: int, need: int) -> GptforgeError:
    where = getattr(tokens, "name", None) or getattr(tokens, "filename", None) or "the token array"
    return GptforgeError(
        f"{where} has {n} tokens, fewer than one batch of {b} x {t} + 1 = {need}; "
        "use a smaller train.batch_size/train.seq_len or more text"
    )


class TokenLoader:
    """(x, y) int32 batches of shape (B, T) from a split; y is x shifted left by one token.
    (int32, not int64: half the bytes to the device, widened there; see BatchFeeder.)

    There is one global stream of sequences (windows of T+1 tokens). ``cursor`` counts global
    sequences consumed; a call on rank r returns sequences [cursor + r*B, cursor + (r+1)*B) and
    advances cursor by world_size*B. So the stream does not depend on how many processes read
    it: 2 calls on 1 process see what 1 call each on 2 processes see, and a run can resume with
    a different world size.

    mode "sequential" is build-nanogpt's DataLoaderLite: sequence k starts at token
    (k mod n_seq) * T with n_seq = floor((N-1) / (B*T)) * B, i.e. batches walk the split in
    order (across its shards) and wrap to the start when a whole B*T+1 no longer fits (the tail
    is dropped).
    mode "random" draws each sequence's start uniformly in [0, N-T-1] over the whole split (all
    shards, not shard by shard), seeded per global index.
    """

    RANDOM_BLOCK = 4096  # sequences whose starts come from one seeded generator

    def __init__(
        self,
        tokens: Tokens,
        batch_size: int,
        seq_len: int,
        mode: str = "sequential",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if mode not in ("sequential", "random"):
            raise GptforgeError(f"unknown data loader mode {mode!r}: choose sequential or random")
        if batch_size < 1 or seq_len < 1:
            raise GptforgeError(
                f"batch size and sequence length must be >= 1, got {batch_size} x {seq_len}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.tokens = tokens
        self.B, self.T = batch_size, seq_len
        self.mode, self.seed = mode, int(seed)
        self.rank, self.world_size = rank, world_size
        self.cursor = 0
        n = len(tokens)
        if mode == "sequential":
            need = self.B * self.T + 1
            self.n_seq = (n - 1) // (self.B * self.T) * self.B if n > 0 else 0
        else:
            need = self.T + 1
            self.n_seq = 0
        if n < need:
            raise _too_short(tokens, n, self.B, self.T, need)
        self._block_index = -1
        self._block_starts = np.zeros(0, dtype=np.int64)

    def _random_starts(self, first: int) -> np.ndarray:
        """Window starts of global sequences first .. first+B-1, independent of world size."""
        ks = np.arange(first, first + self.B, dtype=np.int64)
        starts = np.empty(self.B, dtype=np.int64)
        high = len(self.tokens) - self.T  # exclusive: start + T + 1 <= N
        for block in np.unique(ks // self.RANDOM_BLOCK):
            block = int(block)
            if block != self._block_index:
                rng = np.random.default_rng([self.seed, block])
                self._block_starts = rng.integers(0, high, size=self.RANDOM_BLOCK, dtype=np.int64)
                self._block_index = block
            sel = ks // self.RANDOM_BLOCK == block
            starts[sel] = self._block_starts[ks[sel] % self.RANDOM_BLOCK]
        return starts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        first = self.cursor + self.rank * B
        if self.mode == "sequential":
            # n_seq is a multiple of B and first is too, so a batch never straddles the wrap:
            # it is one contiguous run of B*T+1 tokens.
            start = (first % self.n_seq) * T
            buf = torch.from_numpy(
                np.asarray(self.tokens[start : start + B * T + 1], dtype=np.int32)
            )
            x = buf[:-1].view(B, T)
            y = buf[1:].view(B, T)  # shares storage with x, like DataLoaderLite
        else:
            idx = self._random_starts(first)[:, None] + np.arange(T + 1)  # (B, T+1)
            buf = np.asarray(self.tokens[idx], dtype=np.int32)
            x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
            y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
        self.cursor += self.world_size * B
        return x, y

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, plus what must match for resuming to continue the same stream."""
        return {
            "mode": self.mode,
            "seed": self.seed,
            "cursor": self.cursor,
            "batch_size": self.B,
            "seq_len": self.T,
            "n_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        # state key -> the setting a person would change (config names; n_tokens is the data)
        settings = {
            "mode": "data.loader",
            "seed": "train.seed",
            "batch_size": "train.batch_size",
            "seq_len": "train.seq_len",
            "n_tokens": "train tokens in the data",
        }
        for key, setting in settings.items():
            if state.get(key) != mine[key]:
                raise GptforgeError(
                    f"cannot resume the data stream: {setting} was {state.get(key)!r} in the "
                    f"checkpoint and is {mine[key]!r} now; resume with the same data and settings"
                )
        cursor = state.get("cursor")
        if not isinstance(cursor, int) or cursor < 0:
            raise GptforgeError(
                f"cannot resume the data stream: bad cursor {cursor!r} in the checkpoint"
            )
        self.cursor = cursor


class RowLoader:
    """(x, y) int32 batches of conversations, y = -1 where nothing is trained (data/conversations.py).

    Rows of ``seq_len + 1`` tokens each hold whole conversations, packed greedily in their order
    (a conversation starts a new row when it does not fit in the current one); the rest of a row
    is the end-of-text token with a mask of 0. Row r is a contiguous range of the split's stream,
    separators included, so a row never cuts a conversation and the model attends across the
    conversations of a row as it does across documents in pre-training. x is the row but its last
    token, y the row but its first, set to -1 wherever the mask is 0 (the loss ignores -1).

    The stream of sequences and its cursor are TokenLoader's: a call on rank r returns global
    rows [cursor + r*B, cursor + (r+1)*B), and the cursor advances by world_size*B, so it does not
    depend on the number of processes. "sequential" takes rows in order, wrapping; "random" takes
    each pass over the rows in a permutation seeded by (seed, pass). ``use_mask=False`` trains on
    every token of each conversation instead (data.mask=false: what the mask is worth).
    """

    def __init__(self, tokens: Tokens, mask: Tokens, eot: int, batch_size: int, seq_len: int,
                 mode: str = "sequential", seed: int = 0, rank: int = 0, world_size: int = 1,
                 what: str = "the data", use_mask: bool = True) -> None:
        if mode not in ("sequential", "random"):
            raise GptforgeError(f"unknown data loader mode {mode!r}: choose sequential or random")
        if not use_mask:  # every token of a conversation, the separators still not
            mask = (np.asarray(tokens[0 : len(tokens)]) != eot).astype(np.uint8)
        self.tokens, self.mask, self.eot = tokens, mask, eot
        self.B, self.T = batch_size, seq_len
        self.mode, self.seed, self.rank, self.world_size = mode, int(seed), rank, world_size
        self.cursor = 0
        self.starts, self.ends, self.row_trained = pack_rows(tokens, mask, eot, seq_len + 1, what)
        self._perm_pass, self._perm = -1, np.zeros(0, dtype=np.int64)

    @property
    def rows(self) -> int:
        return len(self.starts)

    def row_of(self, k: int) -> int:
        """The row global sequence ``k`` reads."""
        n = self.rows
        if self.mode == "sequential":
            return k % n
        if k // n != self._perm_pass:
            self._perm_pass = k // n
            self._perm = np.random.default_rng([self.seed, self._perm_pass]).permutation(n)
        return int(self._perm[k % n])

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``r``'s x and y (T each, int32), y = -1 where not trained."""
        a, b = int(self.starts[r]), int(self.ends[r])
        buf = np.full(self.T + 1, self.eot, dtype=np.int32)
        keep = np.zeros(self.T + 1, dtype=bool)
        buf[: b - a] = self.tokens[a:b]
        keep[: b - a] = np.asarray(self.mask[a:b], dtype=bool)
        y = np.where(keep[1:], buf[1:], -1).astype(np.int32)
        return buf[:-1], y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.cursor + self.rank * self.B
        pairs = [self.row(self.row_of(k)) for k in range(first, first + self.B)]
        self.cursor += self.world_size * self.B
        return (torch.from_numpy(np.stack([p[0] for p in pairs])),
                torch.from_numpy(np.stack([p[1] for p in pairs])))

    def trained_between(self, a: int, b: int) -> int:
        """Tokens trained on in global sequences [a, b): what the steps between two cursors saw
        over every rank (every rank knows every row, so no rank needs to be asked)."""
        return int(sum(self.row_trained[self.row_of(k)] for k in range(a, b)))

    def batches_in_order(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row once, in order, B at a time: held-out evaluation of a conversation split."""
        for r0 in range(0, self.rows, self.B):
            pairs = [self.row(r) for r in range(r0, min(r0 + self.B, self.rows))]
            yield (torch.from_numpy(np.stack([p[0] for p in pairs])),
                   torch.from_numpy(np.stack([p[1] for p in pairs])))

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "seed": self.seed, "cursor": self.cursor,
                "batch_size": self.B, "seq_len": self.T, "n_tokens": len(self.tokens),
                "rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        TokenLoader.load_state_dict(self, state)  # type: ignore[arg-type]  # the same checks


def pack_rows(tokens: Tokens, mask: Tokens, eot: int, row_len: int, what: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, trained tokens) of each row: whole conversations packed greedily into rows of
    at most ``row_len`` tokens. A conversation longer than a row is refused in one line, with the
    count, the longest and what to do."""
    ids = np.asarray(tokens[0 : len(tokens)])
    seps = np.flatnonzero(ids == eot)  # conversation i spans (seps[i-1], seps[i])
    bounds_a = np.concatenate([[0], seps + 1])
    bounds_b = np.concatenate([seps, [len(ids)]])
    lengths = bounds_b - bounds_a
    too_long = lengths > row_len
    if too_long.any():
        raise GptforgeError(
            f"{int(too_long.sum()):,} of the {len(lengths):,} conversations of {what} are longer "
            f"than a row of train.seq_len + 1 = {row_len} tokens (the longest has "
            f"{int(lengths.max()):,}): raise train.seq_len (at most the model's context), or "
            f"prepare the data again with --max-conversation-tokens {row_len} to split them on "
            "turn boundaries")
    trained = np.cumsum(np.concatenate([[0], np.asarray(mask[0 : len(mask)], dtype=np.int64)]))
    starts, ends = [], []
    for a, b in zip(bounds_a.tolist(), bounds_b.tolist()):
        if starts and b - starts[-1] <= row_len:
            ends[-1] = b  # the separator before it comes along, inside the row
        else:
            starts.append(a)
            ends.append(b)
    s, e = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
    return s, e, trained[e] - trained[s]


def count_eval_windows(tokens: Tokens, seq_len: int) -> int:
    """Windows of seq_len+1 tokens in ``tokens``, consecutive (neighbours share one token)."""
    return max(len(tokens) - 1, 0) // seq_len


def iter_eval_batches(
    tokens: Tokens, batch_size: int, seq_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every full window of a split, in order, as (x, y) int32 batches; the last may be smaller.

    Window w predicts tokens[w*T+1 : (w+1)*T+1], so together they score every token but the
    first once. A final window shorter than T is dropped. Yields nothing if the split is shorter
    than T+1 tokens (check count_eval_windows first to say so).
    """
    T = seq_len
    n_windows = count_eval_windows(tokens, T)
    for w0 in range(0, n_windows, batch_size):
        rows = min(batch_size, n_windows - w0)
        buf = torch.from_numpy(np.asarray(tokens[w0 * T : (w0 + rows) * T + 1], dtype=np.int32))
        yield buf[:-1].view(rows, T), buf[1:].view(rows, T)


# ----------------------------------------------------------------------------------------------
# Batches on their way to the device


class BatchFeeder:
    """Moves (x, y) batches of int32 token ids to ``device`` and widens them to int64 there.

    The host never builds int64 copies (half the bytes over PCIe, and no host pass). On CUDA each
    batch is copied into one of a few reused pinned buffers and sent asynchronously; before a
    buffer is refilled, the host waits for the copy that last read from it, so the buffers are
    never overwritten in flight (and the host runs at most ``slots`` batches ahead of the GPU).
    """

    def __init__(self, host_batches: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device, slots: int = 4, stage: bool | None = None):
        self.host_batches = host_batches
        self.device = device
        self.pinned = device.type == "cuda"
        self.stage = device.type != "cpu" if stage is None else stage  # the CPU needs no staging
        self.slots = slots
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * slots
        self._copied: list[Any] = [None] * slots  # CUDA event of the copy out of each buffer
        self._next = 0

    def _staging(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reusable host buffer pair shaped like (x, y), free to overwrite."""
        i = self._next
        self._next = (i + 1) % self.slots
        buf = self._buffers[i]
        if buf is None or buf[0].shape != x.shape:
            buf = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned) for t in (x, y))
            self._buffers[i] = buf
        elif self._copied[i] is not None:
            self._copied[i].synchronize()  # the copy that last read this buffer is done
        self._slot = i
        return buf

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.host_batches()
        if not self.stage:
            return x.to(self.device).long(), y.to(self.device).long()
        hx, hy = self._staging(x, y)
        hx.copy_(x)
        hy.copy_(y)
        dx = hx.to(self.device, non_blocking=self.pinned)
        dy = hy.to(self.device, non_blocking=self.pinned)
        if self.pinned:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # the stream the copies are on
            self._copied[self._slot] = event
        return dx.long(), dy.long()
