"""export() refuses bad requests early and clearly: each error has its type, a message naming the problem and
the fix, and happens before the expensive stages (graph build, quantization) where it can."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeqwen.errors import BundleError, ExportError, ProfileError, UnsupportedModelError, VerificationError
from edgeqwen.export import export, graph, verify
from edgeqwen.profiles import list_profiles


@pytest.fixture
def no_graph_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if export() gets as far as building the graph."""

    def forbidden(*args, **kwargs):
        raise AssertionError("export() reached the graph build")

    monkeypatch.setattr(graph, "build_fast_graph", forbidden)


def test_unknown_profile_lists_the_available_ones(tmp_path: Path, qwen2_tied: Path, no_graph_build) -> None:
    with pytest.raises(ProfileError, match="Unknown device profile 'raspberry-pi-9'") as info:
        export(str(qwen2_tied), "raspberry-pi-9", tmp_path / "out", progress=False)
    message = str(info.value)
    for name in list_profiles():
        assert name in message
    assert "rpi5" in message and "host" in message
    assert not (tmp_path / "out").exists()


def test_bad_precision_override_names_the_allowed_values(tmp_path: Path, qwen2_tied: Path, no_graph_build) -> None:
    with pytest.raises(ProfileError, match="'precision' has invalid value 'int3'") as info:
        export(str(qwen2_tied), "host", tmp_path / "out", precision="int3", progress=False)
    assert "int4, int8, fp16, fp32" in str(info.value)
    with pytest.raises(ProfileError, match="'block_size' has invalid value 48"):
        export(str(qwen2_tied), "host", tmp_path / "out", block_size=48, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_block_size_that_does_not_divide_the_weights_is_refused_before_the_graph(tmp_path: Path,
                                                                                  qwen2_tied: Path, allow_tiny,
                                                                                  no_graph_build) -> None:
    """The tiny model's hidden size is 64: block 128 would leave every weight but the down projections float."""
    with pytest.raises(ExportError, match=r"Block size 128 does not divide the model's hidden size 64, attention "
                                          r"width 64, so the weights of that input width would stay float") as info:
        export(str(qwen2_tied), "host", tmp_path / "out", block_size=128, progress=False)
    assert "pass --block-size 64 or smaller" in info.value.fix
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("algo", ["rtn", "hqq"])
def test_smoothing_with_an_algorithm_that_cannot_apply_it_is_refused(tmp_path: Path, qwen2_tied: Path,
                                                                    no_graph_build, algo: str) -> None:
    with pytest.raises(ExportError, match=rf"smooth_alpha=0.5 needs calibration statistics.*with '{algo}' it "
                                          "would be ignored"):
        export(str(qwen2_tied), "host", tmp_path / "out", quant_algo=algo, smooth_alpha=0.5, progress=False)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_bad_export_threads_are_refused_first(tmp_path: Path, qwen2_tied: Path, no_graph_build, threads) -> None:
    with pytest.raises(ExportError, match=rf"threads must be a positive integer, got {threads!r}"):
        export(str(qwen2_tied), "host", tmp_path / "out", threads=threads, progress=False)


def test_portable_options_are_checked_before_touching_the_source(tmp_path: Path, no_graph_build) -> None:
    # the source does not exist: reaching source resolution would raise SourceError instead
    with pytest.raises(ExportError, match="portable int8 quantizer is per-channel round-to-nearest") as info:
        export(str(tmp_path / "no-such-model"), "apple-silicon", tmp_path / "out", quant_algo="gptq",
               progress=False)
    assert "--quant-algo rtn" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_head_size_the_fast_attention_kernel_cannot_run_is_refused_before_the_graph(
        tmp_path: Path, qwen2_tied: Path, allow_tiny, no_graph_build) -> None:
    """GroupQueryAttention wants head sizes in multiples of 16; onnxruntime said so only at the first
    generation (a ProviderError suggesting a smaller context) after a finished fp32 export."""
    import shutil

    source = tmp_path / "hd8"
    shutil.copytree(qwen2_tied, source)
    config = json.loads((source / "config.json").read_text())
    config.update(num_attention_heads=8, num_key_value_heads=8, head_dim=8)
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="attention head size is 8; the fast backend's GroupQueryAttention "
                                          "kernel needs a multiple of 16") as info:
        export(str(source), "host", tmp_path / "out", precision="fp32", progress=False)
    assert "--device apple-silicon" in info.value.fix
    assert not (tmp_path / "out").exists()


