"""Float graph -> MatMulNBits/GatherBlockQuantized graph: on small hand-made graphs (numbers checked against
the dequantized weights through onnxruntime) and on the tiny models' int4/int8 bundles (their structure; how
closely their logits follow fp32 is checked in test_generate.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeqwen.bundle import read_manifest
from edgeqwen.errors import ExportError
from edgeqwen.export.blockquant import BlockQuantized, quantize, quantize_rtn, split_coarse
from edgeqwen.export.quantize import ExternalWeights, QuantPlan, float_coder, quantize_graph, save_with_external_data

LAYERS = 2
V, H, F = 64, 32, 64  # vocab, hidden, ffn of the hand-made graph
EMBED, DOWN, HEAD = "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.MatMul.weight", "lm_head.MatMul.weight"
ODD = "model.layers.0.mlp.odd.MatMul.weight"


def toy_graph(embed: np.ndarray, head_kn: np.ndarray, down_kn: np.ndarray, odd_kn: np.ndarray) -> onnx.ModelProto:
    """ids -> Gather(embed) -> MatMul(up: K=H) -> MatMul(odd: K=40, stays float) ... -> MatMul(lm_head)."""
    nodes = [
        helper.make_node("Gather", [EMBED, "input_ids"], ["h0"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["h0", DOWN], ["h1"], name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("Slice", ["h1", "starts", "ends", "axes"], ["h1s"], name="slice"),
        helper.make_node("MatMul", ["h1s", ODD], ["h2"], name="/model/layers.0/mlp/odd/MatMul"),
        helper.make_node("MatMul", ["h2", HEAD], ["logits"], name="/lm_head/MatMul"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((embed, EMBED), (down_kn, DOWN), (odd_kn, ODD), (head_kn, HEAD))]
    inits += [numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "starts"), (40, "ends"), (2, "axes"))]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, V])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def toy_weights(tied: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    embed = rng.normal(0, 1, (V, H)).astype(np.float32)
    head = embed.T.copy() if tied else rng.normal(0, 1, (H, V)).astype(np.float32)
    down = rng.normal(0, 0.2, (H, F)).astype(np.float32)
    odd = rng.normal(0, 0.2, (40, H)).astype(np.float32)  # K = 40: not a whole number of 32-blocks
    return embed, head, down, odd


def run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


IDS = np.array([[0, 5, 63, 5, 17]], np.int64)


def reference(embed_rows: np.ndarray, down_nk: np.ndarray, odd_kn: np.ndarray, head_nk: np.ndarray) -> np.ndarray:
    h1 = embed_rows @ down_nk.T
    return (h1[:, :40] @ odd_kn) @ head_nk.T


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_untied_graph_is_rewritten_and_computes_the_dequantized_weights(precision: str) -> None:
    embed, head, down, odd = toy_weights(tied=False)
    model = toy_graph(embed, head, down, odd)
    plan = QuantPlan(precision=precision, algo="k_quant", block_size=32, accuracy_level=0,
                     embed_bits=4 if precision == "int4" else 8, lm_head_bits=4 if precision == "int4" else 8)
    report = quantize_graph(model, ExternalWeights(model, Path(".")), plan)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits"] == 2 and ops["GatherBlockQuantized"] == 1 and ops["Gather"] == 0
    float_mm = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"]
    assert float_mm == [ODD]  # K=40 cannot be blocked by 32: left in float, the rest is gone
    names = {t.name for t in model.graph.initializer}
    assert not names & {EMBED, DOWN, HEAD} and ODD in names
    assert report.tied is None and set(report.tensors) == {EMBED, DOWN, HEAD}
    bits = plan.body_bits
    assert all(t["bits"] == bits for t in report.tensors.values())
    assert [a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"] == [bits] * 2
    assert any(o.domain == "com.microsoft" for o in model.opset_import)

    deq = {name: quantize(w, bits, 32, "k_quant").dequantize()
           for name, w in ((EMBED, embed), (DOWN, down.T), (HEAD, head.T))}
    expected = reference(deq[EMBED][IDS[0]], deq[DOWN], odd, deq[HEAD])
    np.testing.assert_allclose(run(model, IDS)[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_embedding_and_lm_head_share_one_matrix(bits: int) -> None:
    embed, head, down, odd = toy_weights(tied=True)
    model = toy_graph(embed, head, down, odd)
    plan = QuantPlan(precision="int4", algo="k_quant", block_size=32, accuracy_level=0, shared_bits=bits)
    report = quantize_graph(model, ExternalWeights(model, Path(".")), plan)
    assert report.tied == {"relative_difference": 0.0, "bits": bits}
    gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head_node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    assert gbq.input[0] == head_node.input[1]  # one codes tensor read by both nodes
    assert {a.name: a.i for a in gbq.attribute}["bits"] == bits
    codes = [t for t in model.graph.initializer if t.name == head_node.input[1]]
    assert len(codes) == 1 and list(codes[0].dims) == [V, H // 32, 32 * bits // 8]

    shared = quantize(embed, bits, 32, "k_quant").dequantize()
    body = quantize(down.T, 4, 32, "k_quant").dequantize()
    expected = reference(shared[IDS[0]], body, odd, shared)
    np.testing.assert_allclose(run(model, IDS)[0], expected, rtol=1e-4, atol=1e-4)


def refined_reference(hidden: np.ndarray, w8: np.ndarray, coarse: np.ndarray, k: int) -> np.ndarray:
    """Coarse logits, with the k best (by coarse logit) of each row replaced by the 8-bit matrix's."""
    approx, exact = hidden @ coarse.T, hidden @ w8.T
    top = np.argsort(-approx, axis=-1)[..., :k]
    out = approx.copy()
    np.put_along_axis(out, top, np.take_along_axis(exact, top, -1), -1)
    return out


