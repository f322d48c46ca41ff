"""Device profiles: what a target board can run, and how a bundle should be built for it.

A profile is a flat TOML file in ``devices/`` (shipped as ``edgeqwen.devices`` package data). The exporter
reads it to choose precision, quantization and graph flavour; the runtime reads it to choose execution
providers and threads; and the bundle manifest records it so a bundle always says what it was tuned for.

This module is shared by the lean runtime, so it imports only the standard library (plus ``tomli`` on
Python 3.10). Host facts (:func:`detect_host`) live in :mod:`edgeqwen.hostinfo` for the same reason and
are re-exported here.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from .errors import ProfileError
from .hostinfo import HostInfo, detect_host

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

__all__ = [
    "PROVIDER_NAMES", "PROVIDER_PACKAGES", "PROFILE_KEYS", "BACKENDS", "PRECISIONS", "QUANT_ALGOS",
    "GGUF_MODES", "BLOCK_SIZES", "IO_DTYPES", "HostInfo", "Profile", "detect_host", "list_profiles",
    "load_profile", "resolve_host_profile", "with_overrides", "kv_cache_bytes", "check_memory_budget",
]

# Short names keep TOML files and CLI flags readable; onnxruntime wants the long ones.
PROVIDER_NAMES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
}

# What to tell a user whose onnxruntime lacks a provider. The plain wheel ships cpu (and coreml on macOS,
# xnnpack/nnapi only in the Android package), so the notes say when a custom build is the way.
PROVIDER_PACKAGES: dict[str, str] = {
    "cpu": "onnxruntime",
    "cuda": "onnxruntime-gpu",
    "dml": "onnxruntime-directml",
    "qnn": "onnxruntime-qnn",
    "coreml": "onnxruntime (the macOS wheel includes CoreML)",
    "webgpu": "onnxruntime (a build with --use_webgpu; not in the default PyPI wheel)",
    "xnnpack": "onnxruntime (a build with --use_xnnpack, or the onnxruntime-android package)",
    "nnapi": "onnxruntime (the onnxruntime-android package, or a build with --use_nnapi)",
}

BACKENDS = ("fast", "portable")
PRECISIONS = ("int4", "int8", "fp16", "fp32")
QUANT_ALGOS = ("rtn", "k_quant", "hqq", "gptq")
GGUF_MODES = ("fast", "balanced", "faithful")
BLOCK_SIZES = (16, 32, 64, 128, 256)
IO_DTYPES = ("fp32", "fp16")
CONTEXT_RANGE = (256, 131072)
MIN_RAM_BUDGET_MB = 256

PROFILE_KEYS = (
    "name", "description", "providers", "backend", "precision", "quant_algo", "gguf_mode", "block_size",
    "block_size_8bit", "accuracy_level", "exact_accuracy_level", "accuracy_levels", "eight_bit", "vocab_refine", "vocab_bits",
    "smooth_alpha", "io_dtype", "context", "threads", "ram_budget_mb", "provider_options",
)
# Keys a manifest dict carries besides the schema (see Profile.to_dict).
_MANIFEST_EXTRA_KEYS = ("source", "host")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MB = 1024 * 1024

# How much of a machine's RAM the host profile lets a model use, and the most it will ever claim:
# the rest is for the OS and the application; beyond 16 GB no model this SDK exports needs more.
_HOST_RAM_FRACTION = 0.6
_HOST_RAM_CAP_MB = 16384


# --------------------------------------------------------------------------------------------------------
# Field checkers: each takes (key, value, source) and returns the normalised value or raises ProfileError.


def _bad_value(key: str, value: Any, allowed: str, source: str, fix: str | None = None) -> ProfileError:
    return ProfileError(
        f"Profile key '{key}' has invalid value {value!r} (in {source}); allowed: {allowed}.",
        fix or f"set {key} to one of the allowed values in the profile, or pass a valid override.",
    )


def _choice(options: tuple[Any, ...]) -> Callable[[str, Any, str], Any]:
    def check(key: str, value: Any, source: str) -> Any:
        norm = value.strip().lower() if isinstance(value, str) else value
        if isinstance(norm, str) and any(isinstance(o, int) for o in options) and norm.isdigit():
            norm = int(norm)  # CLI overrides may arrive as text
        if isinstance(norm, bool) or norm not in options:
            raise _bad_value(key, value, ", ".join(str(o) for o in options), source)
        return norm

    return check


def _int_range(lo: int, hi: int | None) -> Callable[[str, Any, str], int]:
    def check(key: str, value: Any, source: str) -> int:
        num: Any = value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            num = int(value)
        allowed = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
        if isinstance(num, bool) or not isinstance(num, int) or num < lo or (hi is not None and num > hi):
            raise _bad_value(key, value, allowed, source)
        return num

    return check


def _float_range(lo: float, hi: float) -> Callable[[str, Any, str], float]:
    def check(key: str, value: Any, source: str) -> float:
        num: Any = value
        if isinstance(value, str):
            try:
                num = float(value)
            except ValueError:
                pass
        if isinstance(num, bool) or not isinstance(num, (int, float)) or not lo <= num <= hi:
            raise _bad_value(key, value, f"a number from {lo:g} to {hi:g}", source)
        return float(num)

    return check


def _check_name(key: str, value: Any, source: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        allowed = "letters, digits, '.', '_' or '-', starting with a letter or digit"
        raise _bad_value(key, value, allowed, source)
    return value


def _check_text(key: str, value: Any, source: str) -> str:
    if not isinstance(value, str):
        raise _bad_value(key, value, "a string", source)
    return value


def _check_providers(key: str, value: Any, source: str) -> tuple[str, ...]:
    allowed = ", ".join(PROVIDER_NAMES)
    items = value.split(",") if isinstance(value, str) else value  # "cuda,cpu" from a CLI flag
    if not isinstance(items, (list, tuple)) or not items:
        raise _bad_value(key, value, f"a non-empty list of provider names ({allowed})", source)
    long_to_short = {v.lower(): k for k, v in PROVIDER_NAMES.items()}
    out: list[str] = []
    for item in items:
        short = item.strip().lower() if isinstance(item, str) else item
        short = long_to_short.get(short, short) if isinstance(short, str) else short
        if not isinstance(short, str) or short not in PROVIDER_NAMES:
            raise _bad_value(key, item, allowed, source)
        if short in out:
            raise _bad_value(key, value, f"each of {allowed} at most once", source,
                             f"list '{short}' only once in providers.")
        out.append(short)
    return tuple(out)


_EIGHT_BIT_RE = re.compile(r"^(lm_head|(layers\.\d+\.)?(attn|mlp)\.(qkv_proj|o_proj|gate_proj|up_proj|down_proj)?)$")
# What the int4 profiles keep at 8 bits, from benchmarks/sensitivity.py on Qwen2.5-Coder-0.5B: attention is
# ~12% of the weights, and the gate projections carry most of the rest of int4's loss (SiLU(gate) multiplies
# the up projection, so its error is amplified). "measured" adds the layers the model's catalog entry lists
# as most sensitive (layer indices are per model, so they cannot live in a device profile). "lm_head" keeps
# the vocabulary matrix (lm_head, and the embedding when they are shared) at 8 bits: 4 bits saves 63 MiB on
# the 0.5B and keeps the perplexity ratio <= 1.04, but top-1 agreement on English drops 92.6% -> 84.6%.
MEASURED = "measured"
DEFAULT_EIGHT_BIT = ("attn.", "mlp.gate_proj", "lm_head", MEASURED)
# An 8-bit vocabulary matrix in an int4 bundle is stored as two 4-bit halves that sum to it exactly (a 4-bit and
# a 2-bit part at `vocab_bits` = 6, below); each step the lm_head reads the coarse half (half the bytes of 8
# bits; still ~4 ms of a ~24 ms decode step on the 0.5B, memory-bound) and rescores its best `vocab_refine`
# candidates with the whole 8-bit rows. Measured (benchmarks/quality.py, 0.5B): 128 gives the perplexity
# ratios of the plain 8-bit lm_head (within 0.004), 64 lets English drift by 0.009,
# 1024 costs ~1.5 ms a step; top-1 agreement is the same for all. 0 keeps a plain 8-bit lm_head.
# That matrix is re-coded at `block_size_8bit` before the split (not in "faithful" GGUF imports): the coarse
# half's per-32 fp32 scales were a fifth of its bytes (151,936 x 896 at M = 1: 2.5 ms at block 32, 1.9 ms at
# 128); measured on the 0.5B, a step is ~1.1 ms shorter, the bundle 21 MiB smaller, the ratios within noise.
DEFAULT_VOCAB_REFINE = 128
# `vocab_bits` = 6 re-codes that matrix at 6 bits (symmetric, block `block_size_8bit`) before the split: the
# coarse half is the same 4 bits, the residual 2 bits, so the bundle is 34 MB smaller on the 0.5B (458.0 ->
# 425.6 MiB, the one default-quality way under 450 MB; llama.cpp's Q4_K_M keeps its output matrix at 6 bits
# too) at no speed cost; quality.py: ratios 1.013/1.013/1.034/1.008 -> 1.030/1.013/1.039/1.015, agreement
# 0.4-1.0 points lower. 8 keeps an 8-bit matrix; "faithful" GGUF imports ignore this key (exact Q8_0 codes).
VOCAB_BITS = (6, 8)
DEFAULT_VOCAB_BITS = 6
# The body weights an int4 profile keeps at 8 bits get wider blocks than the 4-bit ones: at 8 bits a block of
# 128 still rounds ~16x finer than int4, while per-32 scales and zero points (per-16 for Q6_K copies) add
# 16-31% to those weights' bytes and slow the kernel (MatMulNBits 896x4864, 2 threads: 0.10 ms at block 32,
# 0.07 ms at 128). Measured on the 0.5B default (benchmarks/README.md): decode 40.2 -> 44.7 tok/s, 513.7 ->
# 480.5 MiB, perplexity ratios +0.003..0.008 against exact copies of the GGUF's blocks.
DEFAULT_BLOCK_SIZE_8BIT = 128
# SmoothQuant strength for the attention input (export/smooth.py): accuracy level 4 rounds each matmul's input
# to int8 per block, and the q/k/v projection's input (RMSNorm output, with Qwen's few huge channels) is where
# that costs (sensitivity.py --by activation). Its q/k/v weights, refit at 8 bits in int4 bundles, take over
# those channels' range; 0 turns it off. Measured on the 0.5B: see benchmarks/README.md.
DEFAULT_SMOOTH_ALPHA = 0.5
VOCAB_REFINE_MAX = 1024


def _check_eight_bit(key: str, value: Any, source: str) -> tuple[str, ...]:
    allowed = ("'measured' (the catalog model's most sensitive layers), 'lm_head' (the vocabulary matrix) "
               "and weight-name patterns such as 'attn.', 'mlp.gate_proj', 'layers.23.mlp.' (attn|mlp, optionally "
               "qkv_proj|o_proj|gate_proj|up_proj|down_proj, optionally after layers.N.)")
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise _bad_value(key, value, "a list of " + allowed, source)
    out = []
    for item in items:
        norm = item.strip() if isinstance(item, str) else item
        if not isinstance(norm, str) or not (norm == MEASURED or _EIGHT_BIT_RE.match(norm)):
            raise _bad_value(key, item, allowed, source)
        out.append(norm)
    return tuple(dict.fromkeys(out))


# Layer types ``accuracy_levels`` may set a level for: the fast graph's weight kinds (``attn.qkv_proj``, ...),
# the two groups, and the vocabulary matrix. A kind beats its group (``mlp.down_proj`` over ``mlp``).
LAYER_TYPES = ("attn", "mlp", "qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _check_accuracy_levels(key: str, value: Any, source: str) -> dict[str, int]:
    """A table layer type -> accuracy level, or its command-line form ``"down_proj=0,lm_head=4"``."""
    allowed = f"a table of layer type = level (0-4), layer types: {', '.join(LAYER_TYPES)}; e.g. {{ down_proj = 0 }}"
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            kind, sep, level = item.partition("=")
            if not sep or not level.strip().isdigit():
                raise _bad_value(key, item, allowed, source, "write each entry as TYPE=LEVEL, e.g. down_proj=0.")
            pairs[kind.strip()] = int(level)
        value = pairs
    if not isinstance(value, dict):
        raise _bad_value(key, value, allowed, source)
    out: dict[str, int] = {}
    for kind, level in value.items():
        if kind not in LAYER_TYPES:
            close = difflib.get_close_matches(str(kind), LAYER_TYPES, n=1)
            raise _bad_value(f"{key}.{kind}", kind, allowed, source,
                             f"use one of {', '.join(LAYER_TYPES)}" + (f" (did you mean '{close[0]}'?)." if close else "."))
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 4:
            raise _bad_value(f"{key}.{kind}", level, "an accuracy level 0-4", source)
        out[kind] = level
    return out


def _check_provider_options(key: str, value: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise _bad_value(key, value, "a table of tables, e.g. [provider_options.cuda]", source)
    out: dict[str, dict[str, Any]] = {}
    for prov, opts in value.items():
        if prov not in PROVIDER_NAMES:
            raise _bad_value(f"{key}.{prov}", prov, ", ".join(PROVIDER_NAMES), source)
        if not isinstance(opts, dict):
            raise _bad_value(f"{key}.{prov}", opts, "a table of option = value", source)
        for opt, val in opts.items():
            if not isinstance(val, (str, int, bool)):  # bool is an int; floats and tables are not
                raise _bad_value(f"{key}.{prov}.{opt}", val, "a string, integer or boolean", source)
        out[prov] = dict(opts)
    return out


_CHECKS: dict[str, Callable[[str, Any, str], Any]] = {
    "name": _check_name,
    "description": _check_text,
    "providers": _check_providers,
    "backend": _choice(BACKENDS),
    "precision": _choice(PRECISIONS),
    "quant_algo": _choice(QUANT_ALGOS),
    "gguf_mode": _choice(GGUF_MODES),
    "block_size": _choice(BLOCK_SIZES),
    "block_size_8bit": _choice(BLOCK_SIZES),
    "accuracy_level": _int_range(0, 4),
    "exact_accuracy_level": _int_range(0, 4),
    "accuracy_levels": _check_accuracy_levels,
    "eight_bit": _check_eight_bit,
    "vocab_refine": _int_range(0, VOCAB_REFINE_MAX),
    "vocab_bits": _choice(VOCAB_BITS),
    "smooth_alpha": _float_range(0.0, 1.0),
    "io_dtype": _choice(IO_DTYPES),
    "context": _int_range(*CONTEXT_RANGE),
    "threads": _int_range(0, None),
    "ram_budget_mb": _int_range(MIN_RAM_BUDGET_MB, None),
    "provider_options": _check_provider_options,
}


def _reject_unknown_keys(keys: Any, source: str, extra: tuple[str, ...] = (), what: str = "key") -> None:
    allowed = PROFILE_KEYS + extra
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ProfileError(
                f"Unknown profile {what} '{key}' (in {source}); allowed keys: {', '.join(allowed)}.",
                f"remove '{key}' or correct its spelling{hint}.",
            )


# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A validated device profile. Every instance is valid: ``__post_init__`` normalises and checks it,
    so code that receives a Profile (exporter, runtime, manifest) never re-validates.

    Defaults mirror ``devices/host.toml``, so a custom profile only needs the keys it changes.
    """

    name: str
    description: str = ""
    providers: tuple[str, ...] = ("cpu",)
    backend: str = "fast"
    precision: str = "int4"
    quant_algo: str = "gptq"
    gguf_mode: str = "balanced"
    block_size: int = 32
    block_size_8bit: int = DEFAULT_BLOCK_SIZE_8BIT  # int4 bundles: block of the weights kept at 8 bits
    accuracy_level: int = 4
    # int8 and "faithful" bundles, which promise the source's values: 0 (float activations) keeps that
    # promise in the arithmetic too; 4 rounds activations to int8 like int4 bundles, ~2.4x faster decode.
    exact_accuracy_level: int = 0
    # Per layer type, replacing the level above for those weights (int4 and exact bundles alike); see the
    # builtin profiles for what was measured. Empty: one level for the whole bundle.
    accuracy_levels: dict[str, int] = field(default_factory=dict, hash=False)
    eight_bit: tuple[str, ...] = DEFAULT_EIGHT_BIT  # int4 bundles: weights matching these stay 8-bit
    vocab_refine: int = DEFAULT_VOCAB_REFINE  # int4 + 8-bit vocabulary: candidates rescored at 8 bits
    vocab_bits: int = DEFAULT_VOCAB_BITS  # int4 + refined vocabulary: 8, or 6 (4-bit coarse + 2-bit residual)
    smooth_alpha: float = DEFAULT_SMOOTH_ALPHA  # int4: SmoothQuant strength for the q/k/v input (0: off)
    io_dtype: str = "fp32"
    context: int = 4096
    threads: int = 0
    ram_budget_mb: int = 4096
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    source: str = "custom"
    host: HostInfo | None = None

    def __post_init__(self) -> None:
        for key, check in _CHECKS.items():
            object.__setattr__(self, key, check(key, getattr(self, key), self.source))
        self._check_combination()

    def _check_combination(self) -> None:
        """Rules across keys: combinations that would export fine and then fail or crawl on the device."""
        src = self.source
        if self.backend == "portable" and self.precision == "int4":
            raise ProfileError(
                f"Profile '{self.name}' (in {src}) combines backend = 'portable' with precision = 'int4'; "
                "portable graphs use standard ONNX ops only, and int4 needs the MatMulNBits contrib op.",
                "use precision = 'int8' (or fp16/fp32) with the portable backend, or backend = 'fast' "
                "for int4 on CPU/CUDA/DirectML.",
            )
        if self.backend == "fast" and self.precision == "fp16" and self.io_dtype != "fp16":
            # the builder's float graph takes the I/O type: this bundle would hold fp32 weights labelled fp16
            raise ProfileError(
                f"Profile '{self.name}' (in {src}) sets precision = 'fp16' with io_dtype = '{self.io_dtype}'; the "
                "fast graph's float weights follow its I/O type, so allowed precision here: int4, int8, fp32.",
                "use precision 'fp32' (or int8/int4) on this profile, or a profile with io_dtype = 'fp16' (cuda, "
                "windows-dml, jetson-orin-nano) for fp16 weights.",
            )
        if self.io_dtype == "fp16" and self.providers[0] == "cpu":
            raise ProfileError(
                f"Profile '{self.name}' (in {src}) sets io_dtype = 'fp16' with 'cpu' as the first provider; "
                "allowed io_dtype for a CPU-first profile: fp32 (CPU kernels want fp32 inputs/outputs).",
                "set io_dtype = 'fp32', or put a GPU provider (cuda, dml, webgpu) first in providers.",
            )
        extra = [p for p in self.provider_options if p not in self.providers]
        if extra:
            raise ProfileError(
                f"Profile '{self.name}' (in {src}) has provider_options for {', '.join(extra)}, "
                f"which is not in providers; allowed: {', '.join(self.providers)}.",
                f"add {', '.join(extra)} to providers or delete its [provider_options.*] table.",
            )

    def ort_providers(self) -> list[str]:
        """onnxruntime provider names, in fallback order."""
        return [PROVIDER_NAMES[p] for p in self.providers]

    def ort_provider_options(self) -> list[dict[str, str]]:
        """Per-provider option dicts aligned with :meth:`ort_providers`. onnxruntime's Python binding
        takes option values as strings, so booleans become "1"/"0" here rather than in every caller."""
        def as_str(v: Any) -> str:
            return ("1" if v else "0") if isinstance(v, bool) else str(v)

        return [{k: as_str(v) for k, v in self.provider_options.get(p, {}).items()} for p in self.providers]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for the bundle manifest; includes ``source`` and, for the host profile, the
        detected machine so a bundle records where it was tuned."""
        out: dict[str, Any] = {k: getattr(self, k) for k in PROFILE_KEYS}
        out["providers"] = list(self.providers)
        out["eight_bit"] = list(self.eight_bit)
        out["provider_options"] = {p: dict(o) for p, o in self.provider_options.items()}
        out["accuracy_levels"] = dict(self.accuracy_levels)
        out["source"] = self.source
        if self.host is not None:
            host = asdict(self.host)
            host["isa"] = list(self.host.isa)
            out["host"] = host
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        """Inverse of :meth:`to_dict`; validates like a TOML file (a manifest may be hand-edited)."""
        if not isinstance(d, dict):
            raise ProfileError(f"A profile must be a mapping, got {type(d).__name__}.",
                               "pass the dict produced by Profile.to_dict().")
        source = str(d.get("source", "dict"))
        _reject_unknown_keys(d, source, _MANIFEST_EXTRA_KEYS)
        if "name" not in d:
            raise ProfileError(f"Profile dict (from {source}) has no 'name'.", "add name = \"<device>\".")
        kwargs = {k: d[k] for k in PROFILE_KEYS if k in d}
        host = d.get("host")
        if host is not None:
            try:
                host = HostInfo(**{**host, "isa": tuple(host.get("isa", ()))})
            except (TypeError, AttributeError) as exc:
                raise ProfileError(f"Profile dict (from {source}) has a malformed 'host' entry: {exc}.",
                                   "remove 'host' or regenerate it with Profile.to_dict().") from exc
        return cls(**kwargs, source=source, host=host)


# --------------------------------------------------------------------------------------------------------
# Loading


@lru_cache(maxsize=1)
def _builtin_files() -> dict[str, Any]:
    """Map builtin profile name -> Traversable. Installed wheels carry the TOMLs as ``edgeqwen.devices``
    package data; a source checkout (pyproject's package-dir mapping not applied) has them in ``devices/``
    next to the package, so fall back to that."""
    found: dict[str, Any] = {}
    try:
        from importlib.resources import files

        for entry in files("edgeqwen.devices").iterdir():
            if entry.name.endswith(".toml") and entry.is_file():
                found[entry.name[: -len(".toml")]] = entry
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
        found = {}
    if not found:
        repo_devices = Path(__file__).resolve().parent.parent / "devices"
        if repo_devices.is_dir():
            found = {p.stem: p for p in repo_devices.glob("*.toml")}
    return found


def list_profiles() -> list[str]:
    """Builtin profile names, sorted; ``host`` (this machine) is always among them."""
    return sorted(set(_builtin_files()) | {"host"})


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(
            f"Profile {source} is not valid TOML: {exc}.",
            "fix the syntax (flat key = value lines, [provider_options.<provider>] tables).",
        ) from exc


def _read_raw(name_or_path: str) -> tuple[dict[str, Any], str, bool]:
    """Return (raw TOML dict, source label, is_builtin)."""
    builtins = _builtin_files()
    looks_like_path = name_or_path.endswith(".toml") or "/" in name_or_path or "\\" in name_or_path
    if not looks_like_path and name_or_path in builtins:
        label = f"builtin:{name_or_path}"
        return _parse_toml(builtins[name_or_path].read_text(encoding="utf-8"), label), label, True
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"Cannot read profile file {path}: {exc}.",
                               "check the path and permissions.") from exc
        except UnicodeDecodeError as exc:  # TOML is UTF-8; e.g. a UTF-16 file saved by Windows Notepad
            raise ProfileError(f"Profile file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).",
                               "save it as UTF-8 (TOML files must be UTF-8).") from exc
        raw = _parse_toml(text, str(path))
        raw.setdefault("name", path.stem)
        return raw, str(path), False
    if looks_like_path:
        raise ProfileError(f"Profile file {name_or_path} does not exist.",
                           f"check the path, or use a builtin profile: {', '.join(list_profiles())}.")
    raise ProfileError(
        f"Unknown device profile '{name_or_path}'; available: {', '.join(list_profiles())}.",
        "pick one of those names, or pass a path to your own .toml profile.",
    )


def _host_facts(base: dict[str, Any], host: HostInfo) -> dict[str, Any]:
    """Fill the machine-dependent keys of the host profile from what detect_host() found."""
    notes = []
    if host.arch in ("x86_64", "x86") and "avx2" not in host.isa:
        notes.append("no AVX2: int4 kernels fall back to slower paths, expect lower speed")
    if host.arch in ("aarch64", "arm64") and "asimddp" not in host.isa:
        notes.append("no dotprod: int8-activation kernels run without SDOT, expect lower speed")
    if host.ram_mb > 0:
        budget = min(int(host.ram_mb * _HOST_RAM_FRACTION), _HOST_RAM_CAP_MB)
        budget = max(budget, MIN_RAM_BUDGET_MB)
    else:
        budget = int(base.get("ram_budget_mb", 4096))
        notes.append(f"total RAM unknown, budget defaults to {budget} MB")
    isa = " ".join(host.isa) or "baseline"
    desc = (f"This machine: {host.cpu_model} ({host.arch}, {host.cores} cores, ISA: {isa}), "
            f"{host.ram_mb} MB RAM on {host.os}. Defaults: int4 weights with int8 activations (accuracy_level 4; "
            f"int8 bundles keep float activations), "
            f"{host.cores} threads, {int(_HOST_RAM_FRACTION * 100)}% of RAM as budget")
    desc += "; note: " + "; ".join(notes) + "." if notes else "."
    return {**base, "threads": max(host.cores, 1), "ram_budget_mb": budget, "description": desc}


def load_profile(name_or_path: str, **overrides: Any) -> Profile:
    """Load a builtin profile by name, or a ``.toml`` file by path, then apply ``overrides``.

    Overrides (e.g. ``precision="int8", context=2048``) come from CLI flags; ``None`` means "flag not
    given" and is ignored. They are validated exactly like file values, so a bad flag gets the same
    message as a bad file.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    raw, source, is_builtin = _read_raw(str(name_or_path))
    _reject_unknown_keys(raw, source)
    _reject_unknown_keys(given, "overrides", what="override")
    host = None
    if is_builtin and name_or_path == "host":
        host = detect_host()
        raw = _host_facts(raw, host)
    return Profile(**{**raw, **given}, source=source, host=host)


def resolve_host_profile() -> Profile:
    """The ``host`` profile: defaults from ``devices/host.toml`` with this machine's threads, RAM budget
    and description filled in."""
    return load_profile("host")


# --------------------------------------------------------------------------------------------------------
# Memory arithmetic


def kv_cache_bytes(num_layers: int, kv_heads: int, head_dim: int, context: int, dtype_bytes: int = 4) -> int:
    """Bytes of the K and V caches for batch 1 at full ``context`` (GQA: only the KV heads count)."""
    for key, val in (("num_layers", num_layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                     ("context", context), ("dtype_bytes", dtype_bytes)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ProfileError(f"kv_cache_bytes: {key} = {val!r} is invalid; allowed: a positive integer.",
                               f"pass a positive integer {key}.")
    return 2 * num_layers * kv_heads * head_dim * context * dtype_bytes


def check_memory_budget(profile: Profile, weight_bytes: int, kv_bytes: int, overhead_mb: int = 150,
                        context: int | None = None) -> None:
    """Refuse a bundle that would not fit the device, before spending minutes exporting it.

    ``kv_bytes`` is the KV cache at ``context`` tokens (default: the profile's context); the KV cache grows
    linearly with context, which is how the largest fitting context is computed for the message.
    """
    ctx = context or profile.context
    budget_mb = profile.ram_budget_mb
    weights_mb, kv_mb = weight_bytes / _MB, kv_bytes / _MB
    total_mb = weights_mb + kv_mb + overhead_mb
    if total_mb <= budget_mb:
        return
    room = budget_mb * _MB - weight_bytes - overhead_mb * _MB
    per_token = kv_bytes / ctx if ctx > 0 else 0
    fits = int(room // per_token) // 256 * 256 if per_token > 0 and room > 0 else 0
    fixes = []
    if fits >= CONTEXT_RANGE[0]:
        fixes.append(f"a smaller --context (at most {fits} fits)")
    else:
        fixes.append("a smaller --context will not help: the weights alone leave no room for the KV cache")
    if profile.backend == "fast" and profile.precision != "int4":
        fixes.append(f"--precision int4 (now {profile.precision})")
    elif profile.backend == "portable" and profile.precision != "int8":
        fixes.append(f"--precision int8 (now {profile.precision}; portable graphs cannot hold int4)")
    elif profile.backend == "portable":
        fixes.append("a fast-backend profile (e.g. --device rpi5) with --precision int4 if the device's provider "
                     "runs onnxruntime's contrib ops")
    fixes.append("a smaller model (e.g. 0.5B instead of 1.5B/3B)")
    fixes.append("or, if the device really has more free RAM, a custom profile with a larger ram_budget_mb")
    raise ProfileError(
        f"The model needs about {total_mb:,.0f} MB (weights {weights_mb:,.0f} MB + KV cache {kv_mb:,.0f} MB "
        f"at context {ctx} + overhead {overhead_mb} MB) but profile '{profile.name}' allows "
        f"ram_budget_mb = {budget_mb:,} MB.",
        "use " + ", ".join(fixes) + ".",
    )


def with_overrides(profile: Profile, **overrides: Any) -> Profile:
    """Return ``profile`` with ``overrides`` applied (``None`` ignored) and re-validated."""
    given = {k: v for k, v in overrides.items() if v is not None}
    _reject_unknown_keys(given, "overrides", what="override")
    return replace(profile, **given)

