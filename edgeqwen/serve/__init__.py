"""``edgeqwen serve``: an OpenAI-compatible HTTP server for one bundle, standard library only.

    from edgeqwen.serve import start
    server = start("bundles/coder-int4", port=0)      # background thread; server.url
    ...
    stop(server)

Routes: GET /health, /v1/models, /metrics; POST /v1/chat/completions, /v1/completions. See README
"Serving" for the fields and the error statuses.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from ..errors import EdgeQwenError
from .http import Server, ServerConfig
from .protocol import APIError, Limits
from .scheduler import Metrics, Scheduler

__all__ = ["APIError", "Limits", "Metrics", "Scheduler", "Server", "ServerConfig", "build", "serve", "start",
           "stop"]

log = logging.getLogger("edgeqwen.serve")
API_KEY_ENV = "EDGEQWEN_API_KEY"


def default_model_name(model: Any) -> str:
    """The catalog alias or hub id the bundle was exported from, else the bundle folder's name (a local
    path says nothing to a client)."""
    source = (model.manifest.source or {}) if hasattr(model, "manifest") else {}
    if source.get("kind") in ("alias", "hub") and source.get("spec"):
        return str(source["spec"])
    return Path(model.folder).name


def build(model: Any, config: ServerConfig, *, model_name: str | None = None, max_tokens: int = 512,
          max_prompt_tokens: int | None = None, scheduler: Scheduler | None = None) -> Server:
    """A bound (not yet serving) server around a loaded ``runtime.Model``."""
    limits = Limits(model_name=model_name or default_model_name(model), context=model.context,
                    max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens)
    try:
        return Server(model, limits, config, scheduler)
    except OSError as e:
        raise EdgeQwenError(f"Cannot listen on {config.host}:{config.port}: {e.strerror or e}.",
                            "pass another --port (0 picks a free one), or stop the process holding it.") from e


def _server(model: Any, kwargs: dict[str, Any]) -> Server:
    """Split keyword options between ServerConfig (socket, key, queue) and build's limits, then build."""
    keys = set(ServerConfig.__dataclass_fields__)
    config = ServerConfig(**{k: v for k, v in kwargs.items() if k in keys})
    return build(model, config, **{k: v for k, v in kwargs.items() if k not in keys})


def start(bundle: str | Path | Any, *, provider: str = "auto", threads: int | None = None,
          context: int | None = None, **kwargs: Any) -> Server:
    """Load (unless given a Model) and serve in a background thread; for tests and embedding."""
    from .. import runtime

    model = bundle if hasattr(bundle, "stream") else runtime.load(bundle, provider=provider, threads=threads,
                                                                   context=context)
    server = _server(model, kwargs)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                     name="edgeqwen-http").start()
    return server


def stop(server: Server, timeout: float = 30.0) -> bool:
    """Stop accepting, finish (or after ``timeout`` s cancel) what is queued, close the socket."""
    clean = server.scheduler.close(timeout)
    server.wait_idle(timeout=5.0)  # let the handlers write what the last jobs produced
    server.shutdown()
    server.server_close()
    return clean


def serve(bundle: str | Path, *, provider: str = "auto", threads: int | None = None, context: int | None = None,
          shutdown_timeout: float = 30.0, **kwargs: Any) -> int:
    """Run in the foreground until SIGTERM/SIGINT; exit code 0 after a graceful shutdown."""
    from .. import runtime

    model = runtime.load(bundle, provider=provider, threads=threads, context=context)
    if kwargs.get("api_key") is None and os.environ.get(API_KEY_ENV):
        kwargs["api_key"] = os.environ[API_KEY_ENV]
    server = _server(model, kwargs)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.warning("%s: finishing in-flight requests (up to %.0f s), then exiting",
                    signal.Signals(signum).name, shutdown_timeout)
        # serve_forever runs on this thread, so shutdown() must come from another one
        threading.Thread(target=stop, args=(server, shutdown_timeout), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    auth = "API key required" if server.config.api_key else "no API key"
    log.warning("serving %s as '%s' on %s (%s, queue %d, provider %s)", bundle, server.limits.model_name,
                server.url, auth, server.config.max_queue, model.provider)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    return 0
