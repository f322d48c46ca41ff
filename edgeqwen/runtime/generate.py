"""The decode loop: prefill() the prompt, then decode_one() token by token.

Everything the loop touches is allocated before it starts: the KV buffers (``kv_cache.py``), the attention
mask (a preallocated row of ones, sliced), the one-token input and the logits row. onnxruntime writes K/V
in place through IOBinding, so a step costs one ``run_with_iobinding`` plus a few binding updates and the
sampler. Only the last position's logits exist (the graph's lm_head is pruned), so prefill never pays for
``prompt_len x vocab`` logits.

``Engine.tokens`` mirrors what is in the cache. ``prefill`` keeps the longest common prefix between it and
the new prompt and only runs what follows: multi-turn chat, or a client resending the whole history, costs
only the new turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort

from ..bundle import Manifest
from ..errors import ContextOverflowError, GenerationError, ProviderError
from .kv_cache import ConcatKVCache, KVCache
from .lookup import MAX_DRAFT, DraftLength, NgramIndex
from .sampling import Sampler


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose K/V came from the cache
    new_tokens: int = 0
    ttft_s: float = 0.0  # from the call to the first generated token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # tokens picked from decode runs' logits
    drafted_tokens: int = 0  # prompt lookup: guesses checked ...
    accepted_tokens: int = 0  # ... and taken

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "reused_tokens": self.reused_tokens,
                "new_tokens": self.new_tokens, "ttft_s": round(self.ttft_s, 4),
                "prefill_tokens_per_s": round(self.prefill_tps, 2), "decode_tokens_per_s": round(self.decode_tps, 2),
                "lookup_drafted": self.drafted_tokens, "lookup_accepted": self.accepted_tokens}


# Prompt tokens per prefill run. Activations (and onnxruntime's int8 copies of them) scale with the chunk;
# the time does not: 512 prompt tokens on the 0.5B, chunks of 512/256/128/64 -> peak RSS 908/892/885/875 MB,
# TTFT 1.55/1.48/1.49/1.54 s.
DEFAULT_PREFILL_CHUNK = 128


class Engine:
    """One ONNX session + its KV cache + IOBinding: the state of one conversation."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, *, context: int,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_chunk: int = 256):
        spec, io = manifest.spec, manifest.io
        self.session, self.spec, self.io = session, spec, io
        self.context = context
        self.prefill_chunk = prefill_chunk
        dtype = np.float16 if io.io_dtype == "float16" else np.float32
        cache_type = KVCache if io.shared_kv_buffer else ConcatKVCache
        self.cache = cache_type(spec.num_layers, spec.kv_heads, spec.head_dim, dtype=dtype,
                                max_capacity=context, chunk=kv_chunk)
        self.tokens: list[int] = []  # what the cache holds
        self.binding = session.io_binding()
        self._positions = np.arange(context, dtype=np.int64)[None, :]
        self._mask = np.ones((1, context), dtype=np.int64)
        # runs of up to ``window`` tokens return a logits row per token (prompt lookup verifies drafts with them)
        self.window = max(1, io.logits_window) if io.logits_last_only else context
        self._logits = np.zeros((1, self.window if io.logits_last_only else 1, spec.vocab_size), dtype=dtype)
        self._bound_rows = 0
        self._step_ids = np.zeros((1, 1), dtype=np.int64)
        self._step_ids_ort = ort.OrtValue.ortvalue_from_numpy(self._step_ids)
        self.owner: object | None = None  # the generate() call whose tokens the cache holds

    @property
    def max_draft(self) -> int:
        """The most drafted tokens one run can check: a logits row each, plus one for the token before them."""
        return min(self.window - 1, MAX_DRAFT)

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        """Run ``ids`` ([1, n]) after the cached tokens; return the last position's logits row (float32)."""
        return self._run(ids)[-1].astype(np.float32, copy=False)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        """Run ``ids`` ([1, n]) after the cached tokens; return the logits rows the graph gives ([n or 1, V],
        a view valid until the next run): one per token for ``n <= window``, else the last one."""
        n = ids.shape[1]
        past, total = self.cache.length, self.cache.length + n
        b = self.binding
        try:
            self.cache.bind(b, self.io, n)
        except MemoryError as e:
            raise GenerationError(f"Out of memory growing the KV cache to {total} tokens.",
                                  "load with a smaller context=, or start a new conversation.") from e
        if n == 1:
            self._step_ids[0, 0] = ids[0, 0]
            b.bind_ortvalue_input(self.io.input_ids, self._step_ids_ort)
        else:
            b.bind_cpu_input(self.io.input_ids, ids)
        b.bind_cpu_input(self.io.attention_mask, self._mask[:, :total])
        if self.io.position_ids:
            b.bind_cpu_input(self.io.position_ids, self._positions[:, past:total])
        if not self.io.logits_last_only:
            b.bind_output(self.io.logits, "cpu")
        else:
            rows = n if n <= self.window else 1
            if rows != self._bound_rows:  # the rows are the first ones of one preallocated buffer
                b.bind_output(self.io.logits, "cpu", 0, self._logits.dtype, [1, rows, self.spec.vocab_size],
                              self._logits.ctypes.data)
                self._bound_rows = rows
        try:
            self.session.run_with_iobinding(b)
        except Exception as e:  # onnxruntime's own types (Fail, RuntimeException, ...), e.g. a GPU out of memory
            raise ProviderError(f"onnxruntime failed running {n} token(s) after {past} cached: "
                                f"{str(e).strip()[:300]}", "load with a smaller context= or prefill_chunk=, or "
                                "provider='cpu'; the conversation is kept up to the last finished step.") from e
        self.cache.advance(n)
        if self.io.logits_last_only:
            return self._logits[0, : self._bound_rows]
        return b.get_outputs()[0].numpy()[0]

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefill(engine: Engine, tokens: Sequence[int], stats: Stats | None = None) -> np.ndarray:
    """Bring the cache to ``tokens`` (reusing the common prefix) and return the next-token logits."""
    if not tokens:
        raise GenerationError("The prompt is empty.", "pass at least one token or a non-empty prompt.")
    if len(tokens) > engine.context:
        raise ContextOverflowError(f"The prompt has {len(tokens)} tokens; this model's context is "
                                   f"{engine.context}.", "shorten the prompt, or load with a larger context=.")
    keep = min(common_prefix(engine.tokens, tokens), len(tokens) - 1)  # at least one token must run
    rewind(engine, keep)  # engine.tokens[:keep] == tokens[:keep]: the common prefix
    t0 = time.perf_counter()
    logits = None
    for start in range(keep, len(tokens), engine.prefill_chunk):
        chunk = tokens[start : start + engine.prefill_chunk]
        logits = engine._forward(np.asarray([chunk], dtype=np.int64))
        engine.tokens.extend(chunk)
    if stats is not None:
        stats.prompt_tokens, stats.reused_tokens = len(tokens), keep
        stats.prefill_s = time.perf_counter() - t0
    return logits


