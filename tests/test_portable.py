"""The portable backend: Optimum's standard-op graph, weight-only int8 in QDQ form, and its bundle.

Greedy/logit equality with transformers and every KV-cache trick on this graph are in test_generate.py
(parametrized over both backends); here: what the graph holds, what the quantizer does, and the errors.
"""

from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeqwen import runtime
from edgeqwen.bundle import read_manifest
from edgeqwen.errors import ExportError, ProfileError
from edgeqwen.export import export
from edgeqwen.export.qdq import int8_per_channel

KINDS = ["qwen2_tied", "qwen2_untied", "qwen3"]


def graph_of(bundle: Path) -> onnx.ModelProto:
    return onnx.load(str(bundle / "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("kind", KINDS)
def test_int8_graph_is_standard_ops_with_weight_only_int8(portable_int8_bundles, tiny_models, kind):
    model = graph_of(portable_int8_bundles[kind])
    config = json.loads((tiny_models[kind] / "config.json").read_text())
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert {n.domain for n in model.graph.node} == {""}  # no com.microsoft contrib ops
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert not {"GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized"} & set(ops)
    # 7 linear layers per block + lm_head, all weight-only int8; activations are never quantized
    assert ops["DequantizeLinear"] == 7 * config["num_hidden_layers"] + 1
    assert ops["QuantizeLinear"] == 0 and ops["DynamicQuantizeLinear"] == 0
    inits = {t.name: t for t in model.graph.initializer}
    big_float = [t.name for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
                 and min(t.dims) >= config["hidden_size"]]
    assert big_float == []  # no float weight matrix is left
    vocab_tables = [t for t in inits.values() if len(t.dims) == 2 and config["vocab_size"] in t.dims
                    and config["hidden_size"] in t.dims]
    # a tied model keeps one int8 table for embedding and lm_head; untied keeps both
    assert len(vocab_tables) == (1 if config.get("tie_word_embeddings") else 2)
    assert all(t.data_type == onnx.TensorProto.INT8 for t in vocab_tables)


def test_cpu_runs_the_qdq_weights_as_matmulnbits(portable_int8_bundles, tmp_path):
    """The speed of the portable graph on CPU rests on onnxruntime fusing DequantizeLinear->MatMul."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(portable_int8_bundles["qwen2_tied"] / "model.onnx"), opts,
                         providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"),
                                                           load_external_data=False).graph.node)
    assert ops["MatMulNBits"] == 7 * 2 + 1 and ops["DequantizeLinear"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_and_io_of_the_portable_bundle(portable_fp32_bundles, kind):
    bundle = portable_fp32_bundles[kind]
    manifest = read_manifest(bundle)
    assert manifest.backend == "portable" and manifest.precision == "fp32"
    assert manifest.io.position_ids == "position_ids" and manifest.io.shared_kv_buffer is False
    assert "optimum-onnx" in manifest.source["graph_builder"]
    assert not (bundle / "genai_config.json").exists()  # onnxruntime-genai needs the contrib-op graph
    model = graph_of(bundle)
    outputs = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outputs["logits"][1] == "logits_length"  # last position only, or the last few (graph.window_logits)
    assert manifest.io.logits_window == 8
    inputs = {i.name for i in model.graph.input}
    assert {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key"} <= inputs


def test_prefill_computes_only_the_last_position(portable_fp32_bundles):
    model = runtime.load(portable_fp32_bundles["qwen3"], threads=1)
    ids = model.encode("the quick model runs on a small board with int4 weights")
    assert len(ids) > model.manifest.io.logits_window  # a run this long gets one row
    feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids))[None]}
    spec = model.manifest.spec
    for i in range(spec.num_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32)
    logits = model.session.run(["logits"], feeds)[0]
    assert logits.shape == (1, 1, spec.vocab_size)


def test_int8_per_channel_error_is_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    w[:, 5] = 0.0  # an all-zero channel must not divide by zero
    q, scale = int8_per_channel(w, axis=1)
    assert q.dtype == np.int8 and scale.shape == (48,) and np.abs(q).max() <= 127
    err = np.abs(q * scale[None, :] - w)
    assert np.all(err <= scale[None, :] / 2 + 1e-7)
    assert np.all(q[:, 5] == 0)
    rows_q, rows_scale = int8_per_channel(w.T, axis=0)
    np.testing.assert_array_equal(rows_q, q.T)
    np.testing.assert_allclose(rows_scale, scale)


def test_optimum_worker_restores_rope_theta(tmp_path):
    """transformers 5 writes rope_parameters; the pinned 4.57 reads rope_theta and would default to 10,000."""
    spec = importlib.util.spec_from_file_location(
        "worker", Path(__file__).parents[1] / "edgeqwen" / "export" / "_optimum_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2", "rope_parameters": {
        "rope_theta": 1000000.0, "rope_type": "default"}}))
    (src / "model.safetensors").write_bytes(b"weights")
    stage = worker.staged_source(src)
    cfg = json.loads((stage / "config.json").read_text())
    assert cfg["rope_theta"] == 1000000.0 and "rope_parameters" not in cfg and "rope_scaling" not in cfg
    assert (stage / "model.safetensors").read_bytes() == b"weights"


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("options,pattern", [
    ({"precision": "fp16"}, r"portable backend builds int8, fp32 bundles, not 'fp16'"),
    ({"quant_algo": "k_quant"}, r"portable int8 quantizer is per-channel round-to-nearest.*--quant-algo rtn"),
])
def test_portable_export_refuses_what_it_cannot_build(qwen2_untied, allow_tiny, tmp_path, options, pattern):
    with pytest.raises(ExportError, match=pattern):
        export(str(qwen2_untied), "apple-silicon", tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_portable_int4_is_a_profile_error(qwen2_untied, allow_tiny, tmp_path):
    with pytest.raises(ProfileError, match="portable.*int4.*MatMulNBits"):
        export(str(qwen2_untied), "apple-silicon", tmp_path / "out", precision="int4", progress=False)


def test_a_bad_optimum_tool_folder_is_named(qwen2_untied, allow_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQWEN_OPTIMUM_DIR", str(tmp_path / "nothing-here"))
    with pytest.raises(ExportError, match=r"EDGEQWEN_OPTIMUM_DIR=.*nothing-here does not contain the optimum "
                                          r"package.*pip install --no-deps --target DIR optimum-onnx==0\.1\.0"):
        export(str(qwen2_untied), "apple-silicon", tmp_path / "out", verify=False, progress=False)
    assert not (tmp_path / "out").exists()
