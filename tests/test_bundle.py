"""The bundle contract: a complete manifest, atomic writes, and loud failures on damaged or foreign folders."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from edgeqwen import runtime
from edgeqwen.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    AtomicFolder,
    load_bundle,
    read_manifest,
    sha256_file,
)
from edgeqwen.errors import BundleError
from edgeqwen.export import export

BUNDLE_FILES = {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "genai_config.json", "model.genai.onnx"}


# ------------------------------------------------------------------------------------------ the manifest


def test_manifest_is_complete(int4_bundle: Path, qwen2_untied: Path) -> None:
    data = json.loads((int4_bundle / MANIFEST).read_text())
    assert data["format"] == FORMAT and data["format_version"] == FORMAT_VERSION
    assert data["precision"] == "int4" and data["backend"] == "fast" and data["name"] == "qwen2_untied-int4"
    # every file but the manifest is listed with its real size and sha256
    on_disk = {p.name for p in int4_bundle.iterdir() if p.is_file() and p.name != MANIFEST}
    assert set(data["files"]) == on_disk and BUNDLE_FILES <= on_disk
    for name, info in data["files"].items():
        assert info == {"sha256": sha256_file(int4_bundle / name), "size": (int4_bundle / name).stat().st_size}

    tok = json.loads((qwen2_untied / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in tok}
    spec = data["spec"]
    assert spec == {"arch": "qwen2", "num_layers": 2, "num_heads": 4, "kv_heads": 2, "head_dim": 16,
                    "hidden_size": 64, "vocab_size": 512, "context_length": 512, "max_position_embeddings": 512,
                    "bos_token_id": ids["<|endoftext|>"], "eos_token_ids": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                    "pad_token_id": ids["<|endoftext|>"]}
    io = data["io"]
    assert io["input_ids"] == "input_ids" and io["logits"] == "logits" and io["io_dtype"] == "float32"
    assert io["past_key"] % 1 == "past_key_values.1.key" and io["present_value"] % 0 == "present.0.value"
    assert data["profile"]["name"] == "host" and data["profile"]["precision"] == "int4"
    assert data["source"]["kind"] == "hf_dir" and data["source"]["spec"] == str(qwen2_untied)
    assert "model builder" in data["source"]["graph_builder"]
    for tool in ("edgeqwen", "onnxruntime", "onnx", "onnxruntime-genai", "transformers", "torch"):
        assert data["tools"][tool], tool
    assert data["quantization"]["plan"]["precision"] == "int4" and data["quantization"]["tensors"]
    assert data["created"].endswith("+00:00")
    assert data["verification"] == {}  # exported with verify=False


def test_genai_config_matches_the_bundle(int4_bundle: Path) -> None:
    cfg = json.loads((int4_bundle / "genai_config.json").read_text())
    context = read_manifest(int4_bundle).spec.context_length
    assert context == 512  # the model's max positions cap the host profile's 4096
    assert cfg["search"]["max_length"] == context and cfg["model"]["context_length"] == context
    assert cfg["search"]["do_sample"] is False
    assert cfg["model"]["decoder"]["filename"] == "model.genai.onnx"  # last-position logits, same weights


def test_onnxruntime_genai_runs_the_bundle_and_agrees_with_our_runtime(int4_bundle: Path) -> None:
    """The bundle folder also runs in onnxruntime-genai (its graph variant declares one logits row)."""
    og = pytest.importorskip("onnxruntime_genai")
    from edgeqwen import runtime
    from edgeqwen.runtime.generate import StopRule, generate
    from edgeqwen.runtime.sampling import Sampler, SamplingParams

    model = runtime.load(int4_bundle, threads=1)
    ids = model.encode("the quick model runs on a small board with int4 weights, then it runs again")
    assert len(ids) > model.manifest.io.logits_window  # the prefill is longer than the logits window
    ours = list(generate(model.engine, ids, Sampler(SamplingParams()), StopRule(12, frozenset())))
    genai = og.Model(og.Config(str(int4_bundle)))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(ids) + 12, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = list(generator.get_sequence(0))[len(ids):]
    assert theirs[: len(ours)] == ours


def test_tokenizer_files_and_chat_template_travel_with_the_bundle(int4_bundle: Path, qwen2_untied: Path) -> None:
    assert (int4_bundle / "tokenizer.json").read_bytes() == (qwen2_untied / "tokenizer.json").read_bytes()
    tok_cfg = json.loads((int4_bundle / "tokenizer_config.json").read_text())
    source_cfg = json.loads((qwen2_untied / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == source_cfg["chat_template"]
    assert json.loads((int4_bundle / "generation_config.json").read_text())["do_sample"] is False


# ------------------------------------------------------------------------------------------ atomic writes


def test_export_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path, qwen2_tied: Path, allow_tiny) -> None:
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(BundleError, match="exists and is not an edgeqwen bundle") as info:
        export(str(qwen2_tied), "host", out, precision="fp32", verify=False, progress=False, force=True)
    assert "choose an empty or new folder" in str(info.value)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"


def test_export_refuses_to_replace_a_bundle_without_force(tmp_path: Path, int4_bundle: Path, bundle_copy,
                                                          qwen2_tied: Path, allow_tiny) -> None:
    out = bundle_copy(int4_bundle)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(BundleError, match="already holds a bundle") as info:
        export(str(qwen2_tied), "host", out, precision="fp32", verify=False, progress=False)
    assert "--force" in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_failure_midway_leaves_nothing_behind(tmp_path: Path, qwen2_tied: Path, allow_tiny,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeqwen.export as exp

    def broken_quantize(*args, **kwargs):
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr(exp, "_quantize", broken_quantize)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the float graph is built
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(RuntimeError, match="quantizer exploded"):
        export(str(qwen2_tied), "host", parent / "bundle", precision="int4", verify=False, progress=False)
    assert list(parent.iterdir()) == []  # no bundle, no .bundle.partial-* folder
    assert list(scratch.iterdir()) == []  # the builder's work folder is gone too


def test_atomic_folder_keeps_the_old_bundle_when_the_new_one_fails(int4_bundle: Path, bundle_copy) -> None:
    out = bundle_copy(int4_bundle)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KeyError), AtomicFolder(out, force=True) as tmp:
        (tmp / "model.onnx").write_text("half written")
        raise KeyError("interrupted")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]


def test_atomic_folder_replaces_a_bundle_with_force(int4_bundle: Path, bundle_copy) -> None:
    out = bundle_copy(int4_bundle)
    with AtomicFolder(out, force=True) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".bundle.partial-")
        (tmp / MANIFEST).write_text("{}")
        (tmp / "new.txt").write_text("new")
        assert (out / "model.onnx").is_file()  # the old bundle stays in place until the end
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "new.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]  # no .old-* left


def test_atomic_folder_accepts_an_empty_existing_folder_and_refuses_a_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with AtomicFolder(empty) as tmp:
        (tmp / "x").write_text("x")
    assert (empty / "x").read_text() == "x"
    (tmp_path / "file").write_text("f")
    with pytest.raises(BundleError, match="is a file"):
        AtomicFolder(tmp_path / "file").check_target()


# ------------------------------------------------------------------------------------------ damaged bundles


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_copy_loads(fp32_bundles, bundle_copy) -> None:
    model = runtime.load(bundle_copy(fp32_bundles["qwen2_tied"]), threads=1)
    assert model.manifest.spec.context_length == 512


def test_flipped_byte_is_reported_as_damaged(fp32_bundles, bundle_copy) -> None:
    folder = bundle_copy(fp32_bundles["qwen2_tied"])
    flip_byte(folder / "model.onnx.data")
    with pytest.raises(BundleError, match="model.onnx.data is damaged: its sha256 does not match") as info:
        runtime.load(folder, threads=1)
    assert "copy the bundle folder again" in str(info.value)
    load_bundle(folder, verify=False)  # size-only check: a flipped bit gets through when asked not to hash


def test_truncated_file_is_reported_with_its_size(fp32_bundles, bundle_copy) -> None:
    folder = bundle_copy(fp32_bundles["qwen2_tied"])
    data = folder / "model.onnx.data"
    full = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(full - 100)
    with pytest.raises(BundleError, match=f"has {full - 100} bytes, the manifest says {full}"):
        runtime.load(folder, threads=1, verify=False)  # caught even without checksums


def test_missing_file_is_named(fp32_bundles, bundle_copy) -> None:
    folder = bundle_copy(fp32_bundles["qwen2_tied"])
    os.remove(folder / "tokenizer.json")
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        runtime.load(folder, threads=1)


def _edit_manifest(folder: Path, **changes) -> None:
    data = json.loads((folder / MANIFEST).read_text())
    data.update(changes)
    (folder / MANIFEST).write_text(json.dumps(data))


def test_newer_format_asks_for_an_upgrade(fp32_bundles, bundle_copy) -> None:
    folder = bundle_copy(fp32_bundles["qwen2_tied"])
    _edit_manifest(folder, format_version=99)
    with pytest.raises(BundleError, match="format version 99, newer than this edgeqwen understands") as info:
        runtime.load(folder, threads=1)
    assert "upgrade edgeqwen" in str(info.value)


def test_foreign_and_malformed_manifests(fp32_bundles, bundle_copy) -> None:
    folder = bundle_copy(fp32_bundles["qwen2_tied"])
    _edit_manifest(folder, format="something-else")
    with pytest.raises(BundleError, match="is not an edgeqwen manifest"):
        read_manifest(folder)
    _edit_manifest(folder, format=FORMAT, spec={"arch": "qwen2"})
    with pytest.raises(BundleError, match="manifest is malformed"):
        read_manifest(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable or not JSON"):
        runtime.load(folder, threads=1)


@pytest.mark.parametrize("edit, words", [
    ({"format_version": "1"}, "format_version='1', not an integer"),
    ({"format_version": None}, "format_version=None, not an integer"),
    ({"files": None}, r"has no file table \('files' is NoneType\)"),
    ({"files": ["model.onnx"]}, r"has no file table \('files' is list\)"),
    ({"files": {"model.onnx": "abc"}}, "the entry for 'model.onnx' needs a sha256 string and a size"),
    ({"files": {"model.onnx": {"sha256": "00"}}}, "the entry for 'model.onnx' needs a sha256 string and a size"),
    ({"files": {}}, "does not list model.onnx, tokenizer.json, so the bundle cannot be checked"),
])
def test_a_malformed_manifest_is_a_bundle_error(fp32_bundles, bundle_copy, edit: dict, words: str) -> None:
    folder = bundle_copy(fp32_bundles["qwen2_tied"])
    _edit_manifest(folder, **edit)
    with pytest.raises(BundleError, match=words):
        runtime.load(folder, threads=1)


def test_a_manifest_that_is_not_an_object(fp32_bundles, bundle_copy) -> None:
    folder = bundle_copy(fp32_bundles["qwen2_tied"])
    (folder / MANIFEST).write_text("[1, 2]")
    with pytest.raises(BundleError, match=r"is not an edgeqwen manifest \(format='list'\)"):
        runtime.load(folder, threads=1)


def test_a_file_the_runtime_reads_must_be_listed(fp32_bundles, bundle_copy) -> None:
    """A chat template dropped in after export would change every prompt with no checksum covering it."""
    folder = bundle_copy(fp32_bundles["qwen2_tied"])
    (folder / "notes.txt").write_text("files the runtime never reads may sit beside the bundle")
    runtime.load(folder, threads=1)
    (folder / "chat_template.jinja").write_text("{{ messages[0].content }}")
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    assert "chat_template.jinja" not in listed
    with pytest.raises(BundleError, match="holds chat_template.jinja, which its manifest does not list") as info:
        runtime.load(folder, threads=1)
    assert "remove the file(s), or re-export" in str(info.value)


def test_work_dirs_of_killed_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """An export killed outright (OOM, SIGKILL) cannot clean up; the next one removes what it left."""
    import subprocess
    import sys

    from edgeqwen.bundle import work_dir

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    orphan = tmp_path / f".bundle.partial-{dead_pid}-abc123"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "sub" / "model.onnx.data").write_bytes(b"x" * 1000)
    live = tmp_path / f".bundle.partial-{os.getpid()}-def456"  # this process: still running
    live.mkdir()
    unrelated = tmp_path / ".bundle.partial-notapid"
    unrelated.mkdir()
    other_prefix = tmp_path / f".other.partial-{dead_pid}-x"
    other_prefix.mkdir()
    made = work_dir(tmp_path, ".bundle.partial-")
    assert made.name.startswith(f".bundle.partial-{os.getpid()}-") and made.is_dir()
    assert not orphan.exists()
    assert live.is_dir() and unrelated.is_dir() and other_prefix.is_dir()
    with AtomicFolder(tmp_path / "bundle") as tmp:  # the export's own staging folder goes through it too
        assert tmp.name.startswith(f".bundle.partial-{os.getpid()}-")


def test_atomic_folder_refuses_a_mount_point(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "sdcard"
    target.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == target)
    with pytest.raises(BundleError, match="is a mount point") as info:
        AtomicFolder(target).check_target()
    assert "sdcard/bundle" in info.value.fix


def test_a_failed_final_rename_keeps_the_finished_bundle_and_the_old_one(int4_bundle: Path, bundle_copy,
                                                                        monkeypatch) -> None:
    out = bundle_copy(int4_bundle)
    before = sorted(p.name for p in out.iterdir())
    real = os.replace

    def busy(src, dst):
        if Path(dst) == out.resolve() and ".partial-" in Path(src).name:  # the new bundle cannot move in
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(BundleError, match="could not be moved to .*Device or resource busy.*it is complete in"):
        with AtomicFolder(out, force=True) as tmp:
            (tmp / "model.onnx").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == before  # the previous bundle is back in place
    assert (tmp / "model.onnx").read_text() == "new"  # and the new one is kept where the error says


def test_not_a_bundle_folder(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(BundleError, match=r"is not an edgeqwen bundle \(no edgeqwen.json\)"):
        runtime.load(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        runtime.load(tmp_path / "absent")
