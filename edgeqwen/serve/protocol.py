"""The OpenAI wire format: request validation, response objects, and streamed deltas.

Everything here is pure (no sockets, no model session) so the rules a client can break are testable one by
one. A request becomes a ``GenRequest``: the prompt already rendered and counted, the runtime options
already checked, so the single generation thread never sees bad input.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from ..runtime.chat import DeltaSplitter, ToolCall

# OpenAI's documented limits where the runtime has none of its own.
MAX_STOP_STRINGS = 4
TEMPERATURE_RANGE = (0.0, 2.0)


class APIError(Exception):
    """An error the client caused (or a state it hit), answered as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Limits:
    """What the server accepts; set from ``edgeqwen serve`` flags."""

    model_name: str
    context: int
    max_tokens: int = 512  # default and ceiling for max_tokens
    max_prompt_tokens: int | None = None


@dataclass
class GenRequest:
    """A validated request, ready for the generation thread."""

    kind: str  # "chat" | "completion"
    model: str
    prompt: str  # rendered text (chat template applied), fed to the runtime as a raw prompt
    prompt_tokens: int
    options: dict  # Model.stream options: max_new_tokens, sampling, stop
    stream: bool = False
    include_usage: bool = False
    tools: bool = False  # parse <tool_call> blocks out of the reply
    prefix: str = ""  # assistant text forced into the prompt (tool_choice), part of the reply
    thinking_open: bool = False  # the prompt ends inside <think>: the reply starts as reasoning
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


# ------------------------------------------------------------------------------------------ field checks


def _number(body: dict, name: str, lo: float | None, hi: float | None, *, lo_open: bool = False,
            integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else Real) or not math.isfinite(value):
        raise bad(name, f"'{name}' must be {kind}, got {json.dumps(value)[:40]}.", "invalid_type")
    low_ok = lo is None or (value > lo if lo_open else value >= lo)
    if not low_ok or (hi is not None and value > hi):
        bounds = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise bad(name, f"'{name}' must be in {bounds}, got {value}.", "out_of_range")
    return value


def _sampling(body: dict) -> dict:
    """OpenAI's sampling fields plus the extras vLLM and llama.cpp's server accept (top_k, min_p,
    repetition_penalty). Unset fields fall back to the bundle's generation_config, as `edgeqwen run` does."""
    opts = {
        "temperature": _number(body, "temperature", *TEMPERATURE_RANGE),
        "top_p": _number(body, "top_p", 0.0, 1.0, lo_open=True),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0),
        "seed": _number(body, "seed", 0, None, integer=True),
        "top_k": _number(body, "top_k", 0, None, integer=True),
        "min_p": _number(body, "min_p", 0.0, 0.999999),
        "repetition_penalty": _number(body, "repetition_penalty", 0.0, None, lo_open=True),
    }
    return {k: v for k, v in opts.items() if v is not None}


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "'stop' must be a non-empty string or a list of them.", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}.", "out_of_range")
    return stops


def _unsupported(body: dict) -> None:
    """Refuse, by name, features that would otherwise be silently ignored and give a wrong answer."""
    if body.get("n") not in (None, 1):
        raise bad("n", "Only n=1 is supported (one generation session per server).", "unsupported")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise bad("logprobs", "logprobs are not supported by this server.", "unsupported")
    if body.get("logit_bias"):
        raise bad("logit_bias", "logit_bias is not supported by this server.", "unsupported")
    if body.get("echo"):
        raise bad("echo", "echo is not supported by this server.", "unsupported")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of", "Only best_of=1 is supported.", "unsupported")
    if body.get("suffix"):
        raise bad("suffix", "suffix (fill-in-the-middle) is not supported.", "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("response_format", "Only response_format {'type': 'text'} is supported (no JSON mode).",
                  "unsupported")


