"""Choosing an execution provider and building the onnxruntime session.

"auto" walks the bundle profile's provider list and takes the first one this onnxruntime build offers;
asking for a provider the installed wheel lacks falls back to CPU with one warning line naming the
package that brings it, because on a board the usual cause is having installed plain ``onnxruntime``.
"""

from __future__ import annotations

import ctypes
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from ..bundle import is_count
from ..errors import GenerationError, ProviderError
from ..hostinfo import detect_host
from ..profiles import PROVIDER_NAMES, PROVIDER_PACKAGES

# Contrib ops of the "fast" graph; providers that lack them would silently fall back op by op to the CPU.
FAST_GRAPH_PROVIDERS = {"cpu", "cuda", "dml", "webgpu"}


@dataclass
class SessionChoice:
    provider: str  # short name actually used
    ort_providers: list
    threads: int


def _short(name: str) -> str:
    name = name.lower()
    for short, full in PROVIDER_NAMES.items():
        if name in (short, full.lower()):
            return short
    raise ProviderError(f"Unknown execution provider {name!r}.",
                        f"use one of: auto, {', '.join(PROVIDER_NAMES)}.")


def choose_provider(requested: str, profile: dict, backend: str) -> str:
    """Resolve "auto" or a short name to a provider this onnxruntime build can run, with a CPU fallback."""
    available = set(ort.get_available_providers())
    order = list(profile.get("providers") or ["cpu"])
    if requested == "auto":
        found = next((p for p in order if PROVIDER_NAMES.get(p) in available), "cpu")
        first = order[0] if order else "cpu"
        if found == "cpu" and first != "cpu":  # a GPU/NPU bundle on plain onnxruntime: say so, and the fix
            pkg = PROVIDER_PACKAGES.get(first, "onnxruntime")
            warnings.warn(f"edgeqwen: {PROVIDER_NAMES.get(first, first)}, this bundle's first choice, is not in this "
                          f"onnxruntime build; running on CPU (install {pkg} to use {first}).", RuntimeWarning,
                          stacklevel=3)
        return found
    p = _short(requested)
    if backend == "fast" and p not in FAST_GRAPH_PROVIDERS:
        raise ProviderError(
            f"This bundle's graph uses onnxruntime contrib ops (GroupQueryAttention, MatMulNBits) that the {p} "
            "execution provider cannot run.",
            "export with a portable profile (e.g. --device apple-silicon or android-arm64) for that provider, "
            "or run this bundle with provider='cpu'.")
    if PROVIDER_NAMES[p] not in available:
        pkg = PROVIDER_PACKAGES.get(p, "onnxruntime")
        warnings.warn(f"edgeqwen: {PROVIDER_NAMES[p]} is not in this onnxruntime build; running on CPU "
                      f"(install {pkg} to use {p}).", RuntimeWarning, stacklevel=3)
        return "cpu"
    return p


def default_threads(profile: dict) -> int:
    """Intra-op threads when the caller names none: the profile's count, capped by this machine's cores.

    Physical cores, not logical CPUs: a second hyperthread on a core only contends for the same SIMD units
    that MatMulNBits saturates. ``detect_host`` also honours taskset masks and a cgroup quota (docker
    --cpus), and the cap matters because a bundle carries the count of the machine it was tuned on (a
    ``host`` export from a 16-core PC copied to a 4-core board).
    """
    cores = detect_host().cores
    wanted = int(profile.get("threads") or 0)
    return min(wanted, cores) if wanted > 0 else cores


def create_session(model_path: Path, provider: str, *, threads: int | None, profile: dict) -> tuple:
    """Build the InferenceSession; returns (session, SessionChoice)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None and not is_count(threads):
        raise GenerationError(f"threads must be a positive integer, got {threads!r}.",
                            "pass e.g. threads=4, or leave it out to use the machine's physical cores.")
    n = threads or default_threads(profile)
    opts.intra_op_num_threads = int(n)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    provider_opts = (profile.get("provider_options") or {}).get(provider, {})
    providers: list = [(PROVIDER_NAMES[provider], {k: str(v) for k, v in provider_opts.items()})]
    if provider != "cpu":
        providers.append("CPUExecutionProvider")
    try:
        sess = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types; turn them into one clear message
        raise ProviderError(f"onnxruntime could not load {model_path.name} on {provider}: {str(e).strip()[:400]}",
                            "check that the bundle is complete and onnxruntime is >= 1.20; re-export if needed."
                            ) from e
    return sess, SessionChoice(provider=provider, ort_providers=sess.get_providers(), threads=int(n))


_MADV_DONTNEED = 4  # Linux


def release_weight_pages(data_files: list[Path]) -> int:
    """Drop the resident pages of the unmodified mappings of ``data_files`` (the bundle's external weights).

    onnxruntime maps external weights from the file and, on the CPU, repacks most of them into its own
    buffers at load. The mappings it keeps (quantization scales and zero points, the vocabulary table that a
    Gather shares with the lm_head) stay resident after the repacking read them: on the 0.5B int4 bundle
    ~95 MiB of RSS that decoding mostly never reads. onnxruntime maps them private and writable but never
    writes them; ``madvise(MADV_DONTNEED)`` on such a mapping with no copied-on-write page (smaps'
    ``Anonymous: 0``) only forgets file pages, and whatever is read later faults back in from the page
    cache, so results are unchanged. A mapping holding any written page is left alone. Linux only (0
    elsewhere); returns the bytes of the mappings released.
    """
    if not sys.platform.startswith("linux"):
        return 0
    targets = {str(Path(p).resolve()) for p in data_files}
    spans, current = [], None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if not head:
                    continue
                if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
                    current = None
                    if len(head) == 6 and head[5].strip() in targets:
                        lo, hi = (int(x, 16) for x in head[0].split("-"))
                        current = [lo, hi - lo, True]
                        spans.append(current)
                elif current is not None and head[0] == "Anonymous:" and int(head[1]) != 0:
                    current[2] = False  # onnxruntime wrote to it (copy-on-write): those pages are its data
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    except (OSError, AttributeError, ValueError, IndexError):
        return 0
    return sum(size for lo, size, clean in spans if clean and madvise(lo, size, _MADV_DONTNEED) == 0)