@pytest.mark.parametrize("tied,vocab_bits", [(True, 8), (False, 8), (True, 6), (False, 6)])
def test_vocab_refine_rescores_the_coarse_logits_best_candidates_with_the_full_matrix(tied: bool,
                                                                                      vocab_bits: int) -> None:
    embed, head, down, odd = toy_weights(tied=tied)
    model = toy_graph(embed, head, down, odd)
    k = 8
    plan = QuantPlan(precision="int4", algo="k_quant", block_size=32, accuracy_level=0, lm_head_bits=8,
                     vocab_refine=k, vocab_bits=vocab_bits)
    report = quantize_graph(model, ExternalWeights(model, Path(".")), plan)
    assert report.tensors[HEAD]["bits"] == f"4+{vocab_bits - 4}" and report.tensors[HEAD]["refine_top_k"] == k
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["TopK"] == 1 and ops["ScatterElements"] == 1 and ops["MatMulNBits"] == 2
    head_node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.input[1])
    assert {a.name: a.i for a in head_node.attribute}["bits"] == 4  # the lm_head reads half the bytes
    # the candidates' coarse logits are TopK's values: the refine gathers residual rows only, so a decode step
    # never reads the mapped coarse table (only the embedding does, for the input tokens)
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    readers = [n.input[0] for n in model.graph.node if n.op_type == "GatherBlockQuantized" and topk.output[1] in n.input]
    assert readers == ["lm_head.MatMul.residual.qweight"]
    assert any(n.op_type == "Add" and topk.output[0] in n.input for n in model.graph.node)
    read = {i for n in model.graph.node for i in n.input}
    assert not [t.name for t in model.graph.initializer if t.name not in read]  # nothing stored for no reader

    # the 8- or 6-bit matrix is the symmetric RTN grid (the split needs its middle zero point), coarse + residual
    # == it; at 6 bits the residual gathers read 2-bit codes
    w8 = quantize_rtn(head.T, vocab_bits, 32, symmetric=True)
    coarse, residual = split_coarse(w8)
    np.testing.assert_allclose(coarse.dequantize() + residual.dequantize(), w8.dequantize(), atol=1e-6)
    table = w8.dequantize() if tied else quantize(embed, 4, 32, "k_quant").dequantize()
    body = quantize(down.T, 4, 32, "k_quant").dequantize()
    hidden = (table[IDS[0]] @ body.T)[:, :40] @ odd
    expected = refined_reference(hidden, w8.dequantize(), coarse.dequantize(), k)
    got = run(model, IDS)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    # the refined entries are the 8-bit logits, the rest differ from them: the test sees both halves
    exact = hidden @ w8.dequantize().T
    assert np.all(np.isclose(got, exact, atol=1e-3).sum(-1) >= k)
    assert not np.allclose(got, exact, atol=1e-3)