def _common(body: Any, limits: Limits) -> tuple[str, bool, bool]:
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}.")
    model = body.get("model", limits.model_name)
    if not isinstance(model, str):
        raise bad("model", "'model' must be a string.", "invalid_type")
    if model != limits.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{limits.model_name}'.",
                       param="model", code="model_not_found")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "'stream' must be true or false.", "invalid_type")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad("stream_options", "'stream_options' must be an object.", "invalid_type")
    _unsupported(body)
    return model, stream, bool(stream_options.get("include_usage"))


def _max_tokens(body: dict, prompt_tokens: int, limits: Limits) -> int:
    names = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    name = names[0] if names else "max_tokens"
    asked = _number(body, name, 1, limits.max_tokens, integer=True)
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        raise bad("messages", f"The prompt has {prompt_tokens} tokens; this server accepts at most "
                              f"{limits.max_prompt_tokens} (--max-prompt-tokens).", "prompt_too_long")
    room = limits.context - prompt_tokens
    if asked is None:
        if room < 1:
            raise bad("messages", f"The prompt has {prompt_tokens} tokens, which fills the context of "
                                  f"{limits.context}; shorten it.", "context_length_exceeded")
        return min(limits.max_tokens, room)
    if asked > room:
        raise bad(name, f"The prompt ({prompt_tokens} tokens) + {name} ({asked}) exceeds the context "
                        f"({limits.context} tokens); shorten the prompt or lower {name}.", "context_length_exceeded")
    return asked


# ------------------------------------------------------------------------------------------ chat requests


