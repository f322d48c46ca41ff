"""`edgeqwen eval`: perplexity of a bundle on any text, and agreement with a reference model.

Perplexity uses a sliding window (``context`` tokens, advancing by ``stride``): every token is scored
once, each with up to ``context - stride`` tokens of left context it did not have to predict, the scheme
llama-perplexity and the transformers docs use, so figures are comparable. The bundle is driven through
the runtime: the context part of each window is one prefill, then the scored tokens are fed one by one
(the graph's lm_head covers the last position only, and that is the path generation takes). Only the
per-token log-likelihoods are kept, so memory does not grow with the text.

The reference (``--reference``: alias, HF folder or .gguf) is the float model in transformers, scored on
the very same windows; it needs ``pip install 'edgeqwen[export]'``. Without it, only the runtime is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .bundle import is_count
from .errors import GenerationError


@dataclass(frozen=True)
class Window:
    start: int  # first token the model sees
    score_from: int  # first token scored in this window (predicted from the ones before it)
    end: int  # one past the last token scored


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows that score tokens 1..n-1 exactly once, each seeing at most ``context`` tokens."""
    if context < 2:
        raise GenerationError(f"context={context} is too small to score anything.", "use --context 2 or more.")
    if not 1 <= stride <= context:
        raise GenerationError(f"stride={stride} must be between 1 and the context ({context}).",
                              "use a stride of about half the context (the default).")
    step = min(stride, context - 1)  # every window keeps at least one token of context
    out, scored = [], 1
    while scored < n_tokens:
        end = min(n_tokens, scored + step) if out else min(n_tokens, context)
        out.append(Window(start=max(0, end - context), score_from=scored, end=end))
        scored = end
    return out


def log_softmax_pick(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(negative log-likelihood of each target, argmax) for rows of logits, in float64."""
    x = np.asarray(logits, np.float64)
    if x.ndim == 1:
        x = x[None]
    m = x.max(axis=-1, keepdims=True)
    logz = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]
    return logz - x[np.arange(len(targets)), targets], x.argmax(axis=-1)


def bundle_nll(model, tokens: Sequence[int], spans: list[Window],
               progress: Callable[[Iterable], Iterable] = lambda it: it) -> tuple[np.ndarray, np.ndarray]:
    """Per-token NLL and top-1 of the bundle for every scored position (teacher forced)."""
    from .runtime.generate import decode_one, prefill

    engine = model.engine
    nll = np.zeros(len(tokens))
    top = np.zeros(len(tokens), np.int64)

    def steps():
        for w in spans:
            engine.reset()
            logits = prefill(engine, tokens[w.start : w.score_from])
            for t in range(w.score_from, w.end):
                nll[t], top[t] = (a[0] for a in log_softmax_pick(logits, np.array([tokens[t]])))
                if t + 1 < w.end:
                    logits = decode_one(engine, tokens[t])
                yield t

    for _ in progress(_Sized(steps(), sum(w.end - w.score_from for w in spans))):
        pass
    engine.reset()
    return nll[1:], top[1:]


class _Sized:
    """A generator with a length, so progress bars know the total."""

    def __init__(self, gen, n: int):
        self.gen, self.n = gen, n

    def __iter__(self):
        return iter(self.gen)

    def __len__(self) -> int:
        return self.n


def reference_nll(reference, tokens: Sequence[int], spans: list[Window]) -> tuple[np.ndarray, np.ndarray]:
    """The same figures from the float model (``export.verify.Reference``), one forward pass per window."""
    nll = np.zeros(len(tokens))
    top = np.zeros(len(tokens), np.int64)
    for w in spans:
        rows = reference.logits(tokens[w.start : w.end], window=w.end - w.start)  # row i predicts token i+1
        first = w.score_from - w.start - 1
        targets = np.asarray(tokens[w.score_from : w.end])
        nll[w.score_from : w.end], top[w.score_from : w.end] = log_softmax_pick(rows[first:], targets)
    return nll[1:], top[1:]


@dataclass
class PerplexityResult:
    tokens: int
    perplexity: float
    context: int
    stride: int
    reference_perplexity: float | None = None
    agreement: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.reference_perplexity is None else self.perplexity / self.reference_perplexity

    def to_dict(self) -> dict:
        r = self.ratio
        return {"tokens": self.tokens, "perplexity": round(self.perplexity, 4),
                "reference_perplexity": None if r is None else round(self.reference_perplexity, 4),
                "ratio": None if r is None else round(r, 4),
                "agreement": None if self.agreement is None else round(self.agreement, 4),
                "context": self.context, "stride": self.stride}


def perplexity(model, text: str, *, context: int | None = None, stride: int | None = None, reference=None,
               max_tokens: int | None = None, progress: Callable[[Iterable], Iterable] = lambda it: it
               ) -> PerplexityResult:
    if max_tokens is not None and not is_count(max_tokens, 2):
        raise GenerationError(f"max_tokens must be an integer of at least 2 (tokens to score), got {max_tokens!r}.",
                              "pass e.g. --max-tokens 512, or leave it out to score the whole text.")
    tokens = model.encode(text)[:max_tokens]
    if len(tokens) < 2:
        raise GenerationError(f"The text has {len(tokens)} token(s); perplexity needs at least 2.",
                              "pass a longer text.")
    context = min(1024 if context is None else context, model.context)
    stride = max(1, context // 2) if stride is None else stride
    spans = windows(len(tokens), context, stride)
    nll, top = bundle_nll(model, tokens, spans, progress)
    result = PerplexityResult(tokens=len(nll), perplexity=math.exp(float(nll.mean())), context=context,
                              stride=stride)
    if reference is not None:
        ref_nll, ref_top = reference_nll(reference, tokens, spans)
        result.reference_perplexity = math.exp(float(ref_nll.mean()))
        result.agreement = float((top == ref_top).mean())
    return result


def load_reference(spec: str, threads: int | None = None):
    """Resolve an alias / HF folder / .gguf to the float model in transformers."""
    try:
        from .export.sources import resolve_source
        from .export.verify import Reference
    except ImportError as e:  # the lean runtime install
        raise GenerationError(f"--reference needs the export dependencies ({e.name} is missing).",
                              "pip install 'edgeqwen[export]'.") from e
    src = resolve_source(spec, progress=True)
    return Reference(Path(src.hf_dir), threads=threads)


def agreement(model, reference, texts: dict[str, str], *, max_tokens: int = 256,
              progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict:
    """Teacher-forced top-1 agreement with the reference, per text and overall (token-weighted)."""
    per = {}
    for name, text in texts.items():
        r = perplexity(model, text, reference=reference, max_tokens=max_tokens, progress=progress)
        per[name] = r.to_dict()
    total = sum(r["tokens"] for r in per.values())
    overall = sum(r["agreement"] * r["tokens"] for r in per.values()) / max(total, 1)
    return {"agreement": round(overall, 4), "tokens": total, "texts": per}