def _llama_folder(root: Path, qwen_folder: Path) -> Path:
    folder = root / "llama"
    folder.mkdir()
    config = json.loads((qwen_folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"never read")
    (folder / "tokenizer.json").write_bytes((qwen_folder / "tokenizer.json").read_bytes())
    return folder


def test_unsupported_architecture_is_refused_before_heavy_work(tmp_path: Path, qwen2_tied: Path,
                                                               no_graph_build, allow_tiny) -> None:
    source = _llama_folder(tmp_path, qwen2_tied)
    with pytest.raises(UnsupportedModelError, match="model type 'llama' is not supported") as info:
        export(str(source), "host", tmp_path / "out", progress=False)
    assert "qwen2, qwen3" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_tiny_model_is_refused_by_the_size_check_by_default(tmp_path: Path, qwen2_tied: Path, no_graph_build,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEQWEN_ALLOW_ANY_SIZE", raising=False)
    with pytest.raises(UnsupportedModelError, match=r"estimated 0\.00B parameters"):
        export(str(qwen2_tied), "host", tmp_path / "out", progress=False)


def test_output_path_that_is_a_file_is_refused_first(tmp_path: Path, no_graph_build) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(BundleError, match="is a file"):
        export(str(tmp_path / "no-such-model"), "host", tmp_path / "out", progress=False)


def test_verification_failure_writes_nothing(tmp_path: Path, qwen2_tied: Path, allow_tiny,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # fp32 agrees with its source but cannot reach an agreement above 100%
    monkeypatch.setitem(verify.THRESHOLDS, "fp32", (1.01, 1.0))
    with pytest.raises(VerificationError, match="The fp32 bundle disagrees with its source") as info:
        export(str(qwen2_tied), "host", tmp_path / "out", precision="fp32", progress=False)
    assert "Nothing was written" in str(info.value)
    assert "please report this model" in str(info.value)  # a float bundle that disagrees is a bug, not a setting
    assert list(tmp_path.iterdir()) == []


def test_int8_verification_failure_does_not_suggest_int8(tmp_path: Path, qwen2_tied: Path, allow_tiny,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(verify.THRESHOLDS, "int8", (1.01, 1.0))
    with pytest.raises(VerificationError, match="The int8 bundle disagrees") as info:
        export(str(qwen2_tied), "host", tmp_path / "out", precision="int8", progress=False)
    assert "--precision fp32" in str(info.value) and "--precision int8" not in str(info.value)


def test_verification_passes_and_is_recorded_for_fp32(tmp_path: Path, qwen3: Path, allow_tiny) -> None:
    result = export(str(qwen3), "host", tmp_path / "out", precision="fp32", progress=False)
    v = result.manifest.verification
    assert v["passed"] is True and v["precision"] == "fp32"
    assert v["agreement"] >= 0.99 and abs(v["worst_perplexity_ratio"] - 1.0) < 1e-3
    assert {t["name"] for t in v["texts"]} == {"en", "code"} and all(t["tokens"] > 50 for t in v["texts"])
    on_disk = json.loads((tmp_path / "out" / "edgeqwen.json").read_text())["verification"]
    assert on_disk == v


@pytest.mark.parametrize("algo", ["awq", "smoothquant"])
def test_unknown_algorithms_are_refused_by_the_profile(tmp_path: Path, qwen2_tied: Path, algo: str,
                                                       no_graph_build, allow_tiny) -> None:
    """An algorithm no quantizer implements fails at profile validation, before any graph is built."""
    with pytest.raises(ProfileError, match="quant_algo") as info:
        export(str(qwen2_tied), "host", tmp_path / "out", precision="int4", quant_algo=algo, progress=False)
    assert "gptq" in str(info.value) and "k_quant" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("algo", ["rtn", "k_quant", "hqq", "gptq"])
def test_every_profile_algorithm_exports_the_tiny_model(tmp_path: Path, qwen2_untied: Path, algo: str,
                                                        allow_tiny) -> None:
    result = export(str(qwen2_untied), "host", tmp_path / "out", precision="int4", quant_algo=algo,
                    verify=False, progress=False)
    hows = result.manifest.quantization["summary"]["by_method"]
    body = {"rtn": "rtn", "k_quant": "k_quant+imatrix", "hqq": "hqq", "gptq": "gptq"}[algo]
    assert f"{body}/4bit" in hows, hows
    assert result.manifest.profile["quant_algo"] == algo


def test_sigterm_mid_export_removes_the_temporary_folders(tmp_path: Path, qwen2_tied: Path) -> None:
    """`timeout`, `docker stop` or a cancelled CI job: the export unwinds as on Ctrl-C, leaving nothing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    scratch, out = tmp_path / "tmp", tmp_path / "out" / "bundle"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), EDGEQWEN_ALLOW_ANY_SIZE="1")
    proc = subprocess.Popen([sys.executable, "-m", "edgeqwen.cli", "export", str(qwen2_tied), "-o", str(out),
                             "--no-verify"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not any(scratch.glob("edgeqwen-graph-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]  # still building when the signal comes
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    ours = sorted(p.name for p in scratch.iterdir() if p.name.startswith("edgeqwen-"))  # not other tools' files
    assert not ours, ours
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no .bundle.partial-* either
