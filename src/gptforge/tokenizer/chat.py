"""Conversations as tokens: ChatML's layout, the check of a conversation, the ids and the mask.

A conversation is OpenAI's list of messages, ``[{"role": "system"|"user"|"assistant",
"content": "..."}]``. gptforge lays it out as ChatML (the layout transformers, llama.cpp and Ollama
know; Qwen's and many others' chat models use it):

    <|im_start|>system\\nYou are terse.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello.<|im_end|>\\n

``<|im_start|>`` and ``<|im_end|>`` are special tokens of the vocabulary: a trained BPE reserves
them (bpe.py), GPT-2's BPE grows by two (gpt2.py). Text is always encoded as ordinary text, so a
message that contains the characters ``<|im_end|>`` gets ordinary tokens, never the special id:
only ``render`` places special ids. A char vocabulary has no room for them and is refused.

Each piece of text between two special tokens is encoded on its own, which is exactly what
Hugging Face's ``apply_chat_template`` does with ``CHATML_TEMPLATE`` (it renders the text, cuts it
at the special tokens' names and encodes each piece), so both give the same ids for content
without special-token text. The role's header and the content are one piece, ``role + "\\n" +
content``, as in that text; the mask marks a token of an assistant message as trained when it
holds any byte of the content (the header's newline and a leading space of the content can share
a token), plus the ``<|im_end|>`` that ends each assistant message: what the model must learn to
say, and when to stop. Everything else (system and user messages, headers, the newlines between
messages) is context only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gptforge.errors import GptforgeError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")
ASSISTANT = "assistant"
# The Jinja template transformers' apply_chat_template renders (and llama.cpp recognises as
# ChatML); it is kept in the tokenizer's record, so in meta.json, every checkpoint and exports.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_RECORD_KEY = "chat_template"  # in a tokenizer's to_dict(): present for a chat vocabulary


def is_chat(tok: Any) -> bool:
    """Whether the tokenizer has ChatML's special tokens."""
    return getattr(tok, "im_start_id", None) is not None and getattr(tok, "im_end_id", None) is not None


def require_chat(tok: Any, what: str, fix: str) -> None:
    """One line when ``tok`` cannot hold conversations: ``what`` names the thing, ``fix`` says
    what to do."""
    if is_chat(tok):
        return
    if tok.name == "char":
        raise GptforgeError(f"{what} uses a char vocabulary, which has no special tokens to mark "
                            f"turns: {fix}")
    raise GptforgeError(f"{what} has no chat tokens ({IM_START}, {IM_END}): {fix}")


def message_problem(messages: Any, need_assistant: bool) -> str | None:
    """Why ``messages`` is not a conversation gptforge can use, or None. Extra keys of a message
    (OpenAI's "name", a dataset's own) are ignored."""
    if not isinstance(messages, list) or not messages:
        return "the conversation has no messages (an empty list)" if isinstance(messages, list) \
            else f"the messages are {type(messages).__name__}, not a list of objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is {type(m).__name__}, not an object with role and content"
        role = m.get("role")
        if role is None:
            return f"message {i} has no role (one of {', '.join(ROLES)})"
        if role not in ROLES:
            return f"message {i} has the unknown role {role!r} (roles: {', '.join(ROLES)})"
        content = m.get("content")
        if not isinstance(content, str):
            kind = "missing" if content is None else f"{type(content).__name__}, not a string"
            return f"message {i} ({role}) has content that is {kind}"
    if need_assistant and not any(m["role"] == ASSISTANT for m in messages):
        return "the conversation has no assistant message, so nothing in it would be trained on"
    return None


def render(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False
           ) -> tuple[list[int], list[int]]:
    """(ids, mask) of a checked conversation in ChatML; mask 1 marks the tokens trained on.

    With ``add_generation_prompt`` the ids end with ``<|im_start|>assistant\\n``: a prompt for
    the model's reply (what ``apply_chat_template(..., add_generation_prompt=True)`` gives).
    """
    start, end = tok.im_start_id, tok.im_end_id
    newline = tok.encode("\n")
    lengths = tok.token_bytes()
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        header = m["role"] + "\n"
        piece = tok.encode(header + m["content"])
        trained = m["role"] == ASSISTANT
        ids.append(start)
        mask.append(0)
        ids.extend(piece)
        if trained:  # a token ending past the header's bytes holds content
            ends = np.cumsum(lengths[np.asarray(piece, dtype=np.int64)]) if piece else np.zeros(0)
            mask.extend((ends > len(header.encode("utf-8"))).astype(int).tolist())
        else:
            mask.extend([0] * len(piece))
        ids.append(end)
        mask.append(int(trained))
        ids.extend(newline)
        mask.extend([0] * len(newline))
    if add_generation_prompt:
        ids.append(start)
        ids.extend(tok.encode(ASSISTANT + "\n"))
        mask.extend([0] * (len(ids) - len(mask)))
    return ids, mask


def prompt_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """The ids a chat model continues to reply to ``messages``."""
    return render(tok, messages, add_generation_prompt=True)[0]


def turn_starts(messages: list[dict[str, str]]) -> list[int]:
    """Where a conversation may be cut: before each user message that follows an assistant
    message (a part then holds whole exchanges)."""
    return [i for i in range(1, len(messages))
            if messages[i]["role"] == "user" and messages[i - 1]["role"] == ASSISTANT]
