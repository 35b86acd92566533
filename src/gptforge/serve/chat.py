"""OpenAI's chat completions protocol as gptforge serves it: the request, and the answers' shapes.

``POST /v1/chat/completions`` takes OpenAI's ``messages`` (system, user and assistant, content a
string), renders them as ChatML with the prompt for the assistant's reply (tokenizer/chat.py, the
same ids ``gptforge chat`` and transformers' ``apply_chat_template`` give), and runs the reply as
a job of the same engine as completions, on the same continuous batching. A reply ends at the
model's ``<|im_end|>`` (finish_reason "stop"), a stop text, or ``max_tokens``
(``max_completion_tokens``, its newer name) where it is "length"; without either, a reply may
use the rest of the context, as OpenAI's does. The sampling values and their rules are
sampling.py's (protocol.request_sampling). What is refused, each as a 400 in OpenAI's shape: a
model without chat tokens (a base model: use completions), messages that are not a list of
``{"role": "system"|"user"|"assistant", "content": "..."}``, content given as a list of parts,
and the options gptforge does not have (tools, logprobs, response formats other than text).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from gptforge.serve.protocol import (
    EXPECTED,
    ApiError,
    ModelInfo,
    Plan,
    StreamOptions,
    _need,
    request_sampling,
)
from gptforge.tokenizer import Tokenizer, message_problem, prompt_ids

EXAMPLE = '{"messages": [{"role": "user", "content": "Hello!"}]}'


class ChatRequest(BaseModel):
    """The body of POST /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid", strict=True)
    messages: list[Any]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


CHAT_EXPECTED = {
    **{k: v for k, v in EXPECTED.items() if k in ChatRequest.model_fields},
    "messages": "a non-empty list of {\"role\": \"system\"|\"user\"|\"assistant\", \"content\": "
                "\"...\"} objects",
    "max_completion_tokens": EXPECTED["max_tokens"],
    "logprobs": "false or null (logprobs are not supported)",
    "top_logprobs": "null (logprobs are not supported)",
    "response_format": '{"type": "text"} or null (only text is supported)',
}


def parse_chat(obj: dict[str, Any]) -> ChatRequest:
    from gptforge.serve.protocol import parse_request

    return parse_request(obj, ChatRequest, CHAT_EXPECTED, EXAMPLE)


def check_chat(req: ChatRequest, info: ModelInfo, tok: Tokenizer, max_batch: int) -> Plan:
    """Ranges, the model name, the messages and the context; raises ApiError."""
    if req.model is not None and req.model != info.name:
        raise ApiError(404, f"the model {req.model!r} does not exist here: this server serves "
                            f"{info.name!r} (GET /v1/models)", param="model", code="model_not_found")
    problem = message_problem(req.messages, need_assistant=False)
    if problem is not None:
        raise ApiError(400, f"messages: {problem}; send a list such as {EXAMPLE[13:-1]}",
                       param="messages")
    try:
        ids = prompt_ids(tok, req.messages)
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") in the JSON
        raise ApiError(400, f"messages hold {e.object[e.start:e.end]!r}, which is not a "
                            "character: send valid Unicode", param="messages") from None
    room = info.context_length - len(ids)
    if room < 1:
        raise ApiError(400, f"the messages take {len(ids):,} tokens, which fill the model's context "
                            f"of {info.context_length:,}: send fewer or shorter messages",
                       param="messages", code="context_length_exceeded")
    given = [v for v in (req.max_completion_tokens, req.max_tokens) if v is not None]
    n = 1 if req.n is None else req.n
    _need(n >= 1, "n", n, CHAT_EXPECTED)
    for name in ("presence_penalty", "frequency_penalty"):
        _need(getattr(req, name) in (None, 0), name, getattr(req, name), CHAT_EXPECTED)
    _need(not req.logit_bias, "logit_bias", req.logit_bias, CHAT_EXPECTED)
    _need(not req.logprobs, "logprobs", req.logprobs, CHAT_EXPECTED)
    _need(req.top_logprobs is None, "top_logprobs", req.top_logprobs, CHAT_EXPECTED)
    _need(req.response_format in (None, {"type": "text"}), "response_format", req.response_format,
          CHAT_EXPECTED)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    params = request_sampling(req.model_copy(update={"max_tokens": given[0] if given else None}),
                              room, stops)
    if n > max_batch:
        raise ApiError(400, f"n={n} is more replies than this server decodes at once "
                            f"(--max-batch {max_batch}): ask for fewer", param="n")
    if len(ids) + params.max_tokens > info.context_length:
        raise ApiError(400, f"the messages take {len(ids):,} tokens and max_tokens is "
                            f"{params.max_tokens:,}: more than the model's context of "
                            f"{info.context_length:,}; lower max_tokens or send less",
                       param="max_tokens", code="context_length_exceeded")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Plan([""], [ids], n, params, bool(req.stream), include_usage, False)


# -- answers ------------------------------------------------------------------------------------


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish_reason}


def delta_choice(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def chat_completion(cid: str, created: int, model: str, choices: list[dict[str, Any]],
                    use: dict[str, int] | None, chunk: bool = False) -> dict[str, Any]:
    """A whole answer, or one streamed chunk (``chunk``: choices carry deltas)."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk" if chunk else
                            "chat.completion", "created": created, "model": model,
                            "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


__all__ = ["ChatRequest", "chat_choice", "chat_completion", "check_chat", "delta_choice",
           "parse_chat"]
