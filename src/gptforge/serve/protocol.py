"""OpenAI's completions protocol as gptforge serves it: checking a request, shaping the answers.

It follows the completions API (``POST /v1/completions``) closely enough that the official
``openai`` client works unchanged, streaming and not. Choices worth stating:

- The sampling values, their defaults and their ranges are sampling.py's, shared with
  ``gptforge sample`` and ``gptforge chat``; where OpenAI fixes a default the server keeps it
  (``max_tokens`` 16, temperature 1, top_p 1, no seed: a random one). ``top_k`` is an extension
  (default 50; 0: off). ``temperature: 0`` is greedy decoding, as ``top_k: 1``.
- A prompt whose tokens plus ``max_tokens`` exceed the model's context is refused (400, code
  ``context_length_exceeded``), as OpenAI refuses it, rather than cropped from the left as
  ``gptforge sample`` crops: a server's caller should know the model never saw part of its text,
  and without a sliding window every row keeps its positions (see engine.py).
- An empty prompt is refused: a char-level model has nothing to start from, and one rule for
  every model is easier to rely on than one that depends on the vocabulary.
- ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logprobs``, ``best_of`` and
  ``suffix`` are accepted at their neutral values only (clients such as LangChain send them);
  any other value is refused, never silently ignored. An unknown field is refused.
- Types are strict: ``"16"`` is not a number and ``1`` is not ``true``.
- Unknown model names get 404 ``model_not_found``, as OpenAI answers them.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from gptforge.errors import GptforgeError
from gptforge.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, MAX_STOPS, RULES, Sampling
from gptforge.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
EXAMPLE = '{"prompt": "Once upon a time", "max_tokens": 32}'


class ApiError(Exception):
    """An answer with an OpenAI-style error body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions (its JSON schema is in /openapi.json)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str | list[str]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


