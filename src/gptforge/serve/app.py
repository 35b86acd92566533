"""The HTTP side: FastAPI routes, server-sent events, the body limit, and one error shape.

Every error, the framework's own 404 and 405 included, is an OpenAI-style JSON body
(``{"error": {"message", "type", "param", "code"}}``); a body over the limit is 413. The body
is parsed here rather than by FastAPI so that a client that forgets ``Content-Type:
application/json`` (curl -d does) is still understood, and so that each mistake gets a message
naming the field (protocol.py).

Chat completions (serve/chat.py) run as jobs of the same engine and differ only in the shapes
of their answers. With an API key (``serve --api-key``, or ``GPTFORGE_API_KEY``) every route but
the page and ``/health`` wants ``Authorization: Bearer KEY``: a request without it, or with
another key, gets 401 in OpenAI's error shape; the key is compared in constant time
(``hmac.compare_digest``), so the time of a refusal says nothing about how much of a guess was
right.

A request becomes an engine ``Job`` whose events cross from the engine's thread into this event
loop through ``call_soon_threadsafe``, all those waiting at one wake-up (``_Outbox``). While a
request runs, a watcher reads the connection: a client that goes away (closed tab, Ctrl-C,
timeout) cancels its job, which frees its rows at the engine's next step, whether it was
streaming or waiting for a whole answer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

import gptforge.serve.chat as chat
import gptforge.serve.protocol as protocol
from gptforge.serve.engine import Abort, End, Engine, Event, Job, Overloaded, Text
from gptforge.serve.protocol import ApiError, ModelInfo, Plan
from gptforge.tokenizer import Tokenizer

DISCONNECTED = object()  # put in a job's queue when its client goes away


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 when it is over ``limit`` bytes. An over-long body is still read (and
    dropped) up to 16 times the limit, so that a client busy sending it gets the 413 rather than a
    reset connection; beyond that, or when its declared length is beyond that, the answer is at
    once."""
    too_large = ApiError(413, f"the request body is larger than this server's limit of "
                              f"{limit:,} bytes (--max-body-bytes)", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 16 * limit:
        raise too_large
    body, size = bytearray(), 0
    async for part in request.stream():
        size += len(part)
        if size <= limit:
            body += part
        elif size > 16 * limit:
            break
    if size > limit:
        raise too_large
    return bytes(body)


class _Outbox:
    """Events from the engine's thread into the event loop, as many as are waiting per wake-up.

    A decode step ends with one event per row; handing each over with its own
    ``call_soon_threadsafe`` woke the loop (a write to its self-pipe, and the GIL taken back and
    forth) 16 times a step for 16 rows. Here the first event of a batch schedules one delivery,
    and the events that come before it runs ride along with it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []

    def put(self, queue: asyncio.Queue[Any], event: Any) -> None:  # engine thread
        with self._lock:
            self._items.append((queue, event))
            if len(self._items) > 1:
                return  # a delivery is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the server has gone
            pass

    def _deliver(self) -> None:  # event loop
        with self._lock:
            items, self._items = self._items, []
        for queue, event in items:
            queue.put_nowait(event)


class _Bridge:
    """One job's events, carried from the engine's thread into this event loop."""

    def __init__(self, outbox: _Outbox) -> None:
        self.outbox = outbox
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def emit(self, event: Event) -> None:  # engine thread
        self.outbox.put(self.queue, event)

    async def watch(self, receive: Receive) -> None:
        """Wait for the client to go away; then say so in the queue."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - a connection that fails to read has gone too
            pass
        self.queue.put_nowait(DISCONNECTED)


class EventStream(StreamingResponse):
    """Server-sent events, with a hook run however the stream ends (done, error, client gone)."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send
            pass
        finally:
            self.on_close()


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


OPEN_PATHS = ("/", "/health")  # what answers without the API key: the page asks for it


def authorized(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries ``Bearer KEY``, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _guard(app: FastAPI, api_key: str) -> None:
    """The API key check (when one is set) and every error as an OpenAI-style JSON body."""
    if api_key:
        @app.middleware("http")
        async def check_key(request: Request, call_next: Callable[[Request], Any]) -> Any:
            if request.url.path in OPEN_PATHS or authorized(request.headers.get("authorization"),
                                                            api_key):
                return await call_next(request)
            err = ApiError(401, "Incorrect or missing API key: send the server's key as "
                                "Authorization: Bearer KEY (openai's client: api_key=KEY)",
                           code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}: the API has POST "
                        "/v1/completions, POST /v1/chat/completions, GET /v1/models and GET "
                        "/health",
                   405: f"{request.url.path} does not take {request.method}"}.get(e.status_code,
                                                                              str(e.detail))
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, e: Exception) -> JSONResponse:
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}")
        return JSONResponse(err.body(), status_code=500)


async def _answer(engine: Engine, outboxes: dict[str, Any], request: Request, plan: Plan,
                  model: str, is_chat: bool) -> Any:
    """Submit a checked request to the engine; its answer, streamed or whole. ``outboxes``
    holds the serving loop's _Outbox, made on the first request."""
    loop = asyncio.get_running_loop()
    if outboxes.get("loop") is not loop:
        outboxes.update(loop=loop, outbox=_Outbox(loop))
    bridge = _Bridge(outboxes["outbox"])
    job = Job(plan.ids, plan.n, plan.params, bridge.emit)
    try:
        engine.submit(job)
    except Overloaded as e:
        raise ApiError(503, str(e), code="overloaded", headers={"retry-after": "1"}) from None
    watcher = asyncio.create_task(bridge.watch(request.receive))

    def close() -> None:
        watcher.cancel()
        engine.cancel(job)  # nothing to do when the job is complete

    if plan.stream:
        return EventStream(_stream(bridge, plan, model, is_chat), close)
    try:
        return await _whole(bridge, plan, model, is_chat)
    finally:
        close()


def build_app(engine: Engine, info: ModelInfo, tok: Tokenizer, max_body_bytes: int,
              api_key: str = "") -> FastAPI:
    app = FastAPI(title="gptforge serve", version="1", docs_url=None, redoc_url=None)
    page = resources.files("gptforge.serve").joinpath("static/index.html").read_text("utf-8")
    outboxes: dict[str, Any] = {}  # the serving loop's _Outbox, made on the first request
    _guard(app, api_key)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = engine.stats
        return {"status": "stopping" if engine.draining else "ok", "model": info.name,
                "running": engine.running, "waiting": engine.waiting, "served": s.served,
                "cancelled": s.cancelled, "rejected": s.rejected, "aborted": s.aborted}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [protocol.model_card(info)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != info.name:
            raise ApiError(404, f"the model {model_id!r} does not exist here: this server serves "
                                f"{info.name!r}", param="model", code="model_not_found")
        return protocol.model_card(info)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        if not info.chat:
            raise ApiError(400, f"{info.name} is a base model, not a chat model: it continues "
                                "text. Use POST /v1/completions with a prompt",
                           code="unsupported_endpoint")
        req = chat.parse_chat(protocol.parse_json(await read_body(request, max_body_bytes)))
        plan = chat.check_chat(req, info, tok, engine.max_batch)
        return await _answer(engine, outboxes, request, plan, info.name, True)

    @app.post("/v1/completions", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": protocol.CompletionRequest.model_json_schema()}}}})
    async def completions(request: Request) -> Any:
        req = protocol.parse_request(protocol.parse_json(await read_body(request, max_body_bytes)))
        plan = protocol.check_request(req, info, tok, engine.max_batch)
        return await _answer(engine, outboxes, request, plan, info.name, False)

    return app


async def _whole(bridge: _Bridge, plan: Plan, model: str, is_chat: bool) -> Any:
    """Collect every choice's text; the answer, an error, or nothing if the client left."""
    rows = len(plan.ids) * plan.n
    texts = [plan.prompts[i // plan.n] if plan.echo else "" for i in range(rows)]
    reasons: list[str | None] = [None] * rows
    tokens = 0
    while any(r is None for r in reasons):
        event = await bridge.queue.get()
        if event is DISCONNECTED:
            return Response(status_code=499)  # nobody reads it; uvicorn logs it as such
        if isinstance(event, Abort):
            raise ApiError(event.status, event.message)
        if isinstance(event, Text):
            texts[event.choice] += event.text
        elif isinstance(event, End):
            reasons[event.choice] = event.reason
            tokens += event.tokens
    use = protocol.usage(plan.prompt_tokens, tokens)
    if is_chat:
        choices = [chat.chat_choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))]
        return chat.chat_completion("chatcmpl-" + protocol.new_id()[5:], protocol.now(), model,
                                    choices, use)
    choices = [protocol.choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))]
    return protocol.completion(protocol.new_id(), protocol.now(), model, choices, use)


async def _stream(bridge: _Bridge, plan: Plan, model: str, is_chat: bool) -> AsyncIterator[bytes]:
    """The events of a job as server-sent events, ending in ``data: [DONE]``. A chat stream opens
    each choice with a delta holding its role, as OpenAI's does."""
    cid, created = protocol.new_id(), protocol.now()
    if is_chat:
        cid = "chatcmpl-" + cid[5:]
    rows = len(plan.ids) * plan.n

    def chunk(index: int, text: str | None, reason: str | None) -> bytes:
        if is_chat:
            delta = {"role": "assistant", "content": ""} if text is None else (
                {"content": text} if text else {})
            return sse(chat.chat_completion(cid, created, model,
                                            [chat.delta_choice(index, delta, reason)], None, True))
        return sse(protocol.completion(cid, created, model,
                                       [protocol.choice(index, text or "", reason)], None))

    if is_chat:
        for i in range(rows):
            yield chunk(i, None, None)
    if plan.echo:
        for i in range(rows):
            yield chunk(i, plan.prompts[i // plan.n], None)
    open_rows, tokens = rows, 0
    while open_rows:
        event = await bridge.queue.get()
        if event is DISCONNECTED:
            return
        if isinstance(event, Abort):  # the openai client raises APIError on an "error" event
            yield sse(ApiError(event.status, event.message).body())
            return
        if isinstance(event, Text):
            yield chunk(event.choice, event.text, None)
        elif isinstance(event, End):
            yield chunk(event.choice, "", event.reason)
            open_rows -= 1
            tokens += event.tokens
    if plan.include_usage:
        use = protocol.usage(plan.prompt_tokens, tokens)
        yield sse(chat.chat_completion(cid, created, model, [], use, True) if is_chat else
                  protocol.completion(cid, created, model, [], use))
    yield b"data: [DONE]\n\n"
