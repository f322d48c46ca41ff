"""`edgeqwen bench`: llama-bench for a bundle — load time, TTFT, prefill and decode speed, peak memory.

Runtime-only (works with the lean install on a board). The prompt is real text shipped with the package
(English prose and Python source, cycled if a longer prompt is asked for), cut to exactly
``prompt_tokens``; every run starts from an empty cache so prefill is measured whole, and generation
ignores end-of-sequence tokens so each run decodes exactly ``new_tokens``. One warm-up run is discarded.
Decoding is one token per step (prompt lookup off), like llama-bench's: the figure is the hardware's, not
how much a given answer repeats its prompt (``runtime/lookup.py``, benchmarks/README.md).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from .errors import GenerationError


def real_prompt_tokens(model, n: int) -> list[int]:
    base = resources.files("edgeqwen.data")
    texts = [(base / name).read_text(encoding="utf-8") for name in ("calibration.txt", "verify_en.txt",
                                                                     "verify_code.txt")]
    ids: list[int] = []
    while len(ids) < n:
        for text in texts:
            ids += model.encode(text + "\n\n")
    return ids[:n]


def summarize(values: list[float]) -> dict[str, float]:
    """median / min / max, the figures llama-bench-style tables show."""
    if not values:
        raise ValueError("no measurements")
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


@dataclass
class BenchResult:
    bundle: str
    provider: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    load_s: float
    size_mb: float
    peak_rss_mb: float
    ttft_s: dict = field(default_factory=dict)
    prefill_tps: dict = field(default_factory=dict)
    decode_tps: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def bench(bundle: str | Path, *, prompt_tokens: int = 512, new_tokens: int = 128, runs: int = 5,
          threads: int | None = None, provider: str = "auto", progress=None) -> BenchResult:
    from . import runtime
    from .runtime.generate import Stats, StopRule, generate
    from .runtime.sampling import Sampler, SamplingParams

    if runs < 1 or prompt_tokens < 1 or new_tokens < 1:
        raise GenerationError(f"runs, prompt tokens and new tokens must be >= 1 (got {runs}, {prompt_tokens}, "
                              f"{new_tokens}).", "pass positive values.")
    t0 = time.perf_counter()
    model = runtime.load(bundle, provider=provider, threads=threads)
    load_s = time.perf_counter() - t0
    if prompt_tokens + new_tokens > model.context:
        raise GenerationError(f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the bundle's context "
                              f"({model.context}).", "lower --prompt-tokens or --new-tokens.")
    prompt = real_prompt_tokens(model, prompt_tokens)
    ttft, prefill, decode = [], [], []
    for i in range(runs + 1):  # run 0 is the warm-up
        model.reset()
        stats = Stats()
        n = sum(1 for _ in generate(model.engine, prompt, Sampler(SamplingParams()),
                                    StopRule(new_tokens, frozenset()), stats))
        if n != new_tokens:  # pragma: no cover - generate honours max_new_tokens exactly without stop ids
            raise GenerationError(f"run {i} produced {n} tokens instead of {new_tokens}.", "report this.")
        if i:
            ttft.append(stats.ttft_s)
            prefill.append(stats.prefill_tps)
            decode.append(stats.decode_tps)
        if progress:
            progress(i, runs)
    model.reset()
    size = sum(p.stat().st_size for p in Path(bundle).iterdir() if p.is_file()) / 2**20
    return BenchResult(bundle=str(bundle), provider=model.provider, threads=model.session_info.threads,
                       prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs, load_s=round(load_s, 3),
                       size_mb=round(size, 1), peak_rss_mb=round(runtime.peak_rss_mb(), 1),
                       ttft_s=summarize(ttft), prefill_tps=summarize(prefill), decode_tps=summarize(decode))
