"""Start-up and shutdown of ``gptforge serve``: uvicorn on a socket bound before the model loads.

Order at start-up: check the options, bind the port (a port in use fails here, in one line,
before anything is loaded), load the checkpoint (a missing or damaged one fails here, before
the port listens), warm the engine up, then listen. The socket is bound by us rather than by
uvicorn so that both failures are one line and exit code 2 instead of a logged traceback.

SIGTERM and Ctrl-C: uvicorn stops accepting connections and waits for open ones; the engine
takes no new jobs and gives those in flight ``--grace-s`` seconds to finish, then cancels the
rest (a stream ends with an error event, a waiting client gets 503). The process then exits 0.
uvicorn's own signal handling would re-raise the signal after shutting down (so the process
would end as killed by it); ``_Server`` keeps the handling and drops the re-raise. A second
Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from gptforge.errors import GptforgeError
from gptforge.rundir import CHECKPOINT_DIR, LATEST
from gptforge.serve.options import API_KEY_ENV, ServeOptions, validate_options


def _web_stack():  # noqa: ANN202 - the uvicorn module, imported only here
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise GptforgeError(f"gptforge serve needs FastAPI and uvicorn ({e.name} is missing): "
                            "pip install 'gptforge[serve]'") from None
    return uvicorn


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening; one line when that is impossible."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise GptforgeError(f"--host {host!r} is not an address to listen on ({e}): give e.g. "
                            "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    sock = socket.socket(family, kind, proto)
    # A restart right after a stop should not wait for the old connections' TIME_WAIT; this
    # does not allow two servers on one port on Linux or macOS.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise GptforgeError(f"port {port} on {host} is already in use: stop what is "
                                "listening there or choose another --port") from None
        if e.errno == errno.EACCES:
            raise GptforgeError(f"no permission to listen on port {port}: ports below 1024 "
                                "need root; choose a --port above 1023") from None
        raise GptforgeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def default_name(ckpt: str) -> str:
    """The model id: the run's directory name, with the checkpoint's when one was named."""
    p = Path(ckpt).resolve()
    if p.parent.name == CHECKPOINT_DIR and re.fullmatch(rf"step_\d+|{LATEST}|best", p.name):
        return f"{p.parent.parent.name}-{p.name}"
    return p.name or "gptforge"


def build_engine(opts: ServeOptions):  # noqa: ANN201 - an Engine (imported lazily)
    """The engine with the checkpoint's model and tokenizer; GptforgeError when unusable."""
    from gptforge.checkpoint import load_model
    from gptforge.device import pick_device
    from gptforge.serve.engine import Engine
    from gptforge.tokenizer import tokenizer_from_dict
    from gptforge.weights import prepare

    try:
        # Every checksum, not only sizes (sample's default): a server runs for long, and a
        # flipped bit in the weights would serve wrong text without a word.
        model, tok_dict = load_model(opts.ckpt, verify="sha256")
    except OSError as e:  # unreadable (permissions, I/O error) rather than damaged
        raise GptforgeError(f"cannot read {opts.ckpt}: {e.strerror or e}: check the path and "
                            "its permissions") from None
    device = pick_device(opts.device)
    model, choice = prepare(model, opts.weights_dtype, device, rows=opts.max_batch, ragged=True)  # as it serves
    engine = Engine(model, tokenizer_from_dict(tok_dict), device, opts.max_batch, opts.max_queue)
    engine.weights = choice  # what /v1/models and the start-up line say
    return engine


def model_info(engine, opts: ServeOptions):  # noqa: ANN001, ANN201 - (Engine) -> ModelInfo
    from gptforge.serve.protocol import ModelInfo
    from gptforge.tokenizer import is_chat

    model, tok = engine.model, engine.tok
    return ModelInfo(name=opts.model_name or default_name(opts.ckpt),
                     parameters=model.num_params(), context_length=model.config.block_size,
                     tokenizer=tok.name, vocab_size=tok.vocab_size, device=str(engine.device),
                     created=int(time.time()), chat=is_chat(tok),
                     weights=engine.weights.record() if engine.weights else None)


def run(opts: ServeOptions) -> int:
    """Serve until SIGTERM or Ctrl-C; 0 after a clean stop."""
    if not opts.api_key:
        opts = dataclasses.replace(opts, api_key=os.environ.get(API_KEY_ENV, ""))
    validate_options(opts)
    uvicorn = _web_stack()
    from gptforge.serve.app import build_app
    from gptforge.serve.engine import Engine

    sock = bind(opts.host, opts.port)
    try:  # loaded, warmed up and run on the engine's own thread (Engine.launch says why)
        engine = Engine.launch(lambda: build_engine(opts))
    except BaseException:
        sock.close()
        raise
    info = model_info(engine, opts)
    app = build_app(engine, info, engine.tok, opts.max_body_bytes, opts.api_key)
    config = uvicorn.Config(app, log_level="info" if opts.access_log else "warning",
                            access_log=opts.access_log, lifespan="off",
                            timeout_graceful_shutdown=opts.grace_s + 5)
    server = _server_class(uvicorn)(config, engine, opts, info)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        engine.stop()
        sock.close()
    print("gptforge serve: stopped", flush=True)
    return 130 if server.force_exit else 0


def _server_class(uvicorn):  # noqa: ANN001, ANN202 - uvicorn is imported lazily
    class _Server(uvicorn.Server):
        """uvicorn's server with gptforge's start-up line and a clean exit on a signal."""

        def __init__(self, config, engine, opts: ServeOptions, info) -> None:  # noqa: ANN001
            super().__init__(config)
            self.engine = engine
            self.opts = opts
            self.info = info
            self.loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)
            if self.started and sockets:
                self._announce(sockets[0])

        def _announce(self, sock: socket.socket) -> None:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            i, e = self.info, self.engine
            mib = e.cache_bytes() / 2**20
            print(f"gptforge serve: {i.name} ({i.parameters:,} parameters, context "
                  f"{i.context_length}, {i.tokenizer} tokenizer{', chat' if i.chat else ''}) on "
                  f"{i.device}; up to "
                  f"{e.max_batch} rows at once (KV cache {mib:,.{0 if mib >= 10 else 1}f} MiB), "
                  f"{e.max_queue} waiting", flush=True)
            if e.weights is not None:
                print(f"gptforge serve: {e.weights.line()}", flush=True)
            api = "/v1/chat/completions, /v1/completions" if i.chat else "/v1/completions"
            key = "; the API key is required" if self.opts.api_key else ""
            print(f"gptforge serve: listening on http://{shown}:{port} (page: /, API: "
                  f"{api}{key}); Ctrl-C stops", flush=True)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first and self.loop is not None:
                print(f"gptforge serve: {signal.Signals(sig).name}: stopping; requests in flight "
                      f"get {self.opts.grace_s:g} s to finish", file=sys.stderr, flush=True)
                # Not from the signal handler itself: the engine's lock may be held right here.
                self.loop.call_soon_threadsafe(self.engine.drain, self.opts.grace_s)

    return _Server
