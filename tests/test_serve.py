"""`edgeqwen serve`: the official openai client against a server on a tiny bundle, plus scripted fake models
for what a random tiny model cannot show on demand (tool calls, thinking, a slow or blocked generation)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")

from edgeqwen import runtime
from edgeqwen.runtime import Result
from edgeqwen.serve import start, stop
from edgeqwen.serve.protocol import DeltaSplitter

MSG = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def bundle(fp32_bundles) -> Path:
    return fp32_bundles["qwen2_tied"]


@pytest.fixture(scope="module")
def model(bundle):
    return runtime.load(bundle)


@pytest.fixture(scope="module")
def server(model):
    srv = start(model, port=0, max_queue=16, max_tokens=64, max_prompt_tokens=200, max_body_bytes=20_000)
    yield srv
    stop(srv, timeout=5)


def client(srv, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def reference(model, prompt: str, n: int) -> str:
    """What the runtime itself answers, greedy (the server must not change a token)."""
    return model.generate(prompt, temperature=0, max_new_tokens=n).text


def post(srv, path: str, body: bytes | str, headers: dict | None = None) -> tuple[int, dict, dict]:
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data) if data else {}


# ------------------------------------------------------------------------------- the real runtime, tiny model


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == [server.limits.model_name]
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"


def test_chat_greedy_equals_the_runtime_streamed_or_not(server, model):
    expected = reference(model, model.render(MSG), 24).strip()
    c = client(server)
    name = server.limits.model_name
    r = c.chat.completions.create(model=name, messages=MSG, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(model.encode(model.render(MSG)))
    assert 1 <= r.usage.completion_tokens <= 24
    chunks = list(c.chat.completions.create(model=name, messages=MSG, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed.strip() == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_a_growing_conversation_reuses_the_cached_prefix(server, model):
    c, name = client(server), server.limits.model_name
    first = c.chat.completions.create(model=name, messages=MSG, max_tokens=6, temperature=0)
    longer = MSG + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Another one, about rivers."}]
    second = c.chat.completions.create(model=name, messages=longer, max_tokens=6, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 2 <= cached < second.usage.prompt_tokens  # shared: the first prompt
    assert second.choices[0].message.content == reference(model, model.render(longer), 6).strip()


def test_metrics_count_generated_and_prompt_lookup_tokens(server):
    """A prompt whose answer repeats it: the runtime's default prompt lookup drafts tokens, /metrics counts them."""
    looping = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(a, b):\n"

    def counters() -> dict[str, float]:
        host, port = server.server_address[:2]
        conn = http.client.HTTPConnection(host, port)
        conn.request("GET", "/metrics")
        lines = conn.getresponse().read().decode().splitlines()
        return {name: float(value) for name, value in (line.split() for line in lines
                                                       if line and not line.startswith("#") and "{" not in line)}

    before = counters()
    r = client(server).completions.create(model=server.limits.model_name, prompt=looping, max_tokens=32,
                                          temperature=0)
    after = counters()
    assert after["edgeqwen_generated_tokens_total"] - before["edgeqwen_generated_tokens_total"] == \
        r.usage.completion_tokens
    drafted = after["edgeqwen_lookup_drafted_tokens_total"] - before["edgeqwen_lookup_drafted_tokens_total"]
    accepted = after["edgeqwen_lookup_accepted_tokens_total"] - before["edgeqwen_lookup_accepted_tokens_total"]
    assert drafted > 0 and 0 < accepted <= drafted


def test_completions_endpoint_uses_the_raw_prompt(server, model):
    prompt = "def fibonacci(n):"
    r = client(server).completions.create(model=server.limits.model_name, prompt=prompt, max_tokens=16,
                                          temperature=0)
    assert r.choices[0].text == reference(model, prompt, 16)
    assert r.usage.prompt_tokens == len(model.encode(prompt))


def test_eight_concurrent_clients_get_their_single_request_answers(server, model):
    prompts = [[{"role": "user", "content": f"Question {i}: name a colour and a number."}] for i in range(8)]
    expected = [reference(model, model.render(p), 8).strip() for p in prompts]
    c = client(server)

    def run(i: int) -> list[str]:
        return [c.chat.completions.create(model=server.limits.model_name, messages=prompts[i], max_tokens=8,
                                          temperature=0).choices[0].message.content for _ in range(25)]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(run, range(8)))
    for i, got in enumerate(answers):
        assert got == [expected[i]] * 25, f"client {i}"