def _text_content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(where, f"{where}: only text content parts are supported, got {kind!r}.", "unsupported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(where, f"{where} must be a string or a list of text parts.", "invalid_type")


def _tool_calls_for_template(calls: Any, where: str) -> list[dict]:
    """OpenAI sends arguments as a JSON string; Qwen's template writes them with tojson, so decode them."""
    if not isinstance(calls, list):
        raise bad(where, f"{where} must be a list.", "invalid_type")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(where, f"{where}[{j}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}.",
                      "invalid_type")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise bad(where, f"{where}[{j}].function.arguments is not valid JSON ({e.msg}).",
                          "invalid_value") from e
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects.", "invalid_type")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad("messages", f"{where} must be an object.", "invalid_type")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant", "tool"):
            raise bad("messages", f"{where}.role must be system, developer, user, assistant or tool; got "
                                  f"{json.dumps(role)[:40]}.", "invalid_value")
        msg: dict[str, Any] = {"role": role, "content": _text_content(m.get("content"), f"{where}.content")}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls_for_template(m["tool_calls"], f"{where}.tool_calls")
        elif msg["content"] is None:
            raise bad("messages", f"{where}.content is missing.", "invalid_value")
        if role == "tool" and isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _tools(body: dict) -> tuple[list[dict] | None, str]:
    """(tools for the template, forced assistant prefix) from tools + tool_choice."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if tools is None:
        if choice not in ("auto", "none", None):
            raise bad("tool_choice", "tool_choice needs 'tools'.", "invalid_value")
        return None, ""
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise bad("tools", "'tools' must be a list of {'type': 'function', 'function': {'name', 'description', "
                           "'parameters'}}.", "invalid_type")
    names = [t["function"]["name"] for t in tools]
    if choice in ("auto", None):
        return tools, ""
    if choice == "none":
        return None, ""
    # The Qwen template's tool-call form is "<tool_call>\n{json}\n</tool_call>": starting the reply with it
    # makes the model call a tool (required) or a given one (named), without a grammar engine. The opening
    # goes up to the name's quote: after a bare "<tool_call>\n" Qwen2.5-Coder-0.5B ends its turn at once.
    if choice == "required":
        return tools, '<tool_call>\n{"name": "'
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise bad("tool_choice", f"tool_choice names {json.dumps(name)}, which is not in tools "
                                     f"({', '.join(names)}).", "invalid_value")
        return [t for t in tools if t["function"]["name"] == name], \
            '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments": '
    raise bad("tool_choice", "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                             "'function': {'name': ...}}.", "invalid_value")


def _thinking(body: dict) -> bool | None:
    """Qwen3's switch: top-level ``enable_thinking`` or vLLM's ``chat_template_kwargs.enable_thinking``."""
    kwargs = body.get("chat_template_kwargs") or {}
    value = body.get("enable_thinking", kwargs.get("enable_thinking") if isinstance(kwargs, dict) else None)
    if value is not None and not isinstance(value, bool):
        raise bad("enable_thinking", "'enable_thinking' must be true or false.", "invalid_type")
    return value


def chat_request(body: Any, limits: Limits, render: Callable[..., str], count: Callable[[str], int]) -> GenRequest:
    """Validate a /v1/chat/completions body. ``render(messages, tools=, enable_thinking=)`` applies the chat
    template; ``count(text)`` tokenizes."""
    model, stream, include_usage = _common(body, limits)
    messages = _messages(body.get("messages"))
    tools, prefix = _tools(body)
    options = _sampling(body)
    stops = _stop(body)
    try:
        prompt = render(messages, tools=tools, enable_thinking=_thinking(body)) + prefix
    except Exception as e:  # the template's own checks (GenerationError), reported as the client's error
        raise bad("messages", f"The chat template refused the messages: {e}", "invalid_value") from e
    n = count(prompt)
    options["max_new_tokens"] = _max_tokens(body, n, limits)
    if stops:
        options["stop"] = stops
    open_think = prompt.rstrip().endswith("<think>")
    return GenRequest("chat", model, prompt, n, options, stream, include_usage, tools=tools is not None,
                      prefix=prefix, thinking_open=open_think)


def completion_request(body: Any, limits: Limits, count: Callable[[str], int]) -> GenRequest:
    model, stream, include_usage = _common(body, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt", "'prompt' must be a non-empty string (batches of prompts are not supported).",
                  "invalid_type")
    options = _sampling(body)
    stops = _stop(body)
    n = count(prompt)
    options["max_new_tokens"] = _max_tokens(body, n, limits)
    if stops:
        options["stop"] = stops
    return GenRequest("completion", model, prompt, n, options, stream, include_usage,
                      id="cmpl-" + secrets.token_hex(12))


# ------------------------------------------------------------------------------------------ replies


def reply_splitter(req: GenRequest) -> tuple[DeltaSplitter | None, list[tuple[str, str]]]:
    """The splitter a chat reply goes through (None for raw completions), with the deltas of the assistant
    text the request forced into the prompt (tool_choice), which belong to the reply."""
    if req.kind != "chat":
        return None, []
    splitter = DeltaSplitter(tools=req.tools, thinking_open=req.thinking_open)
    return splitter, splitter.feed(req.prefix) if req.prefix else []


def cached_tokens(result: Any) -> int:
    """Prompt tokens the runtime's KV cache already held (OpenAI's usage.prompt_tokens_details.cached_tokens)."""
    return int(result.stats.get("reused_tokens", 0))


def tool_call_json(call: ToolCall, index: int | None = None) -> dict:
    out = {"id": call.id, "type": "function",
           "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return out if index is None else {"index": index, **out}


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    """OpenAI's usage block; ``cached_tokens`` is the prompt prefix the runtime's KV cache already held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def chat_response(req: GenRequest, content: str, reasoning: str, calls: list[ToolCall], finish: str,
                  completion_tokens: int, cached: int = 0) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [tool_call_json(c) for c in calls]
    return {"id": req.id, "object": "chat.completion", "created": req.created, "model": req.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else finish,
                         "logprobs": None}],
            "usage": usage(req.prompt_tokens, completion_tokens, cached)}


def chat_chunk(req: GenRequest, delta: dict, finish: str | None = None) -> dict:
    return {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": req.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_response(req: GenRequest, text: str, finish: str | None, completion_tokens: int | None,
                        cached: int = 0) -> dict:
    out = {"id": req.id, "object": "text_completion", "created": req.created, "model": req.model,
           "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
    if completion_tokens is not None:
        out["usage"] = usage(req.prompt_tokens, completion_tokens, cached)
    return out


def usage_chunk(req: GenRequest, completion_tokens: int, cached: int = 0) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": [],
            "usage": usage(req.prompt_tokens, completion_tokens, cached)}
