"""HellaSwag (Zellers et al. 2019): pick the right one of four endings for a sentence.

Scoring is completion style, as llm.c (``dev/data/hellaswag.py``) and build-nanogpt
(``hellaswag.py``) do it, so the results compare with theirs: each ending becomes one row of
tokens, ``encode(ctx) + encode(" " + ending)``, and the model's cross-entropy is summed over the
ending's tokens only. ``acc`` counts the examples whose lowest summed loss is the labelled
ending, ``acc_norm`` those whose lowest mean loss per ending token is. (The Eleuther harness
scores differently, "multiple choice" style with its own preprocessing, hence its other figures.)

Speed: the four rows of an example go through the model in one forward pass, and examples of
similar length are batched together (sorted by length, so little padding). Rows are padded on
the right; causal attention means a real position never sees the padding, and padded positions
are never scored. A row longer than the model can take is cropped from the left.

The validation set (10,042 examples) is downloaded once from the authors' repository, checked
against its sha256 and cached, like Tiny Shakespeare (``data.fetch_named_dataset``).

This module sits below ``train`` so that training can report HellaSwag as it goes: it imports
only data, tokenizer, console (its progress bar) and error definitions, and takes the collective
sum as a function.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gptforge.console import progress_bar
from gptforge.data import NamedDataset, fetch_named_dataset
from gptforge.errors import GptforgeError
from gptforge.tokenizer import GPT2Tokenizer, Tokenizer, tokenizer_from_dict

N_ENDINGS = 4
VAL_EXAMPLES = 10_042

# The URL llm.c and build-nanogpt download from. Size 12,246,618 bytes; the sha256 is the one
# Hugging Face's datasets library recorded for this file (datasets/hellaswag/dataset_infos.json,
# "download_checksums"), which other projects that pin the file record too.
HELLASWAG_VAL = NamedDataset(
    url="https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    sha256="0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
    filename="hellaswag/hellaswag_val.jsonl",
    url_env="GPTFORGE_HELLASWAG_URL",
    title="HellaSwag validation set",
)


# ----------------------------------------------------------------------------------------------
# The data


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]  # N_ENDINGS of them
    label: int  # index of the right ending


def _given(option: str, value: str) -> str:
    """How a person passes ``value``: ``--data FILE`` to eval, ``--set train.hellaswag_data=FILE``
    to train."""
    return f"{option} {value}" if option.startswith("--") else f"--set {option}={value}"


def fetch_val(url: str | None = None, cache_dir: str | None = None, option: str = "--data") -> str:
    """Path of a verified local copy of the validation set, downloading it once."""
    base = os.path.basename(HELLASWAG_VAL.filename)
    hint = (f"download {base} yourself from {HELLASWAG_VAL.url} (or a mirror of it) and pass "
            f"the file: {_given(option, base)}")
    return fetch_named_dataset(HELLASWAG_VAL, url=url, cache_dir=cache_dir, hint=hint)


def _label(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():  # Hugging Face's copy stores "3"
        return int(value)
    return None


def parse_example(obj: Any, where: str) -> Example:
    """One parsed JSON line -> Example, or one line saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise GptforgeError(f"{where}: expected a JSON object with ctx, endings and label, "
                            f"got {type(obj).__name__}")
    for key in ("ctx", "endings"):
        if key not in obj:
            raise GptforgeError(f"{where}: no {key!r} field; a HellaSwag example has ctx, "
                                f"endings ({N_ENDINGS}) and label")
    ctx, endings = obj["ctx"], obj["endings"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise GptforgeError(f"{where}: 'ctx' must be a non-empty string, the context to complete")
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise GptforgeError(f"{where}: 'endings' must be a list of {N_ENDINGS} strings")
    if len(endings) != N_ENDINGS:
        raise GptforgeError(f"{where}: {len(endings)} endings, but a HellaSwag example has "
                            f"{N_ENDINGS}: fix or remove the line")
    if "label" not in obj:
        raise GptforgeError(f"{where}: no 'label' field (the test split's labels are not public: "
                            "use the validation set)")
    label = _label(obj["label"])
    if label is None or not 0 <= label < N_ENDINGS:
        raise GptforgeError(f"{where}: label {obj['label']!r} is out of range: it must be 0 to "
                            f"{N_ENDINGS - 1}, the index of the right ending")
    return Example(ctx=ctx, endings=tuple(endings), label=label)


def read_examples(path: str, limit: int = 0, option: str = "--data") -> list[Example]:
    """The examples of a HellaSwag .jsonl file (the first ``limit`` if > 0), each line checked.

    Blank lines are skipped. Every mistake is one line naming the file and line number.
    """
    if limit < 0:
        raise GptforgeError(f"--limit {limit} is out of range: give 1 or more (0: all examples)")
    if not os.path.exists(path):
        raise GptforgeError(f"{_given(option, path)}: the file does not exist; give a HellaSwag "
                            ".jsonl file, or leave it out to use the validation set (downloaded once)")
    if not os.path.isfile(path):
        raise GptforgeError(f"{_given(option, path)}: not a file; give a HellaSwag .jsonl file")
    examples: list[Example] = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                where = f"{path} line {n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise GptforgeError(f"{where} is not UTF-8 (byte 0x{raw[e.start]:02x} at "
                                        f"column {e.start + 1}): is it a HellaSwag .jsonl file?"
                                        ) from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GptforgeError(f"{where} is not valid JSON ({e.msg} at column {e.colno}): "
                                        "each line must be one HellaSwag example") from None
                examples.append(parse_example(obj, where))
                if limit and len(examples) == limit:
                    break
    except OSError as e:
        raise GptforgeError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    if not examples:
        raise GptforgeError(f"{path} holds no examples: give a HellaSwag .jsonl file, one "
                            "example per line")
    return examples


def check_encodable(tok: Tokenizer, examples: Sequence[Example], what: str, fix: str) -> None:
    """Byte-level vocabularies (GPT-2's, a trained BPE) encode any text exactly; a char
    vocabulary only the characters it was built from, so a text with another is refused."""
    chars = getattr(tok, "chars", None)
    if chars is None:
        return
    known = set(chars)
    for i, e in enumerate(examples):
        for text in (e.ctx, *(" " + end for end in e.endings)):
            missing = set(text) - known
            if missing:
                c = min(missing)
                raise GptforgeError(
                    f"HellaSwag example {i + 1} has the character {c!r} (U+{ord(c):04X}), which "
                    f"the char vocabulary of {what} ({len(chars)} symbols) cannot represent: {fix}")


# ----------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class Rendered:
    """One example as token rows, ready to score."""

    rows: tuple[tuple[int, ...], ...]  # N_ENDINGS rows: ctx tokens then the ending's tokens
    starts: tuple[int, ...]  # where each row's ending begins (0 if cropping ate the context)
    label: int
    cropped: int  # rows cropped from the left to fit the model

    @property
    def length(self) -> int:
        return max(len(r) for r in self.rows)


def render(ctx: list[int], endings: Sequence[list[int]], label: int, block_size: int) -> Rendered:
    """Token rows for one example. The model reads a row but its last token (which it only
    predicts), so a row may hold block_size + 1 tokens; a longer one loses its first tokens."""
    keep = block_size + 1
    rows, starts, cropped = [], [], 0
    for end in endings:
        row = ctx + end
        drop = max(len(row) - keep, 0)
        cropped += drop > 0
        rows.append(tuple(row[drop:]))
        starts.append(max(len(ctx) - drop, 0))
    return Rendered(tuple(rows), tuple(starts), label, cropped)


def render_examples(examples: Sequence[Example], block_size: int,
                    tok: Tokenizer | None = None) -> list[Rendered]:
    """Tokenize (with GPT-2's BPE unless ``tok`` is given): ``ctx``, then each ending with a
    leading space (llm.c's rows)."""
    tok = tok or GPT2Tokenizer()
    ctxs = tok.encode_batch([e.ctx for e in examples])
    ends = tok.encode_batch([" " + end for e in examples for end in e.endings])
    return [render(ctxs[i], ends[i * N_ENDINGS:(i + 1) * N_ENDINGS], e.label, block_size)
            for i, e in enumerate(examples)]


def load_rendered(data: str | None, tokenizer: dict[str, Any], block_size: int, what: str,
                  limit: int = 0, option: str = "--data") -> tuple[list[Rendered], str]:
    """Find the file (``data`` or the cached validation set), read it, check the model's
    tokenizer can represent its text, and tokenize it. Returns the rows and the file's path.
    ``what`` names the model's source and ``option`` how the file is passed, for the errors."""
    training = not option.startswith("--")
    tok = tokenizer_from_dict(tokenizer)
    path = data if data else fetch_val(option=option)
    examples = read_examples(path, limit, option)
    check_encodable(tok, examples, what, fix=(
        "prepare the data with --tokenizer gpt2 or bpe, or leave train.hellaswag_interval at 0"
        if training else "evaluate a model trained with --tokenizer gpt2 or bpe"))
    return render_examples(examples, block_size, tok), path


def make_batches(items: Sequence[Rendered], max_examples: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices of ``items`` grouped into batches of at most ``max_examples`` examples and (if
    > 0) ``max_tokens`` padded tokens, longest first: similar lengths share a batch, so there is
    little padding, and a batch too big for memory fails at once rather than at the end."""
    order = sorted(range(len(items)), key=lambda i: (-items[i].length, i))
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        # Sorted longest first, so a batch's padded length is that of its first example.
        if (b is not None and len(b) < max_examples
                and (not max_tokens or (len(b) + 1) * N_ENDINGS * items[b[0]].length <= max_tokens)):
            b.append(i)
        else:
            batches.append([i])
    return batches


def collate(items: Sequence[Rendered]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (R, T) and targets (R, T) for R = 4 x examples rows, T = longest row - 1.

    Targets hold the next token where it is an ending's token and -1 elsewhere (the context and
    the padding), so only endings are scored. Padding (token 0) sits after a row's last token.
    """
    rows = [(row, start) for it in items for row, start in zip(it.rows, it.starts)]
    T = max(len(row) for row, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (row, start) in enumerate(rows):
        t = torch.tensor(row, dtype=torch.long)
        x[r, : len(row) - 1] = t[:-1]
        # position p predicts row[p + 1]; it is an ending token from p + 1 = max(start, 1) on
        first = max(start, 1)
        y[r, first - 1 : len(row) - 1] = t[first:]
    return x, y


def ending_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (nats, float64) and scored token count of each row.

    logits (R, T, V), targets (R, T) with -1 where nothing is scored. Only the scored positions
    go through log-softmax, which keeps memory at (ending tokens x V) instead of (R x T x V).
    """
    sel = targets >= 0  # (R, T)
    nats = F.cross_entropy(logits[sel].float(), targets[sel], reduction="none")  # (K,)
    row_of = torch.arange(targets.size(0), device=targets.device)[:, None].expand_as(targets)[sel]
    sums = torch.zeros(targets.size(0), dtype=torch.float64, device=targets.device)
    sums.index_add_(0, row_of, nats.double())
    return sums, sel.sum(1)


def choose(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(examples, 4) summed losses and token counts -> the ending with the lowest summed loss
    (acc) and with the lowest mean loss per token (acc_norm). Ties go to the first ending.
    Every row scores at least one token: contexts are never empty, and an ending is at least
    the space before it."""
    return sums.argmin(1), (sums / counts).argmin(1)


# ----------------------------------------------------------------------------------------------
# Scoring


@dataclass
class HellaSwagResult:
    examples: int
    correct: int  # lowest summed loss is the label
    correct_norm: int  # lowest mean loss is the label
    acc: float
    acc_norm: float
    tokens: int  # real tokens through the model (padding not counted)
    cropped: int  # rows cropped from the left to fit the context
    rows: int
    wall_s: float
    tok_per_s: float
    # per example, in the input's order; -1 where another rank scored it
    preds: list[int] = field(default_factory=list)
    preds_norm: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-example predictions."""
        return {k: v for k, v in self.__dict__.items() if k not in ("preds", "preds_norm")}

    def line(self) -> str:
        """``gptforge eval --task hellaswag``'s result line."""
        return (f"hellaswag: acc {self.acc:.4f} | acc_norm {self.acc_norm:.4f} | "
                f"{self.examples:,} examples | {self.tok_per_s:,.0f} tok/s | {self.wall_s:.1f}s")


@torch.no_grad()
def score(
    model: torch.nn.Module,
    items: Sequence[Rendered],
    batch_size: int = 4,
    max_tokens: int = 0,
    device: torch.device | str = "cpu",
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    shard: tuple[int, int] = (0, 1),
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    progress: bool = False,
) -> HellaSwagResult:
    """acc and acc_norm of ``model`` (anything returning ``(logits, _)`` from ``model(idx)``).

    Batches: at most ``batch_size`` examples and ``max_tokens`` padded tokens (0: no cap). With
    ``shard=(rank, world)`` each rank scores every world-th batch and ``reduce_sum`` adds the
    ranks' counts; the batches are the same whatever the number of ranks, so the result is the
    same as one process scoring everything.
    """
    if batch_size < 1:
        raise GptforgeError(f"--batch-size {batch_size} is out of range: give 1 or more")
    rank, world = shard
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    batches = [b for k, b in enumerate(make_batches(items, batch_size, max_tokens)) if k % world == rank]
    preds = [-1] * len(items)
    preds_norm = [-1] * len(items)
    counts = [0, 0, 0, 0]  # examples, correct, correct_norm, tokens (this rank's)
    with progress_bar(total=sum(len(b) for b in batches), desc="hellaswag", unit="ex",
                      disable=not progress, leave=False) as bar:
        for idx in batches:
            batch = [items[i] for i in idx]
            x, y = collate(batch)
            counts[3] += sum(len(r) - 1 for it in batch for r in it.rows)
            with amp():
                logits, _ = model(x.to(device))  # (R, T, V)
            sums, n = ending_losses(logits, y.to(device))
            pred, pred_norm = (p.cpu().tolist() for p in choose(sums.view(-1, N_ENDINGS),
                                                               n.view(-1, N_ENDINGS)))
            for i, it, p, q in zip(idx, batch, pred, pred_norm):
                preds[i], preds_norm[i] = p, q
                counts[0] += 1
                counts[1] += p == it.label
                counts[2] += q == it.label
            bar.update(len(idx))
    model.train(was_training)
    total = reduce_sum(torch.tensor(counts, dtype=torch.long, device=device))
    examples, correct, correct_norm, tokens = (int(v) for v in total.tolist())
    wall = time.perf_counter() - start
    return HellaSwagResult(
        examples=examples, correct=correct, correct_norm=correct_norm,
        acc=correct / examples if examples else float("nan"),
        acc_norm=correct_norm / examples if examples else float("nan"),
        tokens=tokens, cropped=sum(it.cropped for it in items), rows=N_ENDINGS * len(items),
        wall_s=wall, tok_per_s=tokens / wall if wall > 0 else float("nan"),
        preds=preds, preds_norm=preds_norm)
