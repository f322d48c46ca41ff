"""The bundle: the one contract between the export half and the runtime half.

A bundle is a folder holding ``model.onnx`` (+ ``model.onnx.data``), the tokenizer, generation defaults, a
``genai_config.json`` and ``model.genai.onnx`` (fast bundles: so onnxruntime-genai runs the same folder and
weights) and our manifest ``edgeqwen.json``. The
manifest records everything the runtime needs to drive the graph without reading it (I/O names, KV layout,
context length), where it came from (source + sha256, profile, tool versions) and the sha256 of every file,
checked on load so a truncated copy to an SD card fails loudly instead of producing garbage.

Standard library only: the runtime on a board imports this.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import BundleError

MANIFEST = "edgeqwen.json"
FORMAT = "edgeqwen-bundle"
FORMAT_VERSION = 1


def is_count(value: Any, minimum: int = 1) -> bool:
    """An int (not a bool, which Python counts as one) of at least ``minimum``: sizes, counts, versions."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass
class ModelSpec:
    """Shape facts of the graph that the decode loop needs."""

    arch: str  # qwen2 | qwen3
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int  # what this bundle was built and verified for (<= model's max positions)
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None


@dataclass
class GraphIO:
    """Names and conventions of the ONNX graph's inputs and outputs."""

    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str | None = None  # the fast (GQA) graph derives positions from the mask
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"
    logits: str = "logits"
    kv_layout: str = "batch,kv_heads,seq,head_dim"
    shared_kv_buffer: bool = True  # GQA: past and present may be one buffer, written in place
    logits_last_only: bool = True  # the lm_head is pruned to the last position ...
    logits_window: int = 1  # ... or to the last n when a run has n <= logits_window tokens (prompt lookup)
    io_dtype: str = "float32"  # float32 | float16


@dataclass
class Manifest:
    format: str
    format_version: int
    name: str
    backend: str  # fast | portable
    precision: str  # int4 | int8 | fp16 | fp32
    spec: ModelSpec
    io: GraphIO
    profile: dict[str, Any]
    source: dict[str, Any]
    quantization: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {sha256, size}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        try:
            d = dict(d)
            d["spec"] = ModelSpec(**d["spec"])
            d["io"] = GraphIO(**d["io"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise BundleError(f"The bundle manifest is malformed ({e}).",
                              "re-export the bundle with this edgeqwen version.") from e


def sha256_file(path: Path, chunk: int = 8 << 20, on_chunk: Callable[[int], Any] | None = None) -> str:
    """Hash in fixed-size chunks (constant memory on a board); ``on_chunk(n)`` feeds a progress bar."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_chunk is not None:
                on_chunk(len(block))
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file except the manifest itself."""
    table = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and p.name != MANIFEST:
            table[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return table


def is_bundle(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path | str) -> Manifest:
    folder = Path(folder)
    if not folder.exists():
        raise BundleError(f"Bundle folder {folder} does not exist.",
                          "pass the folder written by `edgeqwen export ... -o FOLDER`.")
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} is not an edgeqwen bundle (no {MANIFEST}).",
                          "pass the folder written by `edgeqwen export`, or export one first.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is unreadable or not JSON ({e}).", "re-export or re-copy the bundle.") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        what = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise BundleError(f"{path} is not an edgeqwen manifest (format={what!r}).", "re-export the bundle.")
    version = data.get("format_version", 0)
    if not is_count(version, 0):
        raise BundleError(f"{path} has format_version={version!r}, not an integer >= 0.", "re-export the bundle.")
    _check_file_table(path, data.get("files"))
    if version > FORMAT_VERSION:
        raise BundleError(
            f"The bundle uses format version {data.get('format_version')}, newer than this edgeqwen "
            f"understands ({FORMAT_VERSION}).", "upgrade edgeqwen: pip install -U edgeqwen.")
    return Manifest.from_dict(data)


# files the runtime (or onnxruntime, for the weights) reads when they are there: each must be covered by a
# checksum, so a template or config dropped into a bundle after export cannot change what it does unseen
RUNTIME_FILES = ("model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "chat_template.jinja")
REQUIRED_FILES = ("model.onnx", "tokenizer.json")


def _check_file_table(path: Path, files: Any) -> None:
    """The manifest's ``files``: a table of name -> {sha256: hex string, size: bytes}, listing the required files."""
    fix = "re-export the bundle (the manifest was edited or written by another tool)."
    if not isinstance(files, dict):
        raise BundleError(f"{path} has no file table ('files' is {type(files).__name__}).", fix)
    for name, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str)
                and is_count(info.get("size"), 0)):
            raise BundleError(f"{path}: the entry for {name!r} needs a sha256 string and a size, got {info!r:.100}.",
                              fix)
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise BundleError(f"{path} does not list {', '.join(missing)}, so the bundle cannot be checked.", fix)


