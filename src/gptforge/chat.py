"""``gptforge chat``: talk to a chat model in the terminal, or ask it once from a script.

A session keeps the conversation (an optional system message, then user and assistant messages)
and renders it as ChatML (tokenizer/chat.py) for every reply, which ``generate`` streams until the
model ends its turn (``<|im_end|>``), the context is full or ``--max-new-tokens`` is reached.
The history stays within the model's context: when the next prompt would leave the reply less
than ``reserve`` tokens, the oldest exchanges (a user message and its reply) are dropped, with a
notice; the system message stays. Ctrl-C during a reply stops the reply (what was printed of it
is kept in the history) and the session goes on; ``/reset`` forgets the history, ``/quit`` (or
Ctrl-D) ends the session. A base model, whose vocabulary has no chat tokens, is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptforge.checkpoint import load_model
from gptforge.device import pick_device
from gptforge import weights
from gptforge.errors import GptforgeError
from gptforge.generate import TextStream, generate
from gptforge.model import GPT
from gptforge.sampling import Sampling
from gptforge.tokenizer import prompt_ids, require_chat, stop_ids, tokenizer_from_dict

COMMANDS = "/reset forgets the conversation, /quit ends it (or Ctrl-D); Ctrl-C stops a reply"


@dataclass
class Reply:
    text: str
    reason: str  # "stop" (the model ended its turn), "length", or "interrupted"
    dropped: int  # exchanges dropped from the history to make room for it


@dataclass
class ChatSession:
    """One conversation with a loaded chat model; ``reply`` answers a user message."""

    model: GPT
    tok: object
    sampling: Sampling  # max_tokens: the most a reply may take (within the context)
    system: str | None = None
    reserve: int = 0  # tokens kept free for a reply when trimming the history (0: a quarter)
    history: list[dict[str, str]] = field(default_factory=list)
    weights_used: weights.WeightsChoice | None = None  # the dtype of the weights, and why

    def __post_init__(self) -> None:
        device = next(self.model.parameters()).device
        self.generator = torch.Generator(device=device)
        if self.sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.sampling.seed)

    def reset(self) -> None:
        self.history = []

    def _messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def _fit(self, user: str) -> tuple[list[int], int]:
        """The prompt ids for ``user`` after the history, the oldest exchanges dropped until the
        reply has room; and how many were dropped."""
        block = self.model.config.block_size
        room = self.reserve or min(self.sampling.max_tokens, max(block // 4, 1))
        dropped = 0
        while True:
            ids = prompt_ids(self.tok, self._messages([*self.history, {"role": "user", "content": user}]))
            if len(ids) + room <= block or not self.history:
                break
            self.history = self.history[2:]  # the oldest user message and its reply
            dropped += 1
        if len(ids) >= block:
            raise GptforgeError(f"the message and the system prompt take {len(ids):,} tokens, and "
                                f"the model's context holds {block:,}: write a shorter one")
        return ids, dropped

    def reply(self, user: str, emit: Callable[[str], None]) -> Reply:
        """Answer ``user``, streaming the reply's text to ``emit``; the exchange joins the history."""
        ids, dropped = self._fit(user)
        device = next(self.model.parameters()).device
        budget = min(self.sampling.max_tokens, self.model.config.block_size - len(ids))
        stream = TextStream(self.tok, self.sampling.stops, emit)
        s = self.sampling
        try:
            out = generate(self.model, torch.tensor([ids], device=device), budget, s.temperature,
                           s.top_k, self.generator, stop_ids(self.tok), top_p=s.top_p,
                           on_token=lambda _row, token: stream.push(token))[0]
            # fewer tokens than the budget: the turn ended (<|im_end|>) or a stop text came
            reason = "stop" if len(out) < budget or stream.stopped else "length"
            text = stream.finish()
        except KeyboardInterrupt:  # the reply ends where it was: the text already shown
            reason, text = "interrupted", stream.text
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return Reply(text, reason, dropped)


def open_session(ckpt: str, sampling: Sampling, system: str | None, device: str,
                 weights_dtype: str = "auto") -> ChatSession:
    """The session for a checkpoint, or one line saying why it cannot chat. Its weights are in
    ``weights_dtype`` (weights.py); ``weights_used`` says which and why."""
    weights.check(weights_dtype)
    model, record = load_model(ckpt)
    tok = tokenizer_from_dict(record)
    require_chat(tok, f"{ckpt} is a base model: its vocabulary",
                 "chat needs a model fine-tuned on conversations (docs/chat.md); "
                 "gptforge sample continues text")
    model, choice = weights.prepare(model, weights_dtype, pick_device(device))
    return ChatSession(model, tok, sampling, system, weights_used=choice)


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def notice(text: str) -> None:
    print(f"({text})", file=sys.stderr, flush=True)


def one_shot(session: ChatSession, message: str) -> int:
    """Print the reply to one message (``--message``, or standard input that is not a terminal)."""
    reply = session.reply(message, write)
    write("\n")
    if reply.reason == "length":
        notice("the reply stopped at --max-new-tokens or the end of the context")
    return 130 if reply.reason == "interrupted" else 0


def interactive(session: ChatSession, name: str) -> int:
    """The terminal conversation: read a message, stream the reply, until /quit or Ctrl-D."""
    try:
        import readline  # noqa: F401 - line editing and history for input(), where available
    except ImportError:
        pass
    block = session.model.config.block_size
    notice(f"chatting with {name} (context {block:,} tokens); {COMMANDS}")
    while True:
        try:
            line = input("> ")
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as a shell does
            write("\n")
            continue
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            session.reset()
            notice("the conversation was forgotten")
            continue
        if not line.strip():
            continue
        reply = session.reply(line, write)
        write("\n")
        if reply.dropped:
            notice(f"dropped the oldest {reply.dropped} exchange(s) to keep the conversation "
                   f"within the context of {block:,} tokens")
        if reply.reason == "interrupted":
            notice("reply stopped")
        elif reply.reason == "length":
            notice("the reply stopped at --max-new-tokens or the end of the context")