def _check_room(engine: Engine, n: int) -> None:
    if engine.cache.length + n > engine.context:
        raise ContextOverflowError(f"The conversation reached the context length ({engine.context} tokens).",
                                   "start a new conversation, or load with a larger context=.")


def decode_one(engine: Engine, token: int) -> np.ndarray:
    """Append one token to the cache and return the logits for the one after it."""
    _check_room(engine, 1)
    logits = engine._forward(np.asarray([[token]], dtype=np.int64))
    engine.tokens.append(token)
    return logits


def decode_draft(engine: Engine, token: int, draft: Sequence[int]) -> np.ndarray:
    """Append ``token`` and the drafted guesses after it in one run (prompt lookup).

    Returns ``len(draft) + 1`` logits rows: row i is what ``decode_one`` would give after ``draft[:i]``. The
    caller keeps the agreeing prefix with ``rewind``. One run costs little more than one token (the
    weights are read once), so each accepted guess is a step saved.
    """
    ids = [int(token), *draft]
    _check_room(engine, len(ids))
    rows = engine._run(np.asarray([ids], dtype=np.int64))
    engine.tokens.extend(ids)
    return rows.astype(np.float32, copy=False)  # fp16 graphs: the sampler works in float32, as decode_one


def rewind(engine: Engine, length: int) -> None:
    """Forget everything after the first ``length`` cached tokens (rejected guesses).

    The token list first: interrupted in between (Ctrl-C), the list is then shorter than the cache, which
    the next prefill's common prefix handles; the other way round the cache could not rewind to it.
    """
    del engine.tokens[length:]
    engine.cache.rewind(length)


