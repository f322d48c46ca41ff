"""SmoothQuant on the attention input (export/smooth.py): the float model is unchanged, the q/k/v weights and
the norms in front of them are rescaled, and only where the weights are re-quantized anyway."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeqwen.export.quantize import ExternalWeights, save_with_external_data
from edgeqwen.export.smooth import smooth_attention_inputs, smoothing_scales


def test_scales_follow_the_activation_peaks_and_keep_the_weight_range():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)  # [K, N]
    act = np.ones(64, np.float32)
    act[[3, 40]] = 100.0  # two outlier channels
    s = smoothing_scales(act, w, 0.5)
    assert s.shape == (64,) and s.dtype == np.float32
    assert abs(float(np.exp(np.log(s).mean())) - 1.0) < 1e-5  # geometric mean 1
    assert s[3] > 5 * np.median(s) and s[40] > 5 * np.median(s)
    smoothed = act / s
    assert smoothed.max() / np.median(smoothed) < 0.2 * act.max() / np.median(act)  # the peaks are flattened
    # alpha 0 moves nothing onto the activations: s only evens out the weight rows
    s0 = smoothing_scales(act, w, 0.0)
    assert np.allclose(np.abs(w * s0[:, None]).max(axis=1), np.abs(w * s0[:, None]).max(), rtol=1e-5)


def _logits(bundle: Path, tokens: list[int]) -> np.ndarray:
    from edgeqwen import runtime
    from edgeqwen.export.verify import bundle_logits

    model = runtime.load(bundle, threads=1, verify=False)
    return np.stack(list(bundle_logits(model, tokens)))


@pytest.mark.parametrize("kind", ["qwen2_tied", "qwen3"])
def test_smoothing_leaves_the_float_model_unchanged(fp32_bundles, tmp_path, kind):
    src = fp32_bundles[kind]
    dst = tmp_path / "smoothed"
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    weights = ExternalWeights(model, dst)
    qkv = [t.name for t in model.graph.initializer if "attn.qkv_proj" in t.name and t.name.endswith("weight")]
    assert qkv, "the fast graph packs q/k/v into one MatMul per layer"
    rng = np.random.default_rng(1)
    peaks = {}
    for name in qkv:
        k = weights.array(name).shape[0]
        peaks[name] = rng.uniform(0.5, 2.0, k).astype(np.float32)
        peaks[name][rng.choice(k, 2, replace=False)] = 60.0
    before = {n: np.array(weights.array(n)) for n in qkv}
    scales = smooth_attention_inputs(model, weights, peaks, 0.5)
    assert sorted(scales) == sorted(qkv)
    for name in qkv:  # the weights did change: rows scaled by s, and s is far from 1 on the peaked channels
        np.testing.assert_allclose(weights.array(name), before[name] * scales[name][:, None], rtol=1e-6)
        assert np.abs(np.log(scales[name])).max() > 0.5
    weights.materialize_rest(model)
    save_with_external_data(model, dst)
    tokens = list(range(3, 40, 2))
    np.testing.assert_allclose(_logits(dst, tokens), _logits(src, tokens), rtol=0, atol=2e-4)


def test_only_wanted_weights_with_statistics_are_smoothed(fp32_bundles, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(fp32_bundles["qwen2_tied"], dst)
    model = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    weights = ExternalWeights(model, dst)
    qkv = sorted(t.name for t in model.graph.initializer if "attn.qkv_proj" in t.name and t.name.endswith("weight"))
    peaks = {n: np.ones(weights.array(n).shape[0], np.float32) for n in qkv[1:]}  # no statistics for qkv[0]
    done = smooth_attention_inputs(model, weights, peaks, 0.5, wanted=lambda n: n != qkv[-1])
    assert sorted(done) == qkv[1:-1]


def _smoothed(bundle: Path) -> list[str]:
    return json.loads((bundle / "edgeqwen.json").read_text())["quantization"]["smoothed"]


def test_int4_export_smooths_the_8_bit_qkv_and_int8_does_not(int4_tied_bundle, int8_bundle):
    manifest = json.loads((int4_tied_bundle / "edgeqwen.json").read_text())
    layers = manifest["spec"]["num_layers"]
    names = _smoothed(int4_tied_bundle)
    assert len(names) == layers and all("attn.qkv_proj" in n for n in names)
    assert manifest["quantization"]["plan"]["smooth_alpha"] == 0.5
    assert all(manifest["quantization"]["tensors"][n]["bits"] == 8 for n in names)
    assert _smoothed(int8_bundle) == []  # int8 keeps its weights as they were (exact GGUF copies on GGUF sources)


def test_smooth_alpha_zero_turns_it_off(tiny_models, tmp_path, allow_tiny):
    from edgeqwen.export import export

    result = export(str(tiny_models["qwen2_tied"]), "host", tmp_path / "b", progress=False, smooth_alpha=0, verify=False)
    assert _smoothed(result.bundle) == []