@pytest.mark.parametrize("gguf_mode,block", [("fast", 64), ("balanced", 64), ("faithful", 32)])
def test_vocab_split_is_re_coded_at_the_wider_8_bit_block(gguf_mode: str, block: int) -> None:
    """An int4 plan with block_size_8bit re-codes the vocabulary matrix at that block (and at vocab_bits) before
    splitting it (the coarse half's scales are what every decode step reads); "faithful" imports keep the plan's
    block and 8 bits."""
    hidden_size = 128
    rng = np.random.default_rng(4)
    embed = rng.normal(0, 1, (V, hidden_size)).astype(np.float32)
    nodes = [helper.make_node("Gather", [EMBED, "input_ids"], ["h"], name="/model/embed_tokens/Gather"),
             helper.make_node("MatMul", ["h", HEAD], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "vocab", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, V])],
                              initializer=[numpy_helper.from_array(embed, EMBED),
                                           numpy_helper.from_array(embed.T.copy(), HEAD)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    plan = QuantPlan(precision="int4", algo="k_quant", block_size=32, accuracy_level=0, lm_head_bits=8,
                     vocab_refine=8, block_size_8bit=64, gguf_mode=gguf_mode, vocab_bits=6)
    report = quantize_graph(model, ExternalWeights(model, Path(".")), plan)
    bits = 8 if gguf_mode == "faithful" else 6  # faithful keeps the 8-bit codes whatever vocab_bits says
    assert report.tensors[HEAD]["block_size"] == block and report.tensors[HEAD]["bits"] == f"4+{bits - 4}"
    assert (f"block{block}(" in report.tensors[HEAD]["how"]) == (block == 64)
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            assert {a.name: a.i for a in node.attribute}["block_size"] == block, node.name
    w8 = quantize_rtn(embed, bits, block, symmetric=True)
    coarse, _ = split_coarse(w8)
    table = w8.dequantize()
    expected = refined_reference(table[IDS[0]], table, coarse.dequantize(), 8)
    np.testing.assert_allclose(run(model, IDS)[0], expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("precision,gguf_mode,stored", [("int4", "balanced", TensorProto.FLOAT16),
                                                        ("int4", "faithful", TensorProto.FLOAT),
                                                        ("int8", "balanced", TensorProto.FLOAT)])
def test_block_offsets_are_added_by_the_graph(precision: str, gguf_mode: str, stored: int) -> None:
    """A weight with block offsets (GGUF Q4_K's minimum) becomes MatMulNBits + (block sums of x) @ offsets:
    onnxruntime's output is x @ the dequantized weight, offsets included. int4 bundles store the offsets in
    fp16 and cast them back; bundles that promise exact GGUF values (int8, faithful) keep them in fp32."""
    embed, head, down, odd = toy_weights(tied=False)
    model = toy_graph(embed, head, down, odd)
    rng = np.random.default_rng(5)
    scales = rng.uniform(0.01, 0.05, (F, H // 32)).astype(np.float32)
    # as gguf_repack leaves them: zero point = the code nearest the block's zero, offset = the rest (|O| <= s/2)
    with_offsets = BlockQuantized(q=rng.integers(0, 16, (F, H), dtype=np.uint8), scales=scales,
                                  zero_points=rng.integers(6, 10, (F, H // 32), dtype=np.uint8), bits=4,
                                  block_size=32, k=H, offsets=(scales * rng.uniform(-0.5, 0.5, scales.shape)))
    plain = float_coder(QuantPlan(precision="int4", algo="k_quant", block_size=32))

    def coder(name, w_nk, bits, role):
        return (with_offsets, "offsets") if name == DOWN else plain(name, w_nk, bits, role)

    plan = QuantPlan(precision=precision, algo="k_quant", block_size=32, accuracy_level=0, lm_head_bits=4,
                     embed_bits=4, share_embeddings=False, gguf_mode=gguf_mode)
    report = quantize_graph(model, ExternalWeights(model, Path(".")), plan, coder=coder)
    assert report.tensors[DOWN]["block_offsets"] is True
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["ReduceSum"] == 1 and ops["MatMulNBits"] == 2
    assert ops["Cast"] == (1 if stored == TensorProto.FLOAT16 else 0)
    offsets = {t.name: t for t in model.graph.initializer}[f"{DOWN.replace('.weight', '')}.offsets"]
    assert offsets.data_type == stored
    table = quantize(embed, 4, 32, "k_quant").dequantize()
    hidden = (table[IDS[0]] @ with_offsets.dequantize().T)[:, :40] @ odd
    expected = hidden @ quantize(head.T, 4, 32, "k_quant").dequantize().T
    assert not np.allclose(with_offsets.dequantize(), BlockQuantized(**{**vars(with_offsets), "offsets": None}).dequantize())
    np.testing.assert_allclose(run(model, IDS)[0], expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits", [8, 6])
def test_split_coarse_is_exact_and_rounds_the_coarse_half_to_nearest(bits: int) -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (64, 96)).astype(np.float32)
    r = bits - 4  # residual bits
    for bq in (quantize_rtn(w, bits, 32, symmetric=True), quantize(w, bits, 32, "k_quant")):
        coarse, residual = split_coarse(bq)
        assert coarse.bits == 4 and residual.bits == r
        np.testing.assert_allclose(coarse.dequantize() + residual.dequantize(), bq.dequantize(), atol=1e-6)
        # and what onnxruntime reads back from the packed bytes is the same residual
        back = BlockQuantized.from_packed(residual.packed_codes(), residual.scales, residual.packed_zero_points(),
                                          n=residual.n, k=residual.k, bits=r, block_size=32)
        np.testing.assert_array_equal(back.q, residual.q)
        np.testing.assert_array_equal(back.zero_points, residual.zero_points)
    sym = quantize_rtn(w, bits, 32, symmetric=True)
    coarse, residual = split_coarse(sym)
    step = np.repeat(sym.scales, 32, axis=1)
    err = (sym.dequantize() - coarse.dequantize()) / step  # in units of the fine step
    half = 1 << (r - 1)
    rounded = np.repeat(residual.zero_points == half, 32, axis=1)
    assert rounded.mean() > 0.8  # most blocks: round to nearest, error within [-half, half - 1] steps
    assert err[rounded].min() >= -half - 1e-4 and err[rounded].max() <= half - 1 + 1e-4
    assert abs(float(err.mean())) < 1.5 * half / 8 + 0.2 and float(np.abs(err).max()) <= 2 * half - 1 + 1e-4
    with pytest.raises(ValueError, match="needs a plain 8- or 6-bit matrix .*got 4 bits"):
        split_coarse(quantize(w, 4, 32, "rtn"))


def test_untied_weights_that_differ_are_not_shared() -> None:
    embed, head, down, odd = toy_weights(tied=True)
    head = head + np.random.default_rng(3).normal(0, 0.2, head.shape).astype(np.float32)  # ~20% apart
    model = toy_graph(embed, head, down, odd)
    report = quantize_graph(model, ExternalWeights(model, Path(".")), QuantPlan(precision="int4"))
    assert report.tied is None
    gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert gbq.input[0] == "model.embed_tokens.qweight"


def test_eight_bit_prefixes_keep_matching_weights_at_8_bits() -> None:
    embed, head, down, odd = toy_weights(tied=False)
    model = toy_graph(embed, head, down, odd)
    report = quantize_graph(model, ExternalWeights(model, Path(".")),
                            QuantPlan(precision="int4", eight_bit=("mlp.down_proj",)))
    assert report.tensors[DOWN]["bits"] == 8 and report.tensors[HEAD]["bits"] == 4


def test_float_precisions_are_refused() -> None:
    model = toy_graph(*toy_weights(tied=False))
    with pytest.raises(ExportError, match="needs int4 or int8, got precision 'fp32'") as info:
        quantize_graph(model, ExternalWeights(model, Path(".")), QuantPlan(precision="fp32"))
    assert "--precision int4 or int8" in str(info.value)


def test_external_weights_are_read_without_loading_the_graph(tmp_path: Path) -> None:
    embed, head, down, odd = toy_weights(tied=False)
    save_with_external_data(toy_graph(embed, head, down, odd), tmp_path)
    assert (tmp_path / "model.onnx.data").is_file()
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    weights = ExternalWeights(model, tmp_path)
    np.testing.assert_array_equal(weights.array(HEAD), head)
    np.testing.assert_array_equal(weights.array(EMBED), embed)
    assert "starts" in weights and "nope" not in weights
    weights.materialize_rest(model)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


# ------------------------------------------------------------------------------------------ the bundles


def ops_of(bundle: Path) -> tuple[onnx.ModelProto, Counter]:
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    return model, Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_bundles_have_only_block_quantized_weights(int4_bundle, int8_bundle, precision: str) -> None:
    bundle = int4_bundle if precision == "int4" else int8_bundle
    model, ops = ops_of(bundle)
    inits = {t.name for t in model.graph.initializer}
    # packed qkv, o, gate, up, down per layer + lm_head; int8 on the CPU profile computes with float
    # activations (exact_accuracy_level 0), so each 8-bit weight is two exact 4-bit halves + an Add
    halves = 2 if precision == "int8" else 1
    assert ops["MatMulNBits"] == halves * (5 * LAYERS + 1)
    # int4: the lm_head is split in a 4-bit half and a 2-bit residual, whose candidate rows one more gather reads
    refined = precision == "int4"
    assert ops["GatherBlockQuantized"] == (2 if refined else 1) and ops["GroupQueryAttention"] == LAYERS
    assert ops["TopK"] == ops["ScatterElements"] == (1 if refined else 0)
    assert ops["SkipSimplifiedLayerNormalization"] >= LAYERS
    assert not [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & inits]
    assert not [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    out = {o.name: o for o in model.graph.output}["logits"]
    assert [d.dim_value or d.dim_param for d in out.type.tensor_type.shape.dim][1:] == ["logits_length", 512]

    # the manifest reports what the graph holds
    manifest = read_manifest(bundle)
    assert manifest.precision == precision
    tensors = manifest.quantization["tensors"]
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs["block_size"] == 32
            if precision == "int8":  # the halves: 4-bit codes, float activations
                assert node.input[1].endswith((".hi.qweight", ".lo.qweight"))
                assert attrs["bits"] == 4 and attrs["accuracy_level"] == 0
                continue
            name = node.input[1].replace(".qweight", ".weight")
            assert attrs["bits"] == (4 if str(tensors[name]["bits"]).startswith("4+") else tensors[name]["bits"])
            assert attrs["accuracy_level"] == 4
    bits = {name: t["bits"] for name, t in tensors.items()}
    if precision == "int8":
        assert set(bits.values()) == {8}
    else:  # int4 bundles: the profile's eight_bit kinds (attention, gate) 8-bit, the lm_head at the profile's
        # vocab_bits (6) as 4+2; up/down and the (untied) embedding 4-bit
        assert {bits[n] for n in bits if ".attn." in n or "gate_proj" in n} == {8}
        assert tensors["lm_head.MatMul.weight"]["bits"] == "4+2"
        assert tensors["lm_head.MatMul.weight"]["refine_top_k"] == 128
        assert {bits[n] for n in bits if "up_proj" in n or "down_proj" in n or "embed" in n} == {4}


def test_tied_int4_bundle_stores_the_shared_matrix_once(int4_tied_bundle) -> None:
    model, ops = ops_of(int4_tied_bundle)
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head"))
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    # the embedding reads the lm_head's coarse codes and the one residual tensor, the lm_head's candidates
    # only the residual (their coarse logits are TopK's values): 3 gathers over 2 tensors
    assert len(gathers) == 3 and sum(n.input[0] == head.input[1] for n in gathers) == 1
    assert len({n.input[0] for n in gathers}) == 2
    assert read_manifest(int4_tied_bundle).quantization["summary"]["shared_embeddings"]["bits"] == "4+2"
    assert ops["MatMulNBits"] == 5 * LAYERS + 1


@pytest.mark.parametrize("device, overrides, level, halves", [
    ("host", {}, 4, False),                                     # int4: int8 activations, fast
    ("host", {"precision": "int8"}, 0, True),                   # int8 promises exact values: float activations
    ("host", {"gguf_mode": "faithful"}, 0, True),               # so does "faithful"
    ("host", {"precision": "int8", "exact_accuracy_level": 4}, 4, False),
    ("host", {"accuracy_level": 0}, 0, True),                   # int4 asked for float activations
    ("cuda", {"precision": "int8"}, 0, False),                  # GPU kernels need no halves
])
def test_accuracy_level_follows_what_the_bundle_promises(device, overrides, level, halves) -> None:
    from edgeqwen.export import _accuracy_level, _float_activations_on_cpu
    from edgeqwen.profiles import load_profile

    profile = load_profile(device, **overrides)
    assert _accuracy_level(profile) == level and _float_activations_on_cpu(profile) is halves


def test_int4_keeps_profile_kinds_and_the_models_measured_layers_at_8_bits():
    from types import SimpleNamespace

    from edgeqwen.catalog import CATALOG
    from edgeqwen.export import _eight_bit
    from edgeqwen.profiles import load_profile

    entry = CATALOG["qwen2.5-coder-0.5b-instruct"]
    kept = _eight_bit(load_profile("rpi5"), SimpleNamespace(entry=entry))
    assert kept[:3] == ("attn.", "mlp.gate_proj", "lm_head") and "layers.23.mlp." in kept
    assert "measured" not in kept
    assert _eight_bit(load_profile("rpi5"), SimpleNamespace(entry=None)) == ("attn.", "mlp.gate_proj", "lm_head")
    # a profile without "measured" keeps exactly its own patterns (the smallest int4 bundle)
    assert _eight_bit(load_profile("rpi5", eight_bit=["attn."]), SimpleNamespace(entry=entry)) == ("attn.",)
    assert _eight_bit(load_profile("rpi5", precision="int8"), SimpleNamespace(entry=entry)) == ()
    # the substring patterns must not spill over to neighbouring layer numbers
    plan_names = [f"model.layers.{i}.mlp.up_proj.MatMul.weight" for i in range(24)]
    hit = [n for n in plan_names if any(p in n for p in kept)]
    assert hit == [f"model.layers.{i}.mlp.up_proj.MatMul.weight" for i in (6, 14, 16, 19, 23)]


def test_weight_estimate_counts_the_eight_bit_weights() -> None:
    """The RAM budget check must see what mixed precision costs (a flat 5.2 bits/weight was 25% low)."""
    from types import SimpleNamespace

    from edgeqwen.catalog import CATALOG
    from edgeqwen.export import _eight_bit, estimate_weight_bytes
    from edgeqwen.profiles import load_profile

    entry = CATALOG["qwen2.5-coder-0.5b-instruct"]
    config = dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, vocab_size=151936,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False, model_type="qwen2")

    def mib(**overrides) -> float:
        plan = _eight_bit(load_profile("host", **overrides), SimpleNamespace(entry=entry))
        return estimate_weight_bytes(config, overrides.get("precision", "int4"), plan) / 2**20

    attn, with_head, default = mib(eight_bit=["attn."]), mib(eight_bit=["attn.", "lm_head"]), mib()
    # written (model.onnx.data): attn.+lm_head 433 MiB, default 497 MiB. An untied source counts as two
    # vocabulary matrices (8-bit lm_head + 4-bit embedding): a GGUF whose two are equal is written with one
    # shared matrix, which the config cannot tell, so the estimate errs high there, never low.
    assert 433 <= with_head < 433 * 1.15 and 497 <= default < 497 * 1.15
    assert 60 < default - with_head < 70  # gate projections + measured layers: written +64 MiB
    assert 60 < with_head - attn < 75  # the 8-bit lm_head
    assert mib(precision="int8") > default


def test_cli_eight_bit_none_gives_an_all_4_bit_body(tiny_models, tmp_path, allow_tiny, capsys) -> None:
    """`--eight-bit none` replaces the profile's list: attention and gate projections go 4-bit too."""
    from edgeqwen.bundle import read_manifest
    from edgeqwen.cli import main

    out = tmp_path / "b"
    assert main(["export", str(tiny_models["qwen2_untied"]), "--device", "host", "-o", str(out), "--precision",
                 "int4", "--eight-bit", "none", "--no-verify", "--json"]) == 0
    manifest = read_manifest(out)
    assert manifest.quantization["plan"]["eight_bit"] == []
    bits = {name: t["bits"] for name, t in manifest.quantization["tensors"].items()}
    assert {bits[n] for n in bits if ".attn." in n or "gate_proj" in n or "lm_head" in n} == {4}
    assert main(["export", str(tiny_models["qwen2_untied"]), "-o", str(tmp_path / "c"), "--eight-bit",
                 "mlp.gate"]) == 2
    assert "'eight_bit'" in capsys.readouterr().err


def test_cli_vocab_refine_zero_keeps_a_plain_8_bit_lm_head(tiny_models, tmp_path, allow_tiny, capsys) -> None:
    from edgeqwen.cli import main

    out = tmp_path / "b"
    assert main(["export", str(tiny_models["qwen2_untied"]), "-o", str(out), "--precision", "int4",
                 "--vocab-refine", "0", "--no-verify", "--json"]) == 0
    manifest = read_manifest(out)
    assert manifest.quantization["plan"]["vocab_refine"] == 0 and manifest.profile["vocab_refine"] == 0
    assert manifest.quantization["tensors"]["lm_head.MatMul.weight"]["bits"] == 8
    _, ops = ops_of(out)
    assert ops["TopK"] == 0 and ops["GatherBlockQuantized"] == 1
    assert main(["export", str(tiny_models["qwen2_untied"]), "-o", str(tmp_path / "c"), "--vocab-refine",
                 "-3"]) == 2
    assert "'vocab_refine'" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda", "windows-dml"])
def test_fp16_profiles_write_fp16_scales_and_verify_against_the_source(tiny_models, tmp_path, allow_tiny,
                                                                        device) -> None:
    """GPU profiles build an fp16 graph: MatMulNBits/GatherBlockQuantized take their output type from the
    scales, so fp32 scales made the graph invalid (onnxruntime: type mismatch at the embedding)."""
    from edgeqwen import runtime
    from edgeqwen.export import export

    # vocab_bits=8: this random tiny model's near-flat logits put fp16 activations + the 6-bit vocabulary at
    # 78% top-1 agreement (ratio 1.006); the 6-bit split itself is checked in fp32 above and by the e2e test
    result = export(str(tiny_models["qwen2_tied"]), device, tmp_path / "b", progress=False, vocab_bits=8)
    assert result.manifest.verification["passed"] is True  # CPU run of the fp16 graph vs the float model
    model, ops = ops_of(tmp_path / "b")
    inits = {t.name: t for t in model.graph.initializer}
    quantized = [n for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert {inits[n.input[2]].data_type for n in quantized if n.input[2] in inits} == {TensorProto.FLOAT16}
    assert ops["TopK"] == 1  # the vocabulary split works in fp16 too
    assert result.manifest.quantization["summary"]["shared_embeddings"]["bits"] == "4+4"  # the override reached it
    out = runtime.load(tmp_path / "b", provider="cpu").generate("1, 2, 3,", max_new_tokens=4, temperature=0)
    assert len(out.tokens) == 4


def test_calibration_records_every_layers_gram_matrix_once_per_input(qwen2_tied) -> None:
    """GPTQ needs X^T X of each linear layer's input (attention included); q/k/v and gate/up read the same
    input, so they get the same matrix. Checked against the inputs captured from transformers directly."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from edgeqwen.export.calibrate import calibration_text, input_statistics

    text = calibration_text()[:600]
    importance, hessians = input_statistics(qwen2_tied, text, hessian_for=("mlp.", "attn."))
    ids = Tokenizer.from_file(str(qwen2_tied / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    model = AutoModelForCausalLM.from_pretrained(str(qwen2_tied), dtype=torch.float32).eval()
    seen: dict[str, np.ndarray] = {}
    layer = model.model.layers[1]
    for name, module in (("q", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj),
                         ("gate", layer.mlp.gate_proj), ("down", layer.mlp.down_proj)):
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0][0].double().numpy()))
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]))
    prefix = "model.layers.1."
    for key, onnx_names in (("q", ("attn.qkv_proj", "attn.q_proj", "attn.k_proj", "attn.v_proj")),
                            ("o", ("attn.o_proj",)), ("gate", ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj")),
                            ("down", ("mlp.down_proj",))):
        x = seen[key]
        want = x.T @ x / len(ids)
        for onnx_name in onnx_names:
            got = hessians[f"{prefix}{onnx_name}.MatMul.weight"]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
            np.testing.assert_allclose(importance[f"{prefix}{onnx_name}.MatMul.weight"], np.diag(want), rtol=1e-4)
    _, mlp_only = input_statistics(qwen2_tied, text, hessian_for=("mlp.",))
    assert not any("attn." in k for k in mlp_only) and f"{prefix}mlp.up_proj.MatMul.weight" in mlp_only


def _matmul_8bit(codes: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, block: int) -> onnx.ModelProto:
    n, blocks, _ = codes.shape
    inits = [numpy_helper.from_array(codes, "w.qweight"), numpy_helper.from_array(scales.reshape(-1), "w.scales")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp.reshape(-1).astype(np.uint8), "w.qzeros"))
    node = helper.make_node("MatMulNBits", ["x", *[t.name for t in inits]], ["y"], name="mm", domain="com.microsoft",
                            K=blocks * block, N=n, bits=8, block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, blocks * block])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("code_bits,with_zp,block,halves", [(5, True, 32, 2), (6, True, 16, 2), (8, True, 32, 2),
                                                            (8, False, 32, 2), (4, True, 32, 1)])
def test_eight_bit_weights_split_into_4_bit_halves_compute_the_same_product(code_bits, with_zp, block, halves):
    """GGUF Q5_0 / Q6_K copies (5-, 6-bit codes), full 8-bit codes, the kernel's default zero point (128), and
    codes that fit 4 bits (one half, no Add): the split graph multiplies by exactly the same weights."""
    from edgeqwen.export.halves import split_eight_bit

    rng = np.random.default_rng(code_bits * 10 + block)
    n, blocks = 24, 3
    codes = rng.integers(0, 2 ** code_bits, (n, blocks, block)).astype(np.uint8)
    zp = rng.integers(0, 2 ** code_bits, (n, blocks)).astype(np.uint8) if with_zp else None
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    model = _matmul_8bit(codes, scales, zp, block)
    x = rng.normal(0, 1, (5, blocks * block)).astype(np.float32)
    z = (zp if with_zp else np.full((n, blocks), 128)).astype(np.float32)
    w = ((codes.astype(np.float32) - z[..., None]) * scales[..., None]).reshape(n, -1)  # [N, K]

    nodes, inits, count, added = split_eight_bit(list(model.graph.node), list(model.graph.initializer))
    assert count == 1 and [n_.op_type for n_ in nodes] == ["MatMulNBits"] * halves + ["Add"] * (halves - 1)
    assert all({a.name: a.i for a in n_.attribute}["bits"] == 4 for n_ in nodes if n_.op_type == "MatMulNBits")
    assert {t.name for t in inits}.isdisjoint({"w.qweight", "w.scales", "w.qzeros"})  # nobody reads them now
    del model.graph.node[:], model.graph.initializer[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w.T, rtol=1e-5, atol=1e-5)


def test_eight_bit_halves_in_an_int8_graph_keep_the_shared_embedding_codes() -> None:
    """Float-activation int8 (accuracy level 0, halves on): no 8-bit MatMulNBits is left, the tied
    embedding's gather still reads the 8-bit codes, and the logits equal the unsplit graph's."""
    embed, head, down, odd = toy_weights(tied=True)
    outs, graphs = [], []
    for halves in (False, True):
        model = toy_graph(embed, head, down, odd)
        plan = QuantPlan(precision="int8", algo="k_quant", accuracy_level=0, embed_bits=8, lm_head_bits=8,
                         eight_bit_halves=halves)
        report = quantize_graph(model, ExternalWeights(model, Path(".")), plan)
        outs.append(run(model, IDS))
        graphs.append(model)
    assert report.tied is not None and report.halves["weights"] == 2  # lm_head and the body weight
    nbits = [{a.name: a.i for a in n.attribute}["bits"] for n in graphs[1].graph.node if n.op_type == "MatMulNBits"]
    assert nbits == [4, 4, 4, 4]
    gbq = next(n for n in graphs[1].graph.node if n.op_type == "GatherBlockQuantized")
    assert gbq.input[0] in {t.name for t in graphs[1].graph.initializer}
    assert report.summary()["eight_bit_halves"] == report.halves
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision,gguf_mode,shared", [("int4", "balanced", True), ("int4", "faithful", False),
                                                        ("int8", "balanced", False)])
def test_slightly_different_tables_are_shared_only_where_values_are_not_promised_exact(precision, gguf_mode,
                                                                                       shared) -> None:
    """An untied GGUF whose embedding and lm_head differ by a few % (the 0.5B: Q5_0 vs Q8_0, 4.4%): int4 shares
    one matrix to save size; int8 and "faithful" bundles, which promise the source's values, keep both."""
    embed, head, down, odd = toy_weights(tied=True)
    head = head + np.random.default_rng(4).normal(0, 0.03, head.shape).astype(np.float32)  # ~3% apart
    model = toy_graph(embed, head, down, odd)
    bits = 8 if precision == "int8" else 4
    report = quantize_graph(model, ExternalWeights(model, Path(".")),
                            QuantPlan(precision=precision, gguf_mode=gguf_mode, embed_bits=bits, lm_head_bits=bits))
    assert (report.tied is not None) is shared
    if shared:
        assert 0.01 < report.tied["relative_difference"] < 0.08


def _kernels(bundle: Path) -> tuple[Counter, set]:
    """(bits -> count, accuracy levels) of the bundle's MatMulNBits nodes."""
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    attrs = [{a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"]
    return Counter(a["bits"] for a in attrs), {a["accuracy_level"] for a in attrs}


def test_cli_int8_computes_with_float_activations_unless_asked_for_level_4(tiny_models, tmp_path, allow_tiny,
                                                                            capsys) -> None:
    """`--precision int8` on the CPU profile: the profile's exact_accuracy_level (0), float activations
    through 4-bit halves (no 8-bit MatMulNBits left), verified against the float source; `--accuracy-level 4`
    gives the fast 8-bit kernels back; a GPU profile keeps its 8-bit kernels."""
    from edgeqwen import runtime
    from edgeqwen.cli import main

    out = tmp_path / "exact"
    assert main(["export", str(tiny_models["qwen2_untied"]), "-o", str(out), "--precision", "int8", "--json"]) == 0
    manifest = read_manifest(out)
    assert manifest.profile["accuracy_level"] == 4 and manifest.profile["exact_accuracy_level"] == 0
    assert manifest.quantization["plan"]["accuracy_level"] == 0
    assert manifest.quantization["plan"]["eight_bit_halves"]
    assert manifest.quantization["summary"]["eight_bit_halves"]["weights"] == 2 * 5 + 1  # qkv, o, gate, up, down; lm_head
    bits, levels = _kernels(out)
    assert bits[8] == 0 and bits[4] >= 2 * 11 and levels == {0}
    assert manifest.verification["passed"]
    model = runtime.load(out)
    assert model.generate("def add(a, b):", max_new_tokens=4, temperature=0).tokens
    fast = tmp_path / "fast"  # the flag sets the level of whatever is exported
    assert main(["export", str(tiny_models["qwen2_untied"]), "-o", str(fast), "--precision", "int8",
                 "--accuracy-level", "4", "--no-verify", "--json"]) == 0
    assert read_manifest(fast).quantization["plan"]["eight_bit_halves"] is False
    bits, levels = _kernels(fast)
    assert bits == Counter({8: 11}) and levels == {4}
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tiny_models["qwen2_untied"]), "-o", str(tmp_path / "bad"), "--accuracy-level", "7"])
    assert exit_.value.code == 2
    assert "--accuracy-level" in capsys.readouterr().err
    gpu = tmp_path / "gpu"  # CUDA has its own 8-bit kernels: no halves there
    assert main(["export", str(tiny_models["qwen2_untied"]), "-o", str(gpu), "--device", "cuda", "--precision",
                 "int8", "--no-verify", "--json"]) == 0
    assert read_manifest(gpu).quantization["plan"]["eight_bit_halves"] is False


def test_layer_accuracy_sets_the_level_of_each_layer_type(tiny_models, tmp_path, allow_tiny, capsys) -> None:
    """`--layer-accuracy down_proj=0` on an int8 level-4 export: the down projections (and only they) compute
    with float activations, as exact 4-bit halves; every other weight keeps the fast 8-bit level-4 kernel;
    the plan records the table, the bundle generates, and prompt lookup is off by default (a float-activation
    kernel is in the graph). A bad type is refused with the allowed ones. (Level 4 moves a random tiny
    model's greedy tokens too much for the export check, hence --no-verify; the real 0.5B is measured in
    benchmarks/README.md.)"""
    from edgeqwen import runtime
    from edgeqwen.cli import main

    out = tmp_path / "mixed"
    assert main(["export", str(tiny_models["qwen2_untied"]), "-o", str(out), "--precision", "int8",
                 "--accuracy-level", "4", "--layer-accuracy", "down_proj=0", "--no-verify", "--json"]) == 0
    manifest = read_manifest(out)
    assert manifest.profile["accuracy_levels"] == {"down_proj": 0}
    assert manifest.quantization["plan"]["accuracy_levels"] == [["down_proj", 0]]
    assert manifest.quantization["summary"]["eight_bit_halves"]["weights"] == 2  # one down_proj per layer
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    kernels = {(n.input[1].split(".")[4] if ".layers." in n.input[1] else "lm_head",
                {a.name: a.i for a in n.attribute}["bits"], {a.name: a.i for a in n.attribute}["accuracy_level"])
               for n in graph.node if n.op_type == "MatMulNBits"}
    assert kernels == {("qkv_proj", 8, 4), ("o_proj", 8, 4), ("gate_proj", 8, 4), ("up_proj", 8, 4),
                       ("down_proj", 4, 0), ("lm_head", 8, 4)}
    model = runtime.load(out)
    assert model._lookup(None) == 0
    assert model.generate("def add(a, b):", max_new_tokens=4, temperature=0).tokens
    capsys.readouterr()
    assert main(["export", str(tiny_models["qwen2_untied"]), "-o", str(tmp_path / "bad"),
                 "--layer-accuracy", "down=0"]) == 2
    err = capsys.readouterr().err
    assert "Profile key 'accuracy_levels.down' has invalid value 'down'" in err and "did you mean 'down_proj'" in err
    assert not (tmp_path / "bad").exists()


def test_plan_level_for_prefers_the_kind_over_its_group() -> None:
    plan = QuantPlan(accuracy_level=4, accuracy_levels=(("mlp", 1), ("down_proj", 0), ("lm_head", 2)))
    assert plan.level_for("model.layers.3.mlp.down_proj.MatMul.weight") == 0
    assert plan.level_for("model.layers.3.mlp.up_proj.MatMul.weight") == 1
    assert plan.level_for("model.layers.3.attn.qkv_proj.MatMul.weight") == 4
    assert plan.level_for("lm_head.MatMul.weight") == 2
    assert QuantPlan(accuracy_level=3).level_for("lm_head.MatMul.weight") == 3
