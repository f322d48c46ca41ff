"""Chat prompts in, structured replies out.

The prompt format is whatever the model was trained on, so it comes from the bundle's own HF Jinja
chat template rather than from hand-written string code. Templates ship inside downloaded models, so
they are rendered in Jinja's immutable sandbox: a template can format text but not reach Python
internals or mutate the caller's messages.

``parse_reply`` goes the other way: it splits a Qwen reply into thinking, visible text and tool calls,
and reports malformed tool calls instead of raising, because a small model will sometimes emit broken
JSON and the caller should be able to show or retry it. ``DeltaSplitter`` does the same to a reply while
it streams (the server's deltas, the CLI's thinking shown apart from the answer).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import Collection
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from edgeqwen.errors import BundleError, GenerationError

ROLES = ("system", "user", "assistant", "tool")


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _raise_exception(message: str) -> NoReturn:
    """Templates call this to reject input they cannot format (e.g. a misplaced system message)."""
    raise GenerationError(
        f"The chat template rejected the messages: {str(message).rstrip('.')}.", "fix the message list."
    )


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """Like HF's: plain json.dumps keeping non-ASCII as is; Jinja's own tojson HTML-escapes < > & '."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox answers a forbidden attribute with an undefined value, which prints as "" and
    hides the attempt; failing loudly tells the user the template is not to be trusted."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _bad_message(index: int, problem: str) -> GenerationError:
    return GenerationError(
        f"messages[{index}] {problem}.",
        "pass a list of dicts like {'role': 'user', 'content': 'Hi'}; roles: " + ", ".join(ROLES) + ".",
    )


