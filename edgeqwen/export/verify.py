"""Does the bundle still say what the source model says?

Two figures, both against the float source run by transformers (the reference):
- teacher-forced top-1 agreement: on fixed texts, how often the bundle's most likely next token equals the
  reference's, position by position (what greedy decoding feels);
- perplexity ratio on the same texts: exp(mean NLL of the bundle) / exp(mean NLL of the reference).

The bundle is driven through edgeqwen's own runtime, one token a step (``decode_one``: the path users run,
one logits row each), so verification also exercises the KV-cache loop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..evaluate import log_softmax_pick as nll_and_top1  # one NLL/argmax routine for export and eval

# (min top-1 agreement, max perplexity ratio) per precision. Set from measurement on Qwen2.5-Coder-0.5B
# (see benchmarks/README.md); they are floors that catch a broken export, not quality goals.
THRESHOLDS: dict[str, tuple[float, float]] = {
    "fp32": (0.98, 1.01),
    "fp16": (0.97, 1.02),
    "int8": (0.95, 1.03),
    "int4": (0.80, 1.15),
}


@dataclass
class TextScore:
    name: str
    tokens: int
    agreement: float
    perplexity: float
    reference_perplexity: float

    @property
    def ratio(self) -> float:
        return self.perplexity / self.reference_perplexity


@dataclass
class Verification:
    precision: str
    texts: list[TextScore] = field(default_factory=list)
    min_agreement: float = 0.0
    max_ratio: float = math.inf

    @property
    def agreement(self) -> float:
        n = sum(t.tokens for t in self.texts)
        return sum(t.agreement * t.tokens for t in self.texts) / max(n, 1)

    @property
    def worst_ratio(self) -> float:
        return max((t.ratio for t in self.texts), default=1.0)

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement and self.worst_ratio <= self.max_ratio

    def to_dict(self) -> dict:
        return {"precision": self.precision, "passed": self.passed, "agreement": round(self.agreement, 4),
                "worst_perplexity_ratio": round(self.worst_ratio, 4),
                "thresholds": {"min_agreement": self.min_agreement, "max_ratio": self.max_ratio},
                "texts": [asdict(t) | {"ratio": round(t.ratio, 4)} for t in self.texts]}


def builtin_texts() -> dict[str, str]:
    """Short English and Python texts shipped with the package (no hub, no network)."""
    out = {}
    base = resources.files("edgeqwen.data")
    for name in ("verify_en.txt", "verify_code.txt"):
        out[name.removeprefix("verify_").removesuffix(".txt")] = (base / name).read_text(encoding="utf-8")
    return out


def bundle_logits(model, tokens: Sequence[int]) -> Iterable[np.ndarray]:
    """Teacher-forced logits rows from an edgeqwen runtime Model: row i predicts tokens[i + 1]."""
    from ..runtime.generate import decode_one, prefill

    engine = model.engine
    engine.reset()
    yield prefill(engine, tokens[:1]).copy()
    for t in tokens[1:-1]:
        yield decode_one(engine, t).copy()
    engine.reset()


class Reference:
    """The float source model in transformers, loaded once for all texts."""

    def __init__(self, hf_dir: Path, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        self.model.eval()
        self._last: tuple[tuple[int, ...], np.ndarray] | None = None  # benchmarks score several systems per text

    def logits(self, tokens: Sequence[int], window: int = 1024) -> np.ndarray:
        """Rows predicting tokens[1:], computed in windows so long texts fit in memory."""
        key = (window, *(int(t) for t in tokens))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self._last = None  # never hold the previous text's rows (up to ~600 MB) while computing the next
        rows = []
        with self.torch.inference_mode():
            for start in range(0, len(tokens) - 1, window):
                ids = self.torch.tensor([tokens[start : start + window]])
                rows.append(self.model(input_ids=ids).logits[0].float().numpy())
        out = np.concatenate(rows)[: len(tokens) - 1]
        self._last = (key, out)
        return out


def score(model, reference: Reference, name: str, tokens: Sequence[int],
          progress: Callable[[Iterable], Iterable] = lambda it: it) -> TextScore:
    return score_rows(reference, name, tokens, progress(bundle_logits(model, tokens)))


def score_rows(reference: Reference, name: str, tokens: Sequence[int], rows: Iterable[np.ndarray]) -> TextScore:
    """Score any system's teacher-forced logits rows (row i predicts tokens[i + 1]) against the reference.

    Separate from ``score`` so benchmarks can put peers (llama.cpp, onnxruntime-genai) through the very same
    arithmetic as our bundles.
    """
    targets = np.asarray(tokens[1:])
    rows = np.stack([np.asarray(r, dtype=np.float32).reshape(-1) for r in rows])
    if rows.shape[0] != len(targets):
        raise ValueError(f"{name}: {rows.shape[0]} logits rows for {len(targets)} targets")
    ref_nll, ref_top = nll_and_top1(reference.logits(tokens), targets)
    nll, top = nll_and_top1(rows, targets)
    return TextScore(name=name, tokens=len(targets), agreement=float((top == ref_top).mean()),
                     perplexity=float(np.exp(nll.mean())), reference_perplexity=float(np.exp(ref_nll.mean())))


def verify_bundle(bundle_dir: Path, hf_dir: Path, precision: str, *, max_tokens: int = 256,
                  threads: int | None = None, texts: dict[str, str] | None = None,
                  progress: Callable[[Iterable], Iterable] = lambda it: it) -> Verification:
    from .. import runtime

    model = runtime.load(bundle_dir, provider="cpu", threads=threads, verify=False)
    reference = Reference(hf_dir, threads=threads)
    floor, ceiling = THRESHOLDS.get(precision, (0.0, math.inf))
    result = Verification(precision=precision, min_agreement=floor, max_ratio=ceiling)
    for name, text in (texts or builtin_texts()).items():
        ids = model.encode(text)[:max_tokens]
        result.texts.append(score(model, reference, name, ids, progress))
    return result
