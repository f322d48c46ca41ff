"""One model session, one generation thread, a bounded FIFO in front of it.

A small board has one model's worth of memory and cores, so requests run one at a time; running them in
order on a single thread also lets the runtime's prefix reuse serve a client that sends its conversation
again with one more turn. HTTP threads only enqueue and read events; a job they cancel (client gone,
shutdown) leaves the queue at once or stops at the next token.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgeQwenError, ProviderError
from .protocol import APIError, GenRequest

log = logging.getLogger("edgeqwen.serve")


@dataclass
class Job:
    request: GenRequest
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)  # ("piece", str) … ("done", …)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)


class Metrics:
    """Counters for /metrics (Prometheus text format), updated under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> n
        self.errors: collections.Counter = collections.Counter()  # error type -> n
        self.prompt_tokens = self.generated_tokens = self.cancelled = 0
        self.lookup_drafted = self.lookup_accepted = 0
        self.generation_seconds = 0.0
        self.last_decode_tps = 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def generation(self, prompt_tokens: int, new_tokens: int, seconds: float, decode_tps: float,
                   lookup_drafted: int = 0, lookup_accepted: int = 0) -> None:
        with self._lock:
            self.lookup_drafted += lookup_drafted
            self.lookup_accepted += lookup_accepted
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += new_tokens
            self.generation_seconds += seconds
            if decode_tps > 0:
                self.last_decode_tps = decode_tps

    def render(self, queue_depth: int, running: int) -> str:
        with self._lock:
            lines = [
                "# HELP edgeqwen_requests_total HTTP requests answered, by endpoint and status code.",
                "# TYPE edgeqwen_requests_total counter",
                *(f'edgeqwen_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())),
                "# HELP edgeqwen_errors_total Requests answered with an error, by OpenAI error type.",
                "# TYPE edgeqwen_errors_total counter",
                *(f'edgeqwen_errors_total{{type="{k}"}} {n}' for k, n in sorted(self.errors.items())),
                "# HELP edgeqwen_prompt_tokens_total Prompt tokens of generations run.",
                "# TYPE edgeqwen_prompt_tokens_total counter",
                f"edgeqwen_prompt_tokens_total {self.prompt_tokens}",
                "# HELP edgeqwen_generated_tokens_total Tokens generated.",
                "# TYPE edgeqwen_generated_tokens_total counter",
                f"edgeqwen_generated_tokens_total {self.generated_tokens}",
                "# HELP edgeqwen_generation_seconds_total Wall time spent generating (prefill + decode).",
                "# TYPE edgeqwen_generation_seconds_total counter",
                f"edgeqwen_generation_seconds_total {self.generation_seconds:.3f}",
                "# HELP edgeqwen_decode_tokens_per_second Decode speed of the last finished generation.",
                "# TYPE edgeqwen_decode_tokens_per_second gauge",
                f"edgeqwen_decode_tokens_per_second {self.last_decode_tps:.2f}",
                "# HELP edgeqwen_lookup_drafted_tokens_total Tokens drafted by prompt lookup and checked.",
                "# TYPE edgeqwen_lookup_drafted_tokens_total counter",
                f"edgeqwen_lookup_drafted_tokens_total {self.lookup_drafted}",
                "# HELP edgeqwen_lookup_accepted_tokens_total Drafted tokens the model agreed with (steps saved).",
                "# TYPE edgeqwen_lookup_accepted_tokens_total counter",
                f"edgeqwen_lookup_accepted_tokens_total {self.lookup_accepted}",
                "# HELP edgeqwen_cancelled_total Generations cancelled (client gone or shutdown).",
                "# TYPE edgeqwen_cancelled_total counter",
                f"edgeqwen_cancelled_total {self.cancelled}",
                "# HELP edgeqwen_queue_depth Requests waiting for the model.",
                "# TYPE edgeqwen_queue_depth gauge",
                f"edgeqwen_queue_depth {queue_depth}",
                "# HELP edgeqwen_running Requests being generated now (0 or 1).",
                "# TYPE edgeqwen_running gauge",
                f"edgeqwen_running {running}",
            ]
        return "\n".join(lines) + "\n"


class Scheduler:
    """FIFO of jobs in front of one ``runtime.Model``; ``max_queue`` jobs may wait besides the running one."""

    def __init__(self, model: Any, *, max_queue: int, metrics: Metrics | None = None):
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.model, self.max_queue = model, max_queue
        self.metrics = metrics or Metrics()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._closed = False
        self._avg_seconds = 2.0  # recent job duration, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="edgeqwen-generate", daemon=True)
        self._thread.start()

    # -- called from HTTP threads ------------------------------------------------------------------------
    def submit(self, request: GenRequest) -> Job:
        with self._cond:
            if self._closed:
                raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                wait = max(1, round(self._avg_seconds * (len(self._waiting) + 1)))
                raise APIError(429, f"The server is busy: {len(self._waiting)} requests are waiting "
                                    f"(--max-queue {self.max_queue}). Retry in about {wait} s.",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": str(wait)})
            job = Job(request)
            self._waiting.append(job)
            self._cond.notify_all()
            return job

    def cancel(self, job: Job) -> None:
        """Drop a waiting job now; a running one stops before its next token."""
        with self._cond:
            if job.cancelled.is_set():
                return
            job.cancelled.set()
            if job in self._waiting:
                self._waiting.remove(job)
                job.events.put(("cancelled", None))
            self.metrics.cancel()
            self._cond.notify_all()

    def depth(self) -> tuple[int, int]:
        with self._cond:
            return len(self._waiting), int(self._running is not None)

    def close(self, timeout: float) -> bool:
        """Stop taking jobs, let the queued and running ones finish for up to ``timeout`` s, cancel the rest.
        True when everything finished in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while (self._waiting or self._running) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            clean = not self._waiting and self._running is None
            for job in list(self._waiting) + ([self._running] if self._running else []):
                job.cancelled.set()
                job.events.put(("error", APIError(503, "The server shut down before this request finished.",
                                                  type="server_error", code="shutting_down")))
            self._waiting.clear()
            self._cond.notify_all()
        self._thread.join(timeout=5)
        return clean

    # -- the generation thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return  # closed and drained
                job = self._running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _run(self, job: Job) -> None:
        req, started = job.request, time.monotonic()
        self.model.last_result = None
        pieces = self.model.stream(req.prompt, **req.options)
        try:
            for piece in pieces:
                if job.cancelled.is_set():
                    break
                job.events.put(("piece", piece))
        except ProviderError as e:  # onnxruntime failed mid-run (e.g. out of memory): the server's fault
            log.error("generation failed: %s", e)
            job.events.put(("error", APIError(500, str(e), type="server_error", code=type(e).__name__)))
            return
        except EdgeQwenError as e:  # validated requests should not get here; report, keep serving
            log.warning("generation failed: %s", e)
            job.events.put(("error", APIError(400, str(e), code=type(e).__name__)))
            return
        except Exception as e:
            log.exception("generation crashed")
            job.events.put(("error", APIError(500, f"Generation failed: {type(e).__name__}: {e}",
                                              type="server_error")))
            return
        finally:
            pieces.close()  # a cancelled stream stops here; the KV cache keeps what was computed
        result = self.model.last_result
        seconds = time.monotonic() - started
        self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * seconds
        if job.cancelled.is_set() or result is None:
            job.events.put(("cancelled", None))
            return
        stats = result.stats
        self.metrics.generation(req.prompt_tokens, len(result.tokens), seconds,
                                float(stats.get("decode_tokens_per_s", 0.0)), int(stats.get("lookup_drafted", 0)),
                                int(stats.get("lookup_accepted", 0)))
        job.events.put(("done", result))