def validate_messages(messages: Any) -> None:
    """Check the OpenAI-style message list before it reaches the template, where errors are cryptic."""
    if not isinstance(messages, list):
        raise GenerationError(
            f"messages must be a list of dicts; got {type(messages).__name__}.",
            "pass e.g. [{'role': 'user', 'content': 'Hi'}].",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad_message(i, f"is a {type(message).__name__}, not a dict")
        role = message.get("role")
        if role not in ROLES:
            raise _bad_message(i, f"has role={role!r}; allowed: {', '.join(ROLES)}")
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                raise _bad_message(i, f"has tool_calls but role={role!r}; only assistant messages carry them")
            if not isinstance(tool_calls, list):
                raise _bad_message(i, f"has tool_calls of type {type(tool_calls).__name__}; expected a list")
            if content is None:
                continue
        if not isinstance(content, str):
            raise _bad_message(i, f"has content of type {type(content).__name__}; expected a string")


class ChatTemplate:
    """Renders the model's own chat template (a HF Jinja template) in a sandbox."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None):
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise BundleError(
                f"The chat template does not parse: {e.message} (line {e.lineno}).",
                "re-export the bundle or pass a valid Jinja chat template.",
            ) from e
        # Only tokens that exist go into the context, so `bos_token is defined` tests stay meaningful.
        tokens = {"bos_token": bos_token, "eos_token": eos_token}
        self._special = {k: v for k, v in tokens.items() if v is not None}

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for ``messages``; ``extra`` reaches the template as further variables."""
        validate_messages(messages)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise GenerationError(
                f"tools must be a list of dicts (JSON schemas); got {tools!r:.80}.",
                "pass e.g. [{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}].",
            )
        context: dict[str, Any] = {
            **self._special,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            **extra,
        }
        if enable_thinking is not None:  # Qwen3 templates test `enable_thinking is defined`
            context["enable_thinking"] = enable_thinking
        try:
            return self._template.render(**context)
        except GenerationError:
            raise
        except SecurityError as e:
            raise BundleError(
                f"The chat template tried an operation the sandbox forbids: {str(e).rstrip('.')}.",
                "use a trusted chat template; templates may only format text.",
            ) from e
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise GenerationError(
                f"The chat template failed while rendering: {type(e).__name__}: {e}.",
                "check the messages/tools against what the template expects, or fix the template.",
            ) from e


# --------------------------------------------------------------------------------------------------
# Reply parsing
# --------------------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str


@dataclass
class Reply:
    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


def _split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning, rest). Handles a closed block, an unclosed one (generation cut off while thinking),
    and a bare ``</think>`` (the template already opened ``<think>`` in the prompt)."""
    open_at = text.find(_THINK_OPEN)
    close_at = text.find(_THINK_CLOSE, open_at + len(_THINK_OPEN) if open_at >= 0 else 0)
    if open_at < 0 and close_at < 0:
        return None, text
    if open_at < 0:
        reasoning, rest = text[:close_at], text[close_at + len(_THINK_CLOSE) :]
    elif close_at < 0:
        reasoning, rest = text[open_at + len(_THINK_OPEN) :], text[:open_at]
    else:
        reasoning = text[open_at + len(_THINK_OPEN) : close_at]
        rest = text[:open_at] + text[close_at + len(_THINK_CLOSE) :]
    return reasoning.strip() or None, rest


def _tool_call(body: str) -> ToolCall:
    """Parse one tool call body; raises ValueError with a readable reason."""
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        raise ValueError('expected an object with a "name" string')
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError(f'"arguments" must be an object; got {type(arguments).__name__}')
    return ToolCall(name=data["name"], arguments=arguments, id=f"call_{secrets.token_hex(4)}")


_FENCED_JSON = re.compile(r"\A```(?:json)?\s*\n(.*?)\n?```\Z", re.DOTALL)


def _bare_tool_calls(content: str, tool_names: Collection[str]) -> list[ToolCall]:
    """Tool calls written without the ``<tool_call>`` tags: a reply that is nothing but a JSON object (or a
    list of them), bare or in a ```json fence, naming one of the tools offered. Small models do this
    (Qwen2.5-Coder-0.5B answers the weather example with a fenced block); anything else is not a call."""
    fenced = _FENCED_JSON.match(content)
    body = fenced.group(1) if fenced else content
    if not body.startswith(("{", "[")):
        return []
    try:
        data = json.loads(body)
        items = data if isinstance(data, list) else [data]
        calls = [_tool_call(json.dumps(item)) for item in items]
    except ValueError:
        return []
    return calls if calls and all(c.name in tool_names for c in calls) else []


def parse_reply(text: str, tool_names: Collection[str] = ()) -> Reply:
    """Split a model reply into reasoning (``<think>``), content and ``<tool_call>`` blocks.

    Never raises on model output: a tool call that is not valid JSON (or lacks a name, or was cut off
    before ``</tool_call>``) adds a message to ``errors`` and stays in ``content`` as raw text. Tool
    calls inside the reasoning are left there; they are thoughts, not requests. With ``tool_names`` (the
    tools the prompt offered), a reply that is only a JSON call to one of them also counts as a call.
    """
    reasoning, rest = _split_thinking(text)
    calls: list[ToolCall] = []
    errors: list[str] = []
    kept: list[str] = []
    cursor = 0
    for n, match in enumerate(_TOOL_CALL.finditer(rest), start=1):
        kept.append(rest[cursor : match.start()])
        cursor = match.end()
        if not match.group(0).endswith("</tool_call>"):
            errors.append(f"tool call {n} is not closed with </tool_call> (output cut off?)")
            kept.append(match.group(0))
            continue
        try:
            calls.append(_tool_call(match.group(1).strip()))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            errors.append(f"tool call {n} is invalid: {e}")
            kept.append(match.group(0))
    kept.append(rest[cursor:])
    content = "".join(kept).strip()
    if not calls and not errors and tool_names:
        calls = _bare_tool_calls(content, tool_names)
        content = "" if calls else content
    return Reply(content=content, reasoning=reasoning, tool_calls=calls, errors=errors)


class DeltaSplitter:
    """Turns streamed text into OpenAI deltas: ``reasoning_content`` inside <think>, ``content`` outside,
    and, when the request had tools, <tool_call> blocks held back and returned as tool calls at the end.

    Text that could be the start of a marker is held until it is decided, so a marker split across two
    tokens never leaks into the content.
    """

    def __init__(self, *, tools: bool, thinking_open: bool = False):
        self.tools = tools
        self.mode = "reasoning" if thinking_open else "content"
        self.pending = ""
        self.held_tool_text = ""  # everything from the first <tool_call> on
        self.content_started = False
        self.tool_calls: list[ToolCall] = []

    def _markers(self) -> tuple[str, ...]:
        if self.mode == "reasoning":
            return ("</think>",)
        return ("<think>", "<tool_call>") if self.tools else ("<think>",)

    def _emit(self, kind: str, text: str, out: list[tuple[str, str]]) -> None:
        if kind == "content" and not self.content_started:
            text = text.lstrip()  # the blank lines after </think>
            self.content_started = bool(text)
        if text:
            out.append((kind, text))

    def feed(self, piece: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.mode == "tool":
            self.held_tool_text += piece
            return out
        self.pending += piece
        while True:
            markers = self._markers()
            hits = [(self.pending.find(m), m) for m in markers if m in self.pending]
            if not hits:
                break
            at, marker = min(hits)
            self._emit(self.mode, self.pending[:at].rstrip(), out)
            rest = self.pending[at + len(marker):]
            self.pending = ""
            if marker == "<tool_call>":
                self.mode, self.held_tool_text = "tool", marker + rest
                return out
            self.mode = "reasoning" if marker == "<think>" else "content"
            self.pending = rest.lstrip()
        keep = max((k for m in self._markers() for k in range(1, len(m))
                    if self.pending.endswith(m[:k])), default=0)
        # whitespace before the held part waits for what follows: before a marker or at the end it is
        # dropped, so the streamed text equals the non-streamed (stripped) message
        cut = len(self.pending) - keep
        while cut > 0 and self.pending[cut - 1].isspace():
            cut -= 1
        self._emit(self.mode, self.pending[:cut], out)
        self.pending = self.pending[cut:]
        return out

    def finish(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(self.mode if self.mode != "tool" else "content", self.pending.rstrip(), out)
        self.pending = ""
        if self.held_tool_text:
            text = self.held_tool_text
            reply = parse_reply(text)
            if text.rfind("<tool_call>") > text.rfind("</tool_call>"):
                # small models often end their turn right after the JSON, without the closing tag
                closed = parse_reply(text + "\n</tool_call>")
                reply = closed if not closed.errors else reply
            self.tool_calls = reply.tool_calls
            self._emit("content", reply.content, out)  # a malformed call stays visible as text
        return out