@dataclass
class StopRule:
    max_new_tokens: int = 256
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


def generate(engine: Engine, prompt: Sequence[int], sampler: Sampler, rule: StopRule,
             stats: Stats | None = None, *, lookup: int = 0) -> Iterator[int]:
    """Yield generated token ids; stops on a stop token (not yielded) or after max_new_tokens.

    ``lookup`` > 0 drafts up to that many tokens per step from earlier text (``lookup.py``) and checks them
    in the same run; the sampler accepts or replaces each (``Sampler.pick_or_accept``), so greedy output is
    the plain run's tokens (up to the kernels' rounding, which differs between one-row and multi-row runs on
    int8-activation bundles) and sampled output has the same distribution. Each run gives ``rows``, the
    logits to pick from: one per drafted token plus one.

    The caller may stop iterating at any time (stop strings, a disconnected client): ``engine.tokens`` always
    lists what the cache holds (the tokens given so far, perhaps a few accepted guesses beyond them), so the
    next prefill keeps the common prefix and reruns only the rest.
    """
    stats = stats if stats is not None else Stats()
    if len(prompt) + rule.max_new_tokens > engine.context:
        raise ContextOverflowError(
            f"Prompt ({len(prompt)} tokens) + max_new_tokens ({rule.max_new_tokens}) exceeds the context "
            f"length ({engine.context}).", "lower max_new_tokens, shorten the prompt, or load with a larger "
            "context= (up to the bundle's context length), or pass truncate='left'.")
    if rule.max_new_tokens <= 0:
        return
    t0 = time.perf_counter()
    engine.owner = me = object()
    rows, draft = prefill(engine, prompt, stats)[None, :], []
    length = DraftLength(min(lookup, engine.max_draft))
    index: NgramIndex | None = None
    produced, t_decode, from_decode = 0, 0.0, False
    while True:
        picked, stopped = [], False
        for i, row in enumerate(rows):  # row i checks draft[i]; the first disagreement ends the run
            token = sampler.pick_or_accept(row, draft[i]) if i < len(draft) else sampler.pick(row)
            if produced == 0 and not picked:
                stats.ttft_s = time.perf_counter() - t0
            if from_decode:
                stats.decode_steps += 1
            if token in rule.stop_token_ids:
                stopped = True
                break
            sampler.observe(token)
            picked.append(token)
            if produced + len(picked) == rule.max_new_tokens or i >= len(draft) or token != draft[i]:
                break
        if draft:  # the run cached the previous token and every guess: keep the guesses that were taken
            accepted = common_prefix(picked, draft)
            rewind(engine, engine.cache.length - len(draft) + accepted)
            length.update(len(draft), accepted)
            stats.drafted_tokens += len(draft)
            stats.accepted_tokens += accepted
        if index is None and length.maximum > 0:  # built after the first token, outside the TTFT
            index = NgramIndex(prompt)
        for token in picked:
            produced += 1
            stats.new_tokens += 1
            if index is not None:
                index.append(token)
            yield token
        if stopped or produced >= rule.max_new_tokens:
            break
        if engine.owner is not me:  # resumed after another generation used this cache
            raise GenerationError("Another generation ran on this model while this stream was paused, so its "
                                  "KV cache no longer holds this stream's text.",
                                  "finish or close one stream before starting the next on the same model, or "
                                  "load the bundle once per concurrent conversation.")
        # at most max_new - produced - 1 guesses: the run's last pick is then never a guess, so the token
        # that ends the generation is never in the cache, as in a plain run
        room = min(length.current, rule.max_new_tokens - produced - 1, engine.context - engine.cache.length - 1)
        draft = index.propose(room) if index is not None else []
        t1 = time.perf_counter()
        rows = decode_draft(engine, picked[-1], draft) if draft else decode_one(engine, picked[-1])[None, :]
        t_decode += time.perf_counter() - t1
        stats.decode_s, from_decode = t_decode, True
