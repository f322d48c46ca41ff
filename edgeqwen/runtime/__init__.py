"""edgeqwen's lean runtime: ``load(bundle)`` -> ``Model`` with generate / stream / chat.

Imports only numpy, onnxruntime, tokenizers, jinja2 and the standard library, so it installs on a board with
``pip install edgeqwen``. The math lives in ``generate.py``; this module turns text, chat messages and
sampling options into token ids and back.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tokenizers import Tokenizer

from ..bundle import Manifest, is_count, load_bundle
from ..errors import BundleError, ContextOverflowError, GenerationError
from .chat import ChatTemplate, Reply, ToolCall, parse_reply
from .generate import DEFAULT_PREFILL_CHUNK, Engine, Stats, StopRule, generate
from .lookup import DEFAULT_MAX_DRAFT
from .sampling import Sampler, SamplingParams
from .session import choose_provider, create_session, release_weight_pages
from .text import IncrementalDetokenizer, StopMatcher

__all__ = ["load", "Model", "Conversation", "Result", "SamplingParams", "ToolCall"]

DEFAULT_MAX_NEW_TOKENS = 512


def peak_rss_mb() -> float:
    """Peak resident memory of this process (what a board's OOM killer looks at).

    On Linux this reads VmHWM: unlike getrusage's ru_maxrss it is not inherited from a large parent across
    fork+exec, so a runtime started from a big process (a test runner, a server) reports its own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


@dataclass
class Result:
    text: str
    tokens: list[int]
    # "stop" (end token / stop string) | "length" | "cancelled" (stream closed early) | "error" (raised mid-answer)
    finish_reason: str
    stats: dict[str, Any]
    reasoning: str | None = None  # Qwen3 <think>…</think>, when the prompt was chat messages
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # e.g. a <tool_call> whose JSON did not parse


class Model:
    """A loaded bundle. One conversation's KV cache lives here; calls reuse whatever prefix it shares."""

    def __init__(self, folder: Path, manifest: Manifest, *, provider: str, threads: int | None, context: int | None,
                 prefill_chunk: int):
        self.folder, self.manifest = folder, manifest
        spec = manifest.spec
        if context is not None and not (is_count(context, 16) and context <= spec.context_length):
            raise GenerationError(f"context={context!r} is outside 16..{spec.context_length} for this bundle.",
                                  "pass a context up to the bundle's context length, or re-export with "
                                  "--context N for a longer one.")
        self.context = context or spec.context_length
        if not is_count(prefill_chunk):
            raise GenerationError(f"prefill_chunk must be a positive integer (prompt tokens per run), got "
                                  f"{prefill_chunk!r}.", f"pass e.g. prefill_chunk={DEFAULT_PREFILL_CHUNK}.")
        self.provider = choose_provider(provider, manifest.profile, manifest.backend)
        # The tokenizer first: parsing tokenizer.json peaks ~45 MB above what it keeps, and that transient
        # heap is handed back before the session exists. Loaded after the session, the same parse raised
        # peak RSS by 87 MB on the 0.5B (measured: 861 vs 774 MB after both loads).
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.session, self.session_info = create_session(folder / "model.onnx", self.provider, threads=threads,
                                                         profile=manifest.profile)
        # the weight pages onnxruntime repacked and no longer reads: ~95 MiB of RSS on the 0.5B int4
        self.released_bytes = release_weight_pages([folder / n for n in manifest.files if n.endswith(".data")])
        self.engine = Engine(self.session, manifest, context=self.context, prefill_chunk=prefill_chunk)
        self.generation_config = _read_json(folder / "generation_config.json")
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        template = tok_cfg.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.template = (ChatTemplate(template, bos_token=_token_str(tok_cfg.get("bos_token")),
                                      eos_token=_token_str(tok_cfg.get("eos_token"))) if template else None)
        self.last_result: Result | None = None  # the most recent generate/stream call's result
        eos = self.generation_config.get("eos_token_id", spec.eos_token_ids)
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos]) | frozenset(spec.eos_token_ids)

    # -- text <-> tokens ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError as e:  # tokenizers refuses str holding a lone UTF-16 surrogate (e.g. "\ud800" from JSON)
            raise GenerationError(f"The text is not valid Unicode ({e}).",
                                  "send UTF-8 text; a lone surrogate such as \\ud800 cannot be tokenized.") from e

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def render(self, messages: list[dict], *, tools: list[dict] | None = None,
               enable_thinking: bool | None = None) -> str:
        if self.template is None:
            raise BundleError("This bundle has no chat template, so chat messages cannot be formatted.",
                              "pass a plain string prompt, or re-export from a source with a chat template.")
        return self.template.render(messages, tools=tools, add_generation_prompt=True,
                                    enable_thinking=enable_thinking)

    def prompt_tokens(self, prompt: str | list[dict], *, tools=None, enable_thinking=None) -> list[int]:
        if isinstance(prompt, str):
            if tools or enable_thinking is not None:
                what = "tools" if tools else "enable_thinking"
                raise GenerationError(f"{what} only applies to chat messages; this prompt is a plain string "
                                      "(sent as raw text, without the chat template).",
                                      "pass [{'role': 'user', 'content': text}] instead of the string, or drop "
                                      f"{what}.")
            return self.encode(prompt)
        if isinstance(prompt, list):
            return self.encode(self.render(prompt, tools=tools, enable_thinking=enable_thinking))
        raise GenerationError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}.",
                              "pass 'text' or [{'role': 'user', 'content': 'text'}].")

    # -- generation -----------------------------------------------------------------------------------
    def stream(self, prompt: str | list[dict], **options: Any) -> Iterator[str]:
        """Yield text pieces as they are decoded (same options as ``generate``)."""
        yield from self._run(prompt, options, _Sink())

    def generate(self, prompt: str | list[dict], **options: Any) -> Result:
        """Generate a whole answer. A string is a raw prompt; a list of {role, content} goes through the template.

        Options: max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
        frequency_penalty, seed, stop (str or list of str), stop_token_ids, tools, enable_thinking,
        truncate ("error" | "left"), lookup (tokens drafted per step from earlier text, 0 = off; see
        ``lookup.py``). Unset sampling options come from the bundle's generation_config.json.

        A seed replays a sample exactly from the same cache state. A repeated prompt reuses its cached
        prefix and reruns only its last token, alone; on bundles with int8 activations a one-row run rounds
        slightly differently from a chunk, so a near-tie can go the other way: ``reset()`` first for an
        exact replay.
        """
        sink = _Sink()
        for _ in self._run(prompt, options, sink):
            pass
        return sink.result

    def chat(self, system: str | None = None, *, tools: list[dict] | None = None,
             enable_thinking: bool | None = None) -> "Conversation":
        return Conversation(self, system=system, tools=tools, enable_thinking=enable_thinking)

    def reset(self) -> None:
        """Forget the cached conversation (the next call prefills from scratch)."""
        self.engine.reset()

    def _run(self, prompt, options: dict, sink: "_Sink") -> Iterator[str]:
        opts = dict(options)
        max_new = opts.pop("max_new_tokens", None)  # None: the default, capped to the room the context has
        stop = opts.pop("stop", None)
        stop_ids = opts.pop("stop_token_ids", None)
        tools = opts.pop("tools", None)
        thinking = opts.pop("enable_thinking", None)
        truncate = opts.pop("truncate", "error")
        lookup = self._lookup(opts.pop("lookup", None))
        sampling_keys = {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                         "frequency_penalty", "seed"}
        unknown = set(opts) - sampling_keys
        if unknown:
            raise GenerationError(f"Unknown generation option(s): {', '.join(sorted(unknown))}.",
                                  f"use max_new_tokens, stop, stop_token_ids, tools, enable_thinking, truncate, lookup, "
                                  f"or {', '.join(sorted(sampling_keys))}.")
        if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
            raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new!r}.",
                                  "pass e.g. max_new_tokens=256.")
        if truncate not in ("error", "left"):
            raise GenerationError(f"truncate must be 'error' or 'left', got {truncate!r}.",
                                  "use truncate='left' to drop the oldest prompt tokens.")
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not (isinstance(stops, (list, tuple)) and all(isinstance(s, str) and s for s in stops)):
            raise GenerationError(f"stop must be a non-empty string or a list of them, got {stop!r}.",
                                  "pass e.g. stop=['\\n\\n'].")
        if thinking is not None and not isinstance(thinking, bool):
            raise GenerationError(f"enable_thinking must be True, False or None, got {thinking!r}.",
                                  "pass enable_thinking=False to turn Qwen3's thinking off.")
        _check_tools(tools)
        stop_set = self.eos_token_ids | self._stop_ids(stop_ids) | self._special_stop_ids(stops)
        params = SamplingParams.from_generation_config(self.generation_config, **opts).validate()
        ids = self.prompt_tokens(prompt, tools=tools, enable_thinking=thinking)
        explicit = max_new is not None
        if max_new is None:
            max_new = self._default_max_new(len(ids), truncate)
        ids = self._fit(ids, max_new, truncate, explicit=explicit)
        stats = Stats()
        detok = IncrementalDetokenizer(self.tokenizer)
        matcher = StopMatcher(stops) if stops else None
        tokens: list[int] = []
        parts: list[str] = []
        finish = "cancelled"  # until the loop ends by itself: the caller closed the stream, or Ctrl-C
        try:
            for token in generate(self.engine, ids, Sampler(params, ids), StopRule(max_new, stop_set), stats,
                                  lookup=lookup):
                tokens.append(token)
                piece, hit = detok.add(token), False
                if matcher is not None:
                    piece, hit = matcher.feed(piece)
                if piece:
                    parts.append(piece)
                    yield piece
                if hit:
                    finish = "stop"
                    break
            else:
                finish = "stop" if stats.new_tokens < max_new else "length"
            if finish == "length" or matcher is None or not matcher.stopped:
                tail = detok.flush()
                if matcher is not None:
                    tail, _ = matcher.feed(tail)
                    tail += "" if matcher.stopped else matcher.flush()
                if tail:
                    parts.append(tail)
                    yield tail
        except Exception:
            finish = "error"
            raise
        finally:  # also on an early stop: last_result then holds what was streamed, not the previous call
            self._finish(sink, prompt, tools, "".join(parts), tokens, finish, stats)

    def _finish(self, sink: _Sink, prompt, tools, text: str, tokens: list[int], finish: str, stats: Stats) -> None:
        info = stats.as_dict() | {"peak_rss_mb": round(peak_rss_mb(), 1), "provider": self.provider}
        sink.result = Result(text=text, tokens=tokens, finish_reason=finish, stats=info)
        if isinstance(prompt, list):
            names = {t.get("function", t).get("name") for t in tools or []}
            reply: Reply = parse_reply(text, tool_names=names - {None})
            sink.result.text, sink.result.reasoning = reply.content, reply.reasoning
            sink.result.tool_calls, sink.result.errors = reply.tool_calls, reply.errors
        self.last_result = sink.result

    def _stop_ids(self, stop_ids: Any) -> frozenset[int]:
        """The caller's stop token ids, checked: one id or a list of ids inside the vocabulary."""
        if stop_ids is None:
            return frozenset()
        ids = [stop_ids] if isinstance(stop_ids, int) and not isinstance(stop_ids, bool) else stop_ids
        vocab = self.manifest.spec.vocab_size
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, set, frozenset)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise GenerationError(f"stop_token_ids must be token ids (integers in 0..{vocab - 1}), got {stop_ids!r}.",
                                  "pass e.g. stop_token_ids=[151645]; for text, use stop=['...'].")
        return frozenset(ids)

    def _default_max_new(self, prompt_len: int, truncate: str = "error") -> int:
        """Without max_new_tokens: 512, or what the context has left after the prompt when that is less.

        A short context (an export with --context 256, or a long chat) would otherwise refuse every prompt
        for want of room the answer may never need. With no room at all, half the context is asked for, so
        truncate='left' keeps room for an answer and truncate='error' names the problem. With
        truncate='left' the answer never gets less than that half: a chat near the end of the context drops
        old tokens instead of cutting the answer to the few that are left.
        """
        room, half = self.context - prompt_len, max(1, self.context // 2)
        if truncate == "left":
            return min(DEFAULT_MAX_NEW_TOKENS, max(room, half))
        return min(DEFAULT_MAX_NEW_TOKENS, room if room > 0 else half)

    def _special_stop_ids(self, stops: list[str]) -> frozenset[int]:
        """Stop strings that are special tokens (``<|im_start|>``): decoded text skips those, so they stop by id."""
        special = {tok.content: i for i, tok in self.tokenizer.get_added_tokens_decoder().items() if tok.special}
        return frozenset(special[s] for s in stops if s in special)

    def _float_kernels_on_cpu(self) -> bool:
        plan = (self.manifest.quantization or {}).get("plan", {})
        levels = [plan.get("accuracy_level", 4)] + [level for _, level in plan.get("accuracy_levels", [])]
        return self.provider == "cpu" and plan.get("precision") in ("int4", "int8") and \
            any(level in (0, 1) for level in levels)

    @property
    def max_lookup(self) -> int:
        """The most drafted tokens one step can check: the graph's logits window minus the token itself."""
        return self.engine.max_draft

    def _lookup(self, lookup: Any) -> int:
        """The prompt-lookup draft length to use: the caller's, validated, or the default.

        On by default where it is cheap: a bundle whose graph gives a logits row per drafted token and
        whose KV buffer rewinds in place (the fast graph). The portable graph's cache rewinds by copying,
        so there it runs only when asked for. Off by default, too, for quantized bundles computing with
        float activations on CPU (int8 and "faithful" exports): onnxruntime's float-activation MatMulNBits
        kernel is a matrix-vector product at one row and costs 3.5x that at five (0.61 vs 0.18 ms for one
        896x4864 weight), so checking drafts slows decoding (0.5B faithful: 19.8 -> 11.2 tok/s).
        """
        most = self.max_lookup
        if lookup is None:
            cheap = self.manifest.io.shared_kv_buffer and not self._float_kernels_on_cpu()
            return min(DEFAULT_MAX_DRAFT, most) if cheap else 0
        if not is_count(lookup, 0):
            raise GenerationError(f"lookup must be an integer >= 0 (drafted tokens per step), got {lookup!r}.",
                                  f"pass lookup=0 to turn prompt lookup off, or up to {max(most, 1)}.")
        if lookup > most:
            if most == 0:
                raise GenerationError(f"lookup={lookup}: this bundle's graph returns logits for one position "
                                      "only, so drafted tokens cannot be checked.",
                                      "re-export the bundle with this edgeqwen version, or pass lookup=0.")
            raise GenerationError(f"lookup={lookup} is above this bundle's limit of {most} drafted tokens per step.",
                                  f"pass lookup between 0 and {most}.")
        return lookup

    def _fit(self, ids: list[int], max_new: int, truncate: str, *, explicit: bool = True) -> list[int]:
        budget = self.context - max_new
        if len(ids) <= budget:
            return ids
        if truncate == "left" and budget > 0:
            return ids[-budget:]
        if not explicit and len(ids) >= self.context:
            raise ContextOverflowError(
                f"The prompt ({len(ids)} tokens) fills the context ({self.context}), leaving no room for an answer.",
                "shorten the prompt or the conversation (chat: /reset), pass truncate='left', or load with a "
                "larger context=.")
        raise ContextOverflowError(
            f"Prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the context ({self.context}).",
            "shorten the prompt, lower max_new_tokens, pass truncate='left', or load with a larger context=.")


class _Sink:
    result: Result


class Conversation:
    """A multi-turn chat whose KV cache persists between turns: each turn prefills only what is new."""

    def __init__(self, model: Model, *, system: str | None, tools, enable_thinking):
        self.model, self.tools, self.enable_thinking = model, tools, enable_thinking
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.last: Result | None = None

    def _options(self, options: dict) -> dict:
        return {"tools": self.tools, "enable_thinking": self.enable_thinking} | options

    def stream(self, text: str | None, **options: Any) -> Iterator[str]:
        """Add a user turn (``None``: answer what is there, e.g. after tool results) and stream the reply.

        A turn that fails before its first token (bad option, context full) leaves the conversation as it
        was; a reply stopped early (the caller closed the stream, Ctrl-C) is kept as far as it was shown,
        with ``finish_reason`` "cancelled", so the history matches what the user saw.
        """
        if text is not None:
            self.messages.append({"role": "user", "content": text})
        sink = _Sink()
        try:
            yield from self.model._run(self.messages, self._options(options), sink)
        finally:
            result = getattr(sink, "result", None)
            # an empty answer that ended by itself (the model's first token was its end) is still a turn
            if result is not None and (result.tokens or result.finish_reason in ("stop", "length")):
                self._record(result)
            elif text is not None:
                self.messages.pop()
            if result is not None:
                self.last = result

    def send(self, text: str | None, **options: Any) -> Result:
        for _ in self.stream(text, **options):
            pass
        assert self.last is not None  # stream() sets it to this turn's result (an error raises instead)
        return self.last

    def add_tool_result(self, content: str, name: str | None = None) -> None:
        msg = {"role": "tool", "content": content}
        if name:
            msg["name"] = name
        self.messages.append(msg)

    def _record(self, result: Result) -> None:
        msg: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in result.tool_calls]
        self.messages.append(msg)
        self.last = result

    def reset(self, system: str | None = None) -> None:
        self.messages = [{"role": "system", "content": system}] if system else []
        self.model.reset()


def load(bundle: str | Path, provider: str = "auto", threads: int | None = None, context: int | None = None,
         *, verify: bool = True, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Model:
    """Load an exported bundle folder. ``verify`` checks every file's sha256 against the manifest."""
    folder = Path(bundle)
    manifest = load_bundle(folder, verify=verify)
    return Model(folder, manifest, provider=provider, threads=threads, context=context, prefill_chunk=prefill_chunk)


def _check_tools(tools: Any) -> None:
    """Tools are OpenAI-style dicts; each function needs a string name (the template and the reply parser use it)."""
    fix = "pass tools=[{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}]."
    if tools is None:
        return
    if not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise GenerationError(f"tools must be a list of JSON-schema tool dicts, got {type(tools).__name__}.", fix)
    for i, tool in enumerate(tools):
        function = tool.get("function", tool)
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]):
            raise GenerationError(f"tools[{i}] has no function name: {tool!r:.120}.", fix)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BundleError(f"{path.name} in the bundle is not valid JSON ({e}).", "re-export the bundle.") from e


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
