"""``gptforge serve``: an OpenAI-compatible completions server with continuous batching.

Parts, bottom to top: ``options`` (the CLI's options: defaults and checks), ``engine`` (the batching
engine over ``generate``'s KV cache and sampling filters), ``protocol`` (OpenAI's request and
answer shapes), ``app`` (the HTTP routes, streaming and the page), ``server`` (binding, loading,
signals). Importing this package costs nothing: FastAPI, uvicorn and torch load only in ``serve``.
"""

from gptforge.serve.options import ServeOptions, validate_options


def serve(options: ServeOptions) -> int:
    """Serve ``options.ckpt`` until SIGTERM or Ctrl-C; the exit code (0 after a clean stop)."""
    from gptforge.serve.server import run

    return run(options)


__all__ = ["ServeOptions", "serve", "validate_options"]
