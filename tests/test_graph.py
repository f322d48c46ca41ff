"""The float graph the builder writes (via exported fp32 bundles of the tiny models), and genai_config edits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from safetensors.numpy import load_file

from edgeqwen.bundle import read_manifest
from edgeqwen.errors import ExportError
from edgeqwen.export.graph import LOGITS_WINDOW, adjust_genai_config, build_fast_graph

LAYERS = 2
LINEARS_PER_LAYER = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def graph_of(bundle: Path, external: bool = False) -> onnx.ModelProto:
    return onnx.load(str(bundle / "model.onnx"), load_external_data=external)


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("kind", ["qwen2_tied", "qwen2_untied", "qwen3"])
def test_fast_float_graph_uses_the_fused_contrib_ops(fp32_bundles, kind: str) -> None:
    model = graph_of(fp32_bundles[kind])
    ops = Counter(n.op_type for n in model.graph.node)
    inits = {t.name for t in model.graph.initializer}
    assert ops["GroupQueryAttention"] == LAYERS
    assert ops["SkipSimplifiedLayerNormalization"] >= LAYERS
    assert ops["MatMulNBits"] == 0 and ops["GatherBlockQuantized"] == 0
    weight_matmuls = sorted(n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    expected = sorted([f"model.layers.{i}.{p}.MatMul.weight" for i in range(LAYERS) for p in LINEARS_PER_LAYER]
                      + ["lm_head.MatMul.weight"])
    assert weight_matmuls == expected  # q/k/v packed into one matrix per layer
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight"]
    assert len(gathers) == 1
    # Qwen3's q_norm/k_norm are two extra RMS norms per layer; Qwen2's q/k/v bias is one Add per layer
    norms = ops["SimplifiedLayerNormalization"]
    bias_adds = [n for n in model.graph.node if n.op_type == "Add" and "qkv_proj.Add.bias" in "".join(n.input)]
    if kind == "qwen3":
        assert norms == 1 + 2 * LAYERS and not bias_adds
    else:
        assert norms == 1 and len(bias_adds) == LAYERS


@pytest.mark.parametrize("kind", ["qwen2_tied", "qwen3"])
def test_graph_io_matches_the_manifest_and_logits_cover_a_window_of_last_positions(fp32_bundles, kind: str) -> None:
    bundle = fp32_bundles[kind]
    manifest = read_manifest(bundle)
    io, spec = manifest.io, manifest.spec
    model = graph_of(bundle)
    inputs = {i.name: dims(i) for i in model.graph.input}
    outputs = {o.name: dims(o) for o in model.graph.output}
    expected_inputs = {io.input_ids, io.attention_mask} | {
        name % i for i in range(spec.num_layers) for name in (io.past_key, io.past_value)}
    assert set(inputs) == expected_inputs  # positions come from the mask: no position_ids input
    assert io.position_ids is None and io.logits_last_only and io.logits_window == LOGITS_WINDOW == 8
    assert outputs[io.logits][1:] == ["logits_length", spec.vocab_size]
    assert inputs[io.past_key % 0][1] == spec.kv_heads
    assert set(outputs) == {io.logits} | {name % i for i in range(spec.num_layers)
                                          for name in (io.present_key, io.present_value)}
    assert not any("prune" in n.name for n in model.graph.node)  # the builder's one-position Gather is gone

    # straight through onnxruntime: a row per token up to the window, then only the last position's
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32)
    rows = {}
    for n in (5, 8, 9, 12):
        ids = np.arange(1, n + 1, dtype=np.int64)[None] % spec.vocab_size
        feeds = {io.input_ids: ids, io.attention_mask: np.ones((1, n), np.int64)}
        feeds |= {name % i: empty for i in range(spec.num_layers) for name in (io.past_key, io.past_value)}
        result = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        rows[n] = result[io.logits]
        assert result[io.present_key % 0].shape == (1, spec.kv_heads, n, spec.head_dim)
    assert [rows[n].shape[1] for n in (5, 8, 9, 12)] == [5, 8, 1, 1]
    # causal: the 8-token run's first five rows are the 5-token run's
    np.testing.assert_allclose(rows[8][:, :5], rows[5], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["qwen2_untied", "qwen3"])
def test_the_last_layer_after_its_attention_runs_on_the_window_rows_only(fp32_bundles, kind: str) -> None:
    """Its o_proj and MLP feed only the logits; earlier layers (and every layer's K/V) see every position."""
    bundle = fp32_bundles[kind]
    manifest = read_manifest(bundle)
    io, spec = manifest.io, manifest.spec
    model = graph_of(bundle, external=True)
    last, first = (f"/model/layers.{i}/mlp/down_proj/MatMul/output_0" for i in (LAYERS - 1, 0))
    produced = {o for n in model.graph.node for o in n.output}
    assert {last, first} <= produced
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in (last, first))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32)
    for n, rows in ((5, 5), (12, 1)):
        ids = np.arange(1, n + 1, dtype=np.int64)[None] % spec.vocab_size
        feeds = {io.input_ids: ids, io.attention_mask: np.ones((1, n), np.int64)}
        feeds |= {name % i: empty for i in range(spec.num_layers) for name in (io.past_key, io.past_value)}
        result = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        assert result[last].shape[1] == rows and result[first].shape[1] == n
        assert result[io.present_key % (LAYERS - 1)].shape[2] == n  # the last layer still caches every position
    # and its one row is the untrimmed graph's: the last position's logits of a 12-token run, computed as the
    # 12th row of a run that keeps every row (a 12-token window)
    wide = graph_of(bundle, external=True)
    limit = next(t for t in wide.graph.initializer if t.name == "edgeqwen.logits_window.limit")
    limit.CopyFrom(numpy_helper.from_array(np.array([12], np.int64), limit.name))
    full = ort.InferenceSession(wide.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = dict(zip([o.name for o in full.get_outputs()], full.run(None, feeds)))[io.logits]
    assert logits.shape[1] == 12
    np.testing.assert_allclose(result[io.logits][:, -1], logits[:, -1], rtol=1e-5, atol=1e-5)


def test_packed_weights_and_biases_are_the_source_weights(fp32_bundles, qwen2_untied) -> None:
    """The builder's packed qkv (weights transposed to [K, N], bias concatenated) is the HF model's q/k/v."""
    model = graph_of(fp32_bundles["qwen2_untied"], external=True)
    onnx_w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    hf = load_file(str(qwen2_untied / "model.safetensors"))
    attn = "model.layers.1.self_attn"
    qkv = np.concatenate([hf[f"{attn}.{p}_proj.weight"] for p in "qkv"]).T
    bias = np.concatenate([hf[f"{attn}.{p}_proj.bias"] for p in "qkv"])
    np.testing.assert_array_equal(onnx_w["model.layers.1.attn.qkv_proj.MatMul.weight"], qkv)
    np.testing.assert_array_equal(onnx_w["model.layers.1.attn.qkv_proj.Add.bias"], bias)
    np.testing.assert_array_equal(onnx_w["lm_head.MatMul.weight"], hf["lm_head.weight"].T)
    np.testing.assert_array_equal(onnx_w["model.embed_tokens.weight"], hf["model.embed_tokens.weight"])


def test_unknown_provider_is_refused_before_running_the_builder(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no graph for provider 'coreml'") as info:
        build_fast_graph(tmp_path / "src", tmp_path / "work", provider="coreml", io_dtype="fp32")
    assert "cpu, cuda, dml or webgpu" in str(info.value)
    assert not (tmp_path / "work").exists()


def test_builder_failure_reports_the_tail_of_its_log(tmp_path: Path, qwen2_tied: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((qwen2_tied / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match=r"model builder failed \(exit [1-9]") as info:
        build_fast_graph(broken, tmp_path / "work", provider="cpu", io_dtype="fp32")
    message = str(info.value)
    assert "Last output:" in message and "Traceback" in message  # the builder's own error, not just a code
    assert "pip install 'edgeqwen[export]'" in message


def _genai_config(path: Path) -> Path:
    cfg = {"model": {"context_length": 32768, "decoder": {"session_options": {"log_id": "x"}}},
           "search": {"max_length": 32768, "top_k": 1}}
    path.write_text(json.dumps(cfg))
    return path


def test_adjust_genai_config_sets_context_sampling_and_threads(tmp_path: Path) -> None:
    path = _genai_config(tmp_path / "genai_config.json")
    adjust_genai_config(path, context=1024, generation={"temperature": 0.7, "top_p": 0.8, "do_sample": True,
                                                         "eos_token_id": [1, 2]}, provider="cpu", threads=3)
    cfg = json.loads(path.read_text())
    assert cfg["model"]["context_length"] == 1024 and cfg["search"]["max_length"] == 1024
    assert cfg["search"] == {"max_length": 1024, "top_k": 1, "temperature": 0.7, "top_p": 0.8, "do_sample": True}
    opts = cfg["model"]["decoder"]["session_options"]
    assert opts == {"log_id": "x", "intra_op_num_threads": 3}


def test_adjust_genai_config_for_a_gpu_provider_and_automatic_threads(tmp_path: Path) -> None:
    path = _genai_config(tmp_path / "genai_config.json")
    adjust_genai_config(path, context=512, generation={}, provider="cuda", threads=0)
    opts = json.loads(path.read_text())["model"]["decoder"]["session_options"]
    assert opts == {"log_id": "x", "provider_options": [{"cuda": {}}]}


def test_the_rotary_tables_keep_the_bundles_context_and_the_last_position_still_matches(
        tmp_path: Path, qwen2_untied: Path, allow_tiny) -> None:
    """cos/sin are cut to the bundle's context (the 0.5B's 32,768 rows were 7 MiB of a 4,096-token bundle);
    a run that reaches the last position of that context still gives transformers' tokens."""
    from test_generate import hf_greedy, hf_logits
    from transformers import AutoModelForCausalLM

    from edgeqwen import runtime
    from edgeqwen.export import export
    from edgeqwen.runtime.generate import decode_one

    export(str(qwen2_untied), "host", tmp_path / "b", precision="fp32", context=256, verify=False, progress=False)
    tables = {t.name: list(t.dims) for t in graph_of(tmp_path / "b").graph.initializer if t.name.endswith("_cache")}
    assert tables == {"cos_cache": [256, 8], "sin_cache": [256, 8]}  # of 512; head size 16: 8 frequencies
    model = runtime.load(tmp_path / "b", threads=1)
    text = " ".join(["the quick model runs on a small board with int4 weights"] * 12)
    prompt = model.encode(text)
    assert 100 < len(prompt) < 200
    ours = model.generate(text, max_new_tokens=256 - len(prompt), stop_token_ids=[])
    assert len(prompt) + len(ours.tokens) == 256  # every position the tables hold ...
    reference = AutoModelForCausalLM.from_pretrained(str(qwen2_untied)).eval()
    assert list(ours.tokens) == hf_greedy(reference, prompt, len(ours.tokens))
    # ... and the last one run too: generate() never feeds back its final token, so run it here (position 255)
    last = decode_one(model.engine, ours.tokens[-1])
    assert model.engine.cache.length == 256
    expected = hf_logits(reference, [*prompt, *ours.tokens])[-1]
    np.testing.assert_allclose(last, expected, rtol=1e-3, atol=1e-3)
