"""The HTTP side: the standard library's threading server, OpenAI routes, auth, SSE, disconnects.

No web framework: a board installs nothing beyond the runtime, and the whole server is readable in one
sitting. Each connection gets a thread that validates its request, hands it to the ``Scheduler`` and
writes the events back; a client that goes away cancels its job.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..errors import EdgeQwenError
from . import protocol as P
from .protocol import APIError
from .scheduler import Job, Scheduler

log = logging.getLogger("edgeqwen.serve")

POLL_S = 0.1  # how often a waiting handler checks whether its client is still there


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 16
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 600.0  # one request, queue wait included


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, model: Any, limits: P.Limits, config: ServerConfig, scheduler: Scheduler | None = None):
        self.model, self.limits, self.config = model, limits, config
        super().__init__((config.host, config.port), Handler)  # binds first: a busy port starts no thread
        self.scheduler = scheduler or Scheduler(model, max_queue=config.max_queue)
        self.metrics = self.scheduler.metrics
        self.started = time.time()
        self._active = 0  # generation requests between submit and their last byte
        self._idle = threading.Condition()

    def track(self, delta: int) -> None:
        with self._idle:
            self._active += delta
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout=timeout)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    timeout = 60  # a client that stops sending mid-request does not hold a thread forever
    server_version = "edgeqwen"

    # -- plumbing -------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()  # ASCII escapes: a lone surrogate echoed from a request cannot break it
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.server.metrics.request(self._endpoint, status)

    def _send_error(self, err: APIError) -> None:
        self.server.metrics.error(err.type)
        self._send_json(err.status, err.body(), err.headers)

    def _client_gone(self) -> bool:
        """True when the peer closed its side (readable with nothing to read). Pipelined data is not a close."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _authorized(self) -> bool:
        key = self.server.config.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def _read_body(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise APIError(411, "Chunked request bodies are not supported; send Content-Length.")
        length = self.headers.get("Content-Length")
        try:
            size = int(length) if length is not None else 0
        except ValueError:
            size = -1
        if size < 0:
            self.close_connection = True
            raise APIError(400, f"Content-Length {length!r} is not a byte count.") from None
        if size > self.server.config.max_body_bytes:
            self.close_connection = True  # the body stays unread; the connection cannot be reused
            raise APIError(413, f"The request body has {size} bytes; this server accepts at most "
                                f"{self.server.config.max_body_bytes}.", code="body_too_large")
        raw = self.rfile.read(size) if size else b""
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"The request body is not valid JSON: {e}.", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "The request body nests JSON too deeply.", code="invalid_json") from None

    # -- routing ----------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._endpoint = self.path.split("?")[0]
        try:
            if self._endpoint == "/health":
                waiting, running = self.server.scheduler.depth()
                self._send_json(200, {"status": "ok", "model": self.server.limits.model_name,
                                      "queue_depth": waiting, "running": running})
                return
            if not self._authorized():
                raise APIError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                               type="authentication_error", code="invalid_api_key")
            if self._endpoint == "/v1/models":
                self._send_json(200, {"object": "list", "data": [self._model_card()]})
            elif self._endpoint == f"/v1/models/{self.server.limits.model_name}":
                self._send_json(200, self._model_card())
            elif self._endpoint == "/metrics":
                text = self.server.metrics.render(*self.server.scheduler.depth()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
                self.server.metrics.request(self._endpoint, 200)
            else:
                raise APIError(404, f"No route GET {self._endpoint}.", code="not_found")
        except APIError as e:
            self._send_error(e)

    def do_POST(self) -> None:
        self._endpoint = self.path.split("?")[0]
        try:
            if self._endpoint not in ("/v1/chat/completions", "/v1/completions"):
                self.close_connection = True
                raise APIError(404, f"No route POST {self._endpoint}.", code="not_found")
            if not self._authorized():
                self.close_connection = True
                raise APIError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                               type="authentication_error", code="invalid_api_key")
            body = self._read_body()
            model, limits = self.server.model, self.server.limits
            if self._endpoint == "/v1/chat/completions":
                req = P.chat_request(body, limits, model.render, lambda text: len(model.encode(text)))
            else:
                req = P.completion_request(body, limits, lambda text: len(model.encode(text)))
            job = self.server.scheduler.submit(req)
        except APIError as e:
            self._send_error(e)
            return
        except EdgeQwenError as e:  # e.g. text the tokenizer refuses (a lone UTF-16 surrogate)
            self._send_error(APIError(400, str(e), code=type(e).__name__))
            return
        except Exception as e:  # a bug of ours: the client still gets an answer, the log the traceback
            log.exception("request failed before generation")
            self._send_error(APIError(500, f"The request could not be prepared: {type(e).__name__}: {e}",
                                      type="server_error"))
            return
        self.server.track(+1)
        try:
            if req.stream:
                self._stream(job)
            else:
                self._complete(job)
        except OSError:  # the client left while we wrote, or stopped reading until the socket timed out
            self.server.scheduler.cancel(job)
            self.close_connection = True
        finally:
            self.server.track(-1)

    def _model_card(self) -> dict:
        return {"id": self.server.limits.model_name, "object": "model", "created": int(self.server.started),
                "owned_by": "edgeqwen"}

    # -- generation -----------------------------------------------------------------------------------------
    def _events(self, job: Job):
        """Yield the job's events; cancel it if the client disconnects or the request times out."""
        deadline = time.monotonic() + self.server.config.request_timeout_s
        next_check = time.monotonic() + POLL_S
        while True:
            try:
                kind, value = job.events.get(timeout=POLL_S)
            except queue.Empty:
                kind = None
            # checked on a timer, not only when the queue is idle: tokens arriving faster than POLL_S (or
            # held back by the reply splitter) must not hide a client that left
            if kind is None or time.monotonic() >= next_check:
                next_check = time.monotonic() + POLL_S
                if self._client_gone():
                    self.server.scheduler.cancel(job)
                    raise ConnectionResetError("client disconnected") from None
                if time.monotonic() > deadline:
                    self.server.scheduler.cancel(job)
                    raise APIError(504, "The request did not finish within the server's timeout.",
                                   type="server_error", code="timeout") from None
            if kind is None:
                continue
            yield kind, value
            if kind in ("done", "error", "cancelled"):
                return

    def _complete(self, job: Job) -> None:
        req = job.request
        splitter, first = P.reply_splitter(req)
        parts: dict[str, list[str]] = {"content": [], "reasoning": []}
        for kind, text in first:
            parts[kind].append(text)
        try:
            for kind, value in self._events(job):
                if kind == "piece":
                    if splitter is None:
                        parts["content"].append(value)
                    else:
                        for k, text in splitter.feed(value):
                            parts[k].append(text)
                elif kind == "error":
                    raise value
                elif kind == "cancelled":
                    raise APIError(503, "The request was cancelled.", type="server_error", code="cancelled")
                else:
                    result = value
        except APIError as e:
            self._send_error(e)
            return
        cached = P.cached_tokens(result)
        if splitter is None:
            body = P.completion_response(req, "".join(parts["content"]), result.finish_reason, len(result.tokens),
                                         cached)
        else:
            for k, text in splitter.finish():
                parts[k].append(text)
            body = P.chat_response(req, "".join(parts["content"]).strip(), "".join(parts["reasoning"]).strip(),
                                   splitter.tool_calls, result.finish_reason, len(result.tokens), cached)
        self._send_json(200, body)

    def _sse(self, obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _stream(self, job: Job) -> None:
        req = job.request
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # SSE ends with the connection (no length, no chunking)
        self.end_headers()
        self.close_connection = True
        self.server.metrics.request(self._endpoint, 200)
        splitter, first = P.reply_splitter(req)
        chat = splitter is not None
        key = {"content": "content", "reasoning": "reasoning_content"}

        def send(kind: str, text: str) -> None:
            if chat:
                self._sse(P.chat_chunk(req, {key[kind]: text}))
            else:
                self._sse(P.completion_response(req, text, None, None))

        if chat:
            self._sse(P.chat_chunk(req, {"role": "assistant", "content": ""}))
        for kind, text in first:
            send(kind, text)
        result = None
        try:
            for kind, value in self._events(job):
                if kind == "piece":
                    for k, text in (splitter.feed(value) if chat else [("content", value)]):
                        send(k, text)
                elif kind == "done":
                    result = value
                else:
                    err = value if kind == "error" else APIError(503, "The request was cancelled.",
                                                                  type="server_error", code="cancelled")
                    self._sse(err.body())
                    self.server.metrics.error(err.type)
                    return
        except APIError as e:  # timeout
            self._sse(e.body())
            self.server.metrics.error(e.type)
            return
        finish = result.finish_reason
        if chat:
            for k, text in splitter.finish():
                send(k, text)
            if splitter.tool_calls:
                calls = [P.tool_call_json(c, i) for i, c in enumerate(splitter.tool_calls)]
                self._sse(P.chat_chunk(req, {"tool_calls": calls}))
                finish = "tool_calls"
            self._sse(P.chat_chunk(req, {}, finish))
        else:
            self._sse(P.completion_response(req, "", finish, None))
        if req.include_usage:
            self._sse(P.usage_chunk(req, len(result.tokens), P.cached_tokens(result)))
        self._sse("[DONE]")