@pytest.mark.parametrize("body, status, param, words", [
    ("{not json", 400, None, "not valid JSON"),
    ('["a list"]', 400, None, "JSON object"),
    ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}', 404, "model", "does not exist"),
    ('{"messages": "hi"}', 400, "messages", "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', 400, "messages", "role"),
    ('{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content", "string"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}', 400, "temperature", "[0.0, 2.0]"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature", "number"),
    ('{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', 400, "top_p", "(0.0, 1.0]"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens", "[1, 64]"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}', 400, "max_tokens", "[1, 64]"),
    ('{"messages": [{"role": "user", "content": "hi"}], "seed": -1}', 400, "seed", "seed"),
    ('{"messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}', 400, "stop", "at most 4"),
    ('{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n", "n=1"),
    ('{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}', 400,
     "repetition_penalty", "must be a number, got Infinity"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature", "got NaN"),
    ('{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', 400, None, "The text is not valid Unicode"),
    ("[" * 5000, 400, None, "nests JSON too deeply"),
    ('{"messages": [{"role": "user", "content": "hi"}], "logprobs": true}', 400, "logprobs", "not supported"),
    ('{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}', 400, "tool_choice", "tools"),
    (('{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
      '{"name": "a"}}], "tool_choice": {"type": "function", "function": {"name": "b"}}}'), 400, "tool_choice",
     "not in tools"),
])
def test_bad_requests_get_openai_errors_and_the_server_lives(server, body, status, param, words):
    got, _, data = post(server, "/v1/chat/completions", body)
    assert got == status, data
    assert words in data["error"]["message"]
    assert data["error"]["param"] == param
    assert client(server).models.list().data  # still serving


def test_an_onnxruntime_failure_is_a_500_and_the_server_lives(server, model, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    def broken(*args):
        raise Fail("simulated: out of memory")

    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    monkeypatch.setattr(model.session, "run_with_iobinding", broken)
    status, _, data = post(server, "/v1/chat/completions", body)
    assert status == 500 and data["error"]["type"] == "server_error" and data["error"]["code"] == "ProviderError"
    assert "simulated: out of memory" in data["error"]["message"]
    monkeypatch.undo()
    status, _, data = post(server, "/v1/chat/completions", body)
    assert status == 200 and data["choices"][0]["message"]["content"] is not None


def test_prompt_limits_name_the_counts(server, model):
    long = [{"role": "user", "content": "many words " * 150}]
    n = len(model.encode(model.render(long)))
    got, _, data = post(server, "/v1/chat/completions", json.dumps({"messages": long}))
    assert got == 400 and data["error"]["code"] == "prompt_too_long"
    assert f"{n} tokens" in data["error"]["message"] and "at most 200" in data["error"]["message"]
    got, _, data = post(server, "/v1/completions", json.dumps({"prompt": "x " * 20_000}))
    assert got == 413 and "at most 20000" in data["error"]["message"]


def test_prompt_over_the_context_is_refused(model):
    srv = start(model, port=0, max_tokens=model.context)  # no prompt limit: the context is the limit
    try:
        got, _, data = post(srv, "/v1/completions", json.dumps({"prompt": "hello there", "max_tokens":
                                                                  model.context}))
        assert got == 400 and data["error"]["code"] == "context_length_exceeded"
        assert f"({model.context} tokens)" in data["error"]["message"]
    finally:
        stop(srv, timeout=5)


def test_busy_port_is_a_clear_error(server, model):
    from edgeqwen.errors import EdgeQwenError

    with pytest.raises(EdgeQwenError, match=r"Cannot listen on 127.0.0.1:\d+.*another --port"):
        start(model, port=server.server_address[1])


def test_api_key_is_enforced(model):
    srv = start(model, port=0, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            client(srv, "wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            client(srv, "s3cret-but-longer").chat.completions.create(model=srv.limits.model_name, messages=MSG)
        assert client(srv, "s3cret").models.list().data
        got, _, _ = post(srv, "/v1/chat/completions", json.dumps({"messages": MSG}))
        assert got == 401
    finally:
        stop(srv, timeout=5)


# ------------------------------------------------------------------------------- scripted models


class FakeModel:
    """Stands in for runtime.Model: emits scripted pieces, optionally slowly or after a gate opens."""

    context = 4096

    def __init__(self, pieces: list[str], *, delay: float = 0.0, gate: threading.Event | None = None):
        self.pieces, self.delay, self.gate = pieces, delay, gate
        self.last_result: Result | None = None
        self.prompts: list[str] = []
        self.render_kwargs: list[dict] = []
        self.rendered: list[list[dict]] = []  # the messages each request handed to the chat template
        self.emitted = 0
        self.folder, self.manifest = Path("fake"), None

    def render(self, messages, **kwargs) -> str:
        self.render_kwargs.append(kwargs)
        self.rendered.append(messages)
        return "".join(f"<{m['role']}>{m.get('content') or ''}" for m in messages) + "<assistant>"

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        self.prompts.append(prompt)
        if self.gate is not None:
            self.gate.wait(10)
        pieces = self.pieces if self.pieces else ["x"] * options["max_new_tokens"]
        for piece in pieces[: options["max_new_tokens"]]:
            time.sleep(self.delay)
            self.emitted += 1
            yield piece
        n = min(len(pieces), options["max_new_tokens"])
        self.last_result = Result(text="".join(pieces[:n]), tokens=list(range(n)),
                                  finish_reason="length" if n == options["max_new_tokens"] else "stop",
                                  stats={"decode_tokens_per_s": 10.0})


def fake_server(model: FakeModel, **kwargs):
    return start(model, port=0, model_name="fake", **kwargs)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = ["Let me check.", "\n<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}',
        "\n</tool_call>"]


def test_tool_calls_come_back_parsed_streamed_or_not():
    srv = fake_server(FakeModel(CALL))
    try:
        c = client(srv)
        r = c.chat.completions.create(model="fake", messages=MSG, tools=TOOLS)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check."
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        chunks = list(c.chat.completions.create(model="fake", messages=MSG, tools=TOOLS, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
        assert text == "Let me check." and "<tool" not in text
        assert [tc.function.name for tc in calls] == ["get_weather"]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # without tools the same text is plain content
        plain = c.chat.completions.create(model="fake", messages=MSG).choices[0]
        assert "<tool_call>" in plain.message.content and not plain.message.tool_calls
    finally:
        stop(srv, timeout=5)


def test_tool_choice_starts_the_reply_with_a_call():
    fake = FakeModel(['get_weather", "arguments": {"city": "Oslo"}}'])  # ends without </tool_call>
    srv = fake_server(fake)
    try:
        r = client(srv).chat.completions.create(model="fake", messages=MSG, tools=TOOLS, tool_choice="required")
        assert fake.prompts[-1].endswith('<assistant><tool_call>\n{"name": "')
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
        fake.pieces = ['{"city": "Rome"}}\n</tool_call>']
        named = {"type": "function", "function": {"name": "get_weather"}}
        r = client(srv).chat.completions.create(model="fake", messages=MSG, tools=TOOLS, tool_choice=named)
        assert fake.prompts[-1].endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
        fake.pieces = ["Sunny."]
        client(srv).chat.completions.create(model="fake", messages=MSG, tools=TOOLS, tool_choice="none")
        assert fake.render_kwargs[-1]["tools"] is None
    finally:
        stop(srv, timeout=5)


def test_assistant_tool_calls_and_tool_results_reach_the_template():
    fake = FakeModel(["ok"])
    srv = fake_server(fake)
    history = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    try:
        client(srv).chat.completions.create(model="fake", messages=history, tools=TOOLS)
        sent = fake.rendered[-1]
        call = sent[1]["tool_calls"][0]
        assert sent[1]["role"] == "assistant" and call["function"]["name"] == "get_weather"
        assert call["function"]["arguments"] == {"city": "Paris"}  # the JSON string decoded for the template
        assert sent[2]["role"] == "tool" and sent[2]["content"] == "18 C"
        assert "<tool>18 C" in fake.prompts[-1]
        got, _, data = post(srv, "/v1/chat/completions", json.dumps({"messages": [
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f",
                                                                                  "arguments": "{oops"}}]}]}))
        assert got == 400 and "arguments is not valid JSON" in data["error"]["message"]
    finally:
        stop(srv, timeout=5)


def test_thinking_goes_to_reasoning_content_and_the_switch_reaches_the_template():
    fake = FakeModel(["<thi", "nk>\nFirst, the sum.</th", "ink>\n\n", "It is 5."])
    srv = fake_server(fake)
    try:
        c = client(srv)
        r = c.chat.completions.create(model="fake", messages=MSG, extra_body={"enable_thinking": True})
        assert r.choices[0].message.content == "It is 5."
        assert r.choices[0].message.model_extra["reasoning_content"] == "First, the sum."
        assert fake.render_kwargs[-1]["enable_thinking"] is True
        c.chat.completions.create(model="fake", messages=MSG,
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert fake.render_kwargs[-1]["enable_thinking"] is False
    finally:
        stop(srv, timeout=5)


def test_delta_splitter_holds_markers_split_across_pieces():
    s = DeltaSplitter(tools=True)
    out = []
    for piece in ["Hi <", "think>a", "b</thi", "nk>\n\nyes <tool_", "call>{...}"]:
        out += s.feed(piece)
    out += s.finish()
    assert out == [("content", "Hi"), ("reasoning", "a"), ("reasoning", "b"), ("content", "yes"),
                   ("content", "<tool_call>{...}")]  # an unclosed call stays visible as text
    assert s.tool_calls == []
    opened = DeltaSplitter(tools=False, thinking_open=True)  # the prompt already opened <think>
    assert opened.feed("plan</think>answer") + opened.finish() == [("reasoning", "plan"), ("content", "answer")]


def test_full_queue_answers_429_with_retry_after():
    gate = threading.Event()
    srv = fake_server(FakeModel(["a"], gate=gate), max_queue=1)
    c = client(srv)
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(c.chat.completions.create, model="fake", messages=MSG)
            time.sleep(0.3)
            waiting = pool.submit(c.chat.completions.create, model="fake", messages=MSG)
            time.sleep(0.3)
            got, headers, data = post(srv, "/v1/chat/completions", json.dumps({"messages": MSG}))
            assert got == 429 and data["error"]["type"] == "rate_limit_error"
            assert int(headers["Retry-After"]) >= 1
            gate.set()
            assert running.result().choices[0].message.content == "a"
            assert waiting.result().choices[0].message.content == "a"
    finally:
        stop(srv, timeout=5)


def raw_post(srv, body: bytes, length: bytes | None = None) -> socket.socket:
    """A chat request written by hand on a socket the test controls (close it, or send a bad length)."""
    sock = socket.create_connection(srv.server_address[:2], timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + (length or str(len(body)).encode()) + b"\r\n\r\n" + body)
    return sock


def answered_at_once(srv, within: float) -> None:
    """The next request gets the generation slot (a fake model: "x" per token) within ``within`` seconds."""
    t0 = time.monotonic()
    r = client(srv).chat.completions.create(model="fake", messages=MSG, max_tokens=2)
    assert r.choices[0].message.content == "xx"
    assert time.monotonic() - t0 < within


def test_disconnect_mid_stream_cancels_and_frees_the_slot():
    fake = FakeModel([], delay=0.02)  # "x" per token until max_new_tokens: 200 tokens take 4 s
    srv = fake_server(fake, max_tokens=200)
    try:
        host, port = srv.server_address[:2]
        sock = raw_post(srv, json.dumps({"messages": MSG, "stream": True, "max_tokens": 200}).encode())
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        while reader.readline().strip():  # headers
            pass
        for _ in range(3):
            assert reader.readline().startswith(b"data: ")
            reader.readline()
        reader.close()
        sock.close()
        answered_at_once(srv, within=1.5)  # not after the abandoned 4 s stream
        assert fake.emitted < 60
        metrics = http.client.HTTPConnection(host, port)
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
        assert "edgeqwen_cancelled_total 1" in text
        assert 'edgeqwen_requests_total{endpoint="/v1/chat/completions",status="200"} 2' in text
    finally:
        stop(srv, timeout=5)


def test_disconnect_mid_answer_cancels_even_while_tokens_flow():
    """A non-streamed answer (nothing written until the end) on a model faster than the idle poll."""
    fake = FakeModel([], delay=0.01)  # 100 tok/s: the event queue is never idle for a whole poll
    srv = fake_server(fake, max_tokens=400)
    try:
        sock = raw_post(srv, json.dumps({"messages": MSG, "max_tokens": 400}).encode())
        time.sleep(0.5)
        sock.close()
        answered_at_once(srv, within=2.0)  # not after the abandoned 4 s answer
        assert fake.emitted < 150
    finally:
        stop(srv, timeout=5)


@pytest.mark.parametrize("length", ["-5", "-1", "ten"])
def test_a_bad_content_length_is_a_400(length):
    srv = fake_server(FakeModel(["hi"]))
    try:
        with raw_post(srv, b"{}", length.encode()) as sock:
            reply = sock.makefile("rb").read().decode()
        assert reply.startswith("HTTP/1.1 400") and f"Content-Length '{length}' is not a byte count" in reply
    finally:
        stop(srv, timeout=5)


def test_null_n_and_best_of_are_the_default():
    srv = fake_server(FakeModel(["hi"]))
    try:
        status, _, data = post(srv, "/v1/chat/completions", json.dumps({"messages": MSG, "n": None}))
        assert status == 200 and data["choices"][0]["message"]["content"] == "hi"
        status, _, data = post(srv, "/v1/completions", json.dumps({"prompt": "x", "best_of": None}))
        assert status == 200, data
    finally:
        stop(srv, timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_requests_then_exits_0(bundle):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeqwen.cli", "serve", str(bundle), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "EDGEQWEN_API_KEY": "k"})
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        for _ in range(100):
            try:
                name = c.models.list().data[0].id
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        stream = c.chat.completions.create(model=name, messages=MSG, max_tokens=48, temperature=0, stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert first.choices[0].delta.role == "assistant"
        assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")
        assert proc.wait(timeout=30) == 0
        assert "SIGTERM" in proc.stderr.read()
    finally:
        proc.kill()