# What each field must be, for the one-line message of a wrong type.
EXPECTED = {
    "prompt": "a non-empty string or a list of them",
    "model": "a string (GET /v1/models lists the one served)",
    "max_tokens": RULES["max_tokens"],
    "temperature": RULES["temperature"],
    "top_p": RULES["top_p"],
    "top_k": RULES["top_k"],
    "n": "an integer >= 1",
    "stream": "true or false",
    "stream_options": 'an object such as {"include_usage": true}',
    "stop": f"a non-empty string or a list of up to {MAX_STOPS} of them",
    "seed": RULES["seed"],
    "echo": "true or false",
    "user": "a string",
    "presence_penalty": "0 (penalties are not supported)",
    "frequency_penalty": "0 (penalties are not supported)",
    "logit_bias": "null or {} (logit_bias is not supported)",
    "logprobs": "null (logprobs are not supported)",
    "best_of": "null or equal to n (best_of is not supported)",
    "suffix": "null or empty (suffix is not supported)",
}


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about the model it serves (/v1/models, /health, the page)."""
    name: str
    parameters: int
    context_length: int
    tokenizer: str
    vocab_size: int
    device: str
    created: int
    chat: bool = False  # the vocabulary has ChatML's tokens: /v1/chat/completions serves it
    weights: dict[str, Any] | None = None  # the weights' dtype and why (weights.WeightsChoice.record)


@dataclass
class Plan:
    """A checked request: what to run and how to answer."""
    prompts: list[str]
    ids: list[list[int]]
    n: int
    params: Sampling
    stream: bool
    include_usage: bool
    echo: bool

    @property
    def prompt_tokens(self) -> int:
        return sum(len(i) for i in self.ids)


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN and Infinity are not JSON and are refused too."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        obj = json.loads(body, parse_constant=refuse)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}): send an object such as "
                            f"{EXAMPLE}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object such as {EXAMPLE}, "
                            f"not {type(obj).__name__}", code="invalid_json")
    return obj


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_request(obj: dict[str, Any], schema: type[BaseModel] = CompletionRequest,
                  expected: dict[str, str] | None = None, example: str = EXAMPLE) -> Any:
    """The body as ``schema`` (a completions request by default); a wrong field is one 400."""
    expected = EXPECTED if expected is None else expected
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "body"
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field {name!r}: the fields are "
                                f"{', '.join(schema.model_fields)}", param=name) from None
        if err["type"] == "missing":
            raise ApiError(400, f"{name} is required, e.g. {example}", param=name) from None
        raise ApiError(400, f"{name} must be {expected[name]}, got {_shown(obj[name])}",
                       param=name) from None


def _need(ok: bool, name: str, value: Any, expected: dict[str, str] | None = None) -> None:
    if not ok:
        what = (EXPECTED if expected is None else expected)[name]
        raise ApiError(400, f"{name} must be {what}, got {_shown(value)}", param=name)


def _encode(tok: Tokenizer, prompt: str, where: str) -> list[int]:
    try:
        return tok.encode(prompt)
    except GptforgeError as e:  # a character a char-level vocabulary lacks
        raise ApiError(400, f"{where}: {e}", param="prompt", code="unknown_character") from None
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") in the JSON
        raise ApiError(400, f"{where} holds {e.object[e.start:e.end]!r}, which is not a "
                            "character: send valid Unicode", param="prompt") from None


# A request's field for each of Sampling's.
SAMPLING_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                   "max_tokens": "max_tokens", "seed": "seed", "stops": "stop"}


def request_sampling(req: Any, max_tokens: int, stops: list[str]) -> Sampling:
    """A request's sampling values, with OpenAI's defaults where it fixes one (``max_tokens``
    as given, no seed) and gptforge's elsewhere, checked by sampling.py's rules."""
    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    params = Sampling(temperature=given(req.temperature, DEFAULT_TEMPERATURE),
                      top_k=given(req.top_k, DEFAULT_TOP_K), top_p=given(req.top_p, DEFAULT_TOP_P),
                      max_tokens=given(req.max_tokens, max_tokens), seed=req.seed,
                      stops=tuple(stops))
    found = params.problem()
    if found is not None:
        name = SAMPLING_FIELDS[found[0]]
        _need(False, name, req.stop if name == "stop" else found[1])
    return params


def check_request(req: CompletionRequest, info: ModelInfo, tok: Tokenizer,
                  max_batch: int) -> Plan:
    """Ranges, the model name, the prompts' tokens and the context; raises ApiError."""
    if req.model is not None and req.model != info.name:
        raise ApiError(404, f"the model {req.model!r} does not exist here: this server serves "
                            f"{info.name!r} (GET /v1/models)", param="model", code="model_not_found")
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    _need(bool(prompts) and all(prompts), "prompt", req.prompt)
    n = 1 if req.n is None else req.n
    _need(n >= 1, "n", n)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    params = request_sampling(req, DEFAULT_MAX_TOKENS, stops)
    max_tokens = params.max_tokens
    for name in ("presence_penalty", "frequency_penalty"):
        _need(getattr(req, name) in (None, 0), name, getattr(req, name))
    _need(not req.logit_bias, "logit_bias", req.logit_bias)
    _need(req.logprobs is None, "logprobs", req.logprobs)
    _need(req.best_of in (None, n), "best_of", req.best_of)
    _need(not req.suffix, "suffix", req.suffix)
    rows = len(prompts) * n
    if rows > max_batch:
        raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is {rows} rows, more than this "
                            f"server decodes at once (--max-batch {max_batch}): send fewer",
                       param="n")
    ids = []
    for i, prompt in enumerate(prompts):
        where = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
        ids.append(_encode(tok, prompt, where))
        if len(ids[-1]) + max_tokens > info.context_length:
            raise ApiError(
                400, f"{where} has {len(ids[-1])} tokens and max_tokens is {max_tokens}: "
                     f"{len(ids[-1]) + max_tokens} tokens, more than the model's context of "
                     f"{info.context_length}; shorten the prompt or lower max_tokens",
                param="max_tokens" if len(ids[-1]) < info.context_length else "prompt",
                code="context_length_exceeded")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Plan(prompts, ids, n, params, bool(req.stream), include_usage, bool(req.echo))


# -- answers ------------------------------------------------------------------------------------


def new_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def completion(cid: str, created: int, model: str, choices: list[dict[str, Any]],
               use: dict[str, int] | None) -> dict[str, Any]:
    """A whole answer, or (with one choice, or none and usage) one streamed chunk."""
    body: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created,
                            "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def model_card(info: ModelInfo) -> dict[str, Any]:
    """An entry of GET /v1/models; parameters, context_length and tokenizer are extensions."""
    return {"id": info.name, "object": "model", "created": info.created, "owned_by": "gptforge",
            "parameters": info.parameters, "context_length": info.context_length,
            "tokenizer": info.tokenizer, "device": info.device, "chat": info.chat,
            "weights": info.weights}