def verify_files(folder: Path | str, manifest: Manifest, *, checksums: bool = True) -> None:
    """Check presence and size of every listed file, and (by default) its sha256."""
    folder = Path(folder)
    unlisted = [n for n in RUNTIME_FILES if n not in manifest.files and (folder / n).is_file()]
    if unlisted:
        raise BundleError(f"{folder} holds {', '.join(unlisted)}, which its manifest does not list (added or "
                          "renamed after export), so no checksum covers what the runtime would read.",
                          "remove the file(s), or re-export the bundle.")
    for name, info in manifest.files.items():
        p = folder / name
        if not p.is_file():
            raise BundleError(f"Bundle file {name} is missing from {folder}.",
                              "copy the whole bundle folder again, or re-export it.")
        size = p.stat().st_size
        if size != info["size"]:
            raise BundleError(f"Bundle file {name} has {size} bytes, the manifest says {info['size']} "
                              "(truncated or modified copy).", "copy the bundle folder again, or re-export it.")
        if checksums and sha256_file(p) != info["sha256"]:
            raise BundleError(f"Bundle file {name} is damaged: its sha256 does not match the manifest.",
                              "copy the bundle folder again, or re-export it.")


def load_bundle(folder: Path | str, *, verify: bool = True) -> Manifest:
    manifest = read_manifest(folder)
    verify_files(folder, manifest, checksums=verify)
    return manifest


def work_dir(parent: Path | str | None, prefix: str) -> Path:
    """A fresh temporary folder ``{prefix}{pid}-XXXX`` in ``parent`` (default: the system's temp folder).

    Ctrl-C and SIGTERM unwind and remove their folders; a process killed outright (the OOM killer while a
    1.5B exports on a small board, SIGKILL) cannot. So the pid goes into the name, and earlier folders
    whose process no longer exists are removed first: a failed export does not leave gigabytes behind for
    good.
    """
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    for old in parent.glob(f"{prefix}*-*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows: never clean up there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


class AtomicFolder:
    """Write a folder under a temporary name beside its target and rename it into place only at the end.

    Refuses to replace an existing folder that is not a bundle, and replaces a bundle only with ``force``,
    so a typo in ``-o`` never deletes someone's work and an interrupted export never leaves half a bundle.
    """

    def __init__(self, target: Path | str, *, force: bool = False):
        self.target = Path(target).resolve()
        self.force = force
        self.tmp: Path | None = None

    def check_target(self) -> None:
        t = self.target
        if os.path.ismount(t):
            raise BundleError(f"Output folder {t} is a mount point; the finished bundle is renamed into place, "
                              "which a mount point cannot be.", f"write into a subfolder, e.g. -o {t / 'bundle'}.")
        if t.exists():
            if t.is_file():
                raise BundleError(f"Output path {t} is a file.", "choose a folder path for -o.")
            if any(t.iterdir()):
                if not is_bundle(t):
                    raise BundleError(f"Output folder {t} exists and is not an edgeqwen bundle; refusing to "
                                      "overwrite it.", "choose an empty or new folder for -o.")
                if not self.force:
                    raise BundleError(f"Output folder {t} already holds a bundle.",
                                      "pass --force to replace it, or choose another -o folder.")

    def __enter__(self) -> Path:
        self.check_target()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = work_dir(self.target.parent, f".{self.target.name}.partial-")
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        try:
            # mkdtemp creates 0700; a bundle is meant to be copied and shared, so give it ordinary permissions
            os.chmod(self.tmp, 0o755)
            for p in self.tmp.iterdir():
                if p.is_file():
                    os.chmod(p, 0o644)
            if self.target.exists():
                old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
                os.replace(self.target, old)
            os.replace(self.tmp, self.target)
        except OSError as e:  # the export itself is done: keep it and say where it is
            if old is not None and not self.target.exists():
                os.replace(old, self.target)  # put the previous bundle back
                old = None
            raise BundleError(f"The finished bundle could not be moved to {self.target} ({e}); it is complete in "
                              f"{self.tmp}.", f"move {self.tmp} where you want it, or choose another -o.") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Fill the file table from what is on disk, then write the manifest last."""
    manifest.files = file_table(folder)
    (Path(folder) / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
