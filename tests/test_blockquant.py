"""Block quantization: the numbers, the byte layout, and agreement with onnxruntime's own kernels.

The layout tests build one-node ONNX graphs (MatMulNBits, GatherBlockQuantized) from our packed bytes and
check that onnxruntime computes exactly what ``BlockQuantized.dequantize`` says: that is the contract the
exported graphs rely on.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeqwen.export.blockquant import BlockQuantized, quantize, quantize_fitted, quantize_rtn

MS = "com.microsoft"


def heavy_tailed(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Student-t weights with a per-row offset: outliers and blocks not centred on zero, like real LLMs."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(df=3, size=(n, k)).astype(np.float32) * 0.02
    return w + rng.normal(0, 0.01, size=(n, 1)).astype(np.float32)


def unpack_codes(packed: np.ndarray, bits: int, n: int, k_padded: int) -> np.ndarray:
    """Independent reading of MatMulNBits' B layout: [N, blocks, blob], 4-bit low nibble first."""
    flat = packed.reshape(n, -1)
    if bits == 8:
        return flat[:, :k_padded]
    out = np.empty((n, flat.shape[1] * 2), np.uint8)
    out[:, 0::2] = flat & 0x0F
    out[:, 1::2] = flat >> 4
    return out[:, :k_padded]


def unpack_zero_points(packed: np.ndarray, bits: int, n: int, k_blocks: int) -> np.ndarray:
    flat = packed.reshape(n, -1)
    if bits == 8:
        return flat[:, :k_blocks]
    out = np.empty((n, flat.shape[1] * 2), np.uint8)
    out[:, 0::2] = flat & 0x0F
    out[:, 1::2] = flat >> 4
    return out[:, :k_blocks]


def run_one_node(node, inputs: dict[str, np.ndarray], initializers: list, outputs: list) -> np.ndarray:
    graph_inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
                    for name, a in inputs.items()]
    graph = helper.make_graph([node], "one_node", graph_inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("algo", ["rtn", "rtn_asym", "k_quant"])
def test_pack_unpack_round_trip(bits: int, algo: str) -> None:
    w = heavy_tailed(24, 96)  # 3 blocks of 32: an odd block count exercises zero-point padding
    bq = quantize(w, bits, 32, algo)
    assert bq.q.shape == (24, 96) and bq.scales.shape == (24, 3) and bq.zero_points.shape == (24, 3)
    assert bq.q.dtype == np.uint8 and int(bq.q.max()) < 2**bits
    packed = bq.packed_codes()
    assert packed.shape == (24, 3, 32 * bits // 8)
    q = unpack_codes(packed, bits, 24, 96)
    zp = unpack_zero_points(bq.packed_zero_points(), bits, 24, 3)
    np.testing.assert_array_equal(q, bq.q)
    np.testing.assert_array_equal(zp, bq.zero_points)
    rebuilt = BlockQuantized(q, bq.scales, zp, bits, 32, 96)
    np.testing.assert_array_equal(rebuilt.dequantize(), bq.dequantize())
    # reading a bundle's flat initializers back (the zero points are absent when they are the implicit ones)
    zp_init = None if bq.default_zero_point() else bq.packed_zero_points().reshape(-1)
    back = BlockQuantized.from_packed(packed.reshape(-1), bq.scales.reshape(-1), zp_init, n=24, k=96, bits=bits,
                                      block_size=32)
    np.testing.assert_array_equal(back.q, bq.q)
    np.testing.assert_array_equal(back.zero_points, bq.zero_points)
    np.testing.assert_array_equal(back.dequantize(), bq.dequantize())


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_at_most_half_a_step(bits: int) -> None:
    w = heavy_tailed(16, 128, seed=1)
    for symmetric in (True, False):
        bq = quantize_rtn(w, bits, 32, symmetric=symmetric)
        err = np.abs(bq.dequantize() - w).reshape(16, 4, 32)
        step = bq.scales[..., None]
        if symmetric:
            # the grid runs from -mid*s to (mid-1)*s: values beyond the top level are clipped by design;
            # everything else is within half a step
            top = (2 ** (bits - 1) - 1) * step * np.sign(-step)
            inside = np.abs(w.reshape(16, 4, 32)) <= np.abs(top)
            assert np.all(err[inside] <= np.abs(step).repeat(32, -1)[inside] * 0.5 + 1e-7)
        else:
            assert np.all(err <= np.abs(step) * 0.5 + 1e-7)


def test_symmetric_rtn_uses_the_implicit_zero_point_and_hits_the_extreme_exactly() -> None:
    w = heavy_tailed(8, 64, seed=2)
    bq = quantize_rtn(w, 4, 32, symmetric=True)
    assert bq.default_zero_point()
    deq = bq.dequantize().reshape(8, 2, 32)
    blocks = w.reshape(8, 2, 32)
    idx = np.abs(blocks).argmax(-1)[..., None]
    np.testing.assert_allclose(np.take_along_axis(deq, idx, -1), np.take_along_axis(blocks, idx, -1), rtol=1e-6)
    assert not quantize_rtn(w, 4, 32, symmetric=False).default_zero_point()


def test_k_not_a_multiple_of_the_block_is_padded_and_trimmed() -> None:
    w = heavy_tailed(4, 40, seed=3)
    bq = quantize_fitted(w, 8, 32)
    assert bq.k == 40 and bq.q.shape == (4, 64) and bq.k_blocks == 2
    deq = bq.dequantize()
    assert deq.shape == (4, 40)
    assert np.abs(deq - w).max() < 0.01 * np.abs(w).max()


def test_all_zero_block_stays_zero() -> None:
    w = heavy_tailed(4, 64, seed=4)
    w[:, :32] = 0.0
    for algo in ("rtn", "rtn_asym", "k_quant"):
        deq = quantize(w, 4, 32, algo).dequantize()
        assert np.all(np.isfinite(deq)), algo
        np.testing.assert_array_equal(deq[:, :32], 0.0, err_msg=algo)


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown block quantization algorithm 'awq'"):
        quantize(heavy_tailed(2, 32), 4, 32, "awq")


# ------------------------------------------------------------------------------------------- GPTQ, HQQ


def correlated_layer(seed: int = 0, k: int = 256, n: int = 96, tokens: int = 2048):
    """Weights, inputs with correlated channels (and a few loud ones, as in LLM activations), and H = X^T X."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((tokens, k)) @ mix * (1 + 3 * (rng.random(k) < 0.05))
    return heavy_tailed(n, k, seed), x, x.T @ x / tokens


def output_error(bq: BlockQuantized, w: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (bq.dequantize() - w).T) / np.linalg.norm(x @ w.T))


def test_gptq_lowers_the_layer_output_error_below_the_fitted_quantizer() -> None:
    w, x, h = correlated_layer()
    fitted = quantize(w, 4, 32, "k_quant", np.diag(h))
    gptq = quantize(w, 4, 32, "gptq", np.diag(h), h)
    assert gptq.bits == 4 and gptq.q.max() <= 15 and np.all(gptq.zero_points <= 15)
    assert output_error(gptq, w, x) < 0.85 * output_error(fitted, w, x)


def test_gptq_with_uncorrelated_inputs_is_the_fitted_quantizer() -> None:
    """With a diagonal Hessian no error can be moved to other channels: GPTQ must reduce to its block fit."""
    w = heavy_tailed(8, 96, seed=3)
    imp = np.linspace(0.5, 2.0, 96)
    gptq = quantize(w, 4, 32, "gptq", imp, np.diag(imp))
    fitted = quantize_fitted(w, 4, 32, importance=imp)
    np.testing.assert_array_equal(gptq.q, fitted.q)
    # per-block importance normalisation differs in the last digits: same grid, scales within 1e-3
    np.testing.assert_allclose(gptq.scales, fitted.scales, rtol=1e-3)


def test_onnxruntime_gptq_port_still_equals_round_to_nearest() -> None:
    """Why quantize_gptq is our own: onnxruntime's port propagates no error (it reads the upper Cholesky
    factor by column). If this starts failing, onnxruntime fixed it and we should call theirs."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq

    w, x, h = correlated_layer(seed=1)
    theirs = gptq(np.ascontiguousarray(w.T), h.copy(), num_bits=4, group_size=32, scheme="asym")
    rtn = quantize(w, 4, 32, "rtn_asym").dequantize()
    np.testing.assert_allclose(theirs.T, rtn, atol=1e-7)


def test_hqq_gives_integer_zero_points_and_no_worse_than_rtn() -> None:
    w, x, _ = correlated_layer(seed=2)
    hqq = quantize(w, 4, 32, "hqq")
    assert hqq.zero_points.dtype == np.uint8 and hqq.zero_points.max() <= 15 and hqq.q.max() <= 15
    assert output_error(hqq, w, x) <= 1.01 * output_error(quantize(w, 4, 32, "rtn_asym"), w, x)


# ------------------------------------------------------------------------------- agreement with onnxruntime


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("algo", ["rtn", "k_quant"])  # rtn: no zero-point input; k_quant: explicit zero points
def test_matmulnbits_layout_matches_onnxruntime(bits: int, algo: str) -> None:
    n, k, block = 40, 96, 32
    w = heavy_tailed(n, k, seed=5)
    bq = quantize(w, bits, block, algo)
    with_zp = not bq.default_zero_point()
    assert with_zp == (algo == "k_quant")
    inits = [numpy_helper.from_array(bq.packed_codes(), "B"), numpy_helper.from_array(bq.scales.reshape(-1), "S")]
    node_inputs = ["A", "B", "S"]
    if with_zp:
        inits.append(numpy_helper.from_array(bq.packed_zero_points().reshape(-1), "Z"))
        node_inputs.append("Z")
    node = helper.make_node("MatMulNBits", node_inputs, ["Y"], domain=MS, K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=0)
    x = np.random.default_rng(6).normal(size=(5, k)).astype(np.float32)
    y = run_one_node(node, {"A": x}, inits, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [5, n])])
    expected = x.astype(np.float64) @ bq.dequantize().astype(np.float64).T
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # and the layout really matters: the unquantized weights give a visibly different answer
    assert np.abs(x @ w.T - y).max() > 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_layout_matches_onnxruntime(bits: int) -> None:
    vocab, hidden, block = 50, 96, 32
    table = heavy_tailed(vocab, hidden, seed=7)
    bq = quantize_fitted(table, bits, block)
    inits = [numpy_helper.from_array(bq.packed_codes().reshape(vocab, -1), "D"),
             numpy_helper.from_array(bq.scales, "S"),
             numpy_helper.from_array(bq.packed_zero_points(), "Z")]
    node = helper.make_node("GatherBlockQuantized", ["D", "I", "S", "Z"], ["Y"], domain=MS, gather_axis=0,
                            quantize_axis=1, block_size=block, bits=bits)
    ids = np.array([[0, 3, 49, 3, 17]], np.int64)
    y = run_one_node(node, {"I": ids}, inits, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 5, hidden])])
    np.testing.assert_allclose(y[0], bq.dequantize()[ids[0]], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------- quality


@pytest.mark.parametrize("bits", [4, 8])
def test_fitted_error_is_below_round_to_nearest(bits: int) -> None:
    w = heavy_tailed(256, 256, seed=8)

    def mse(bq):
        return float(np.mean((bq.dequantize() - w) ** 2))

    fitted = mse(quantize_fitted(w, bits, 32))
    rtn_sym = mse(quantize_rtn(w, bits, 32, symmetric=True))
    rtn_asym = mse(quantize_rtn(w, bits, 32, symmetric=False))
    assert fitted <= rtn_asym and fitted <= rtn_sym
    if bits == 4:  # at 4 bits the search must win by more than rounding luck
        assert fitted < 0.97 * min(rtn_asym, rtn_sym)


def test_importance_weighting_lowers_the_weighted_error() -> None:
    w = heavy_tailed(128, 128, seed=9)
    rng = np.random.default_rng(10)
    importance = rng.lognormal(0.0, 2.0, size=128).astype(np.float32)  # a few channels matter a lot

    def weighted(bq):
        return float(np.sum(importance * (bq.dequantize() - w) ** 2))

    plain = weighted(quantize_fitted(w, 4, 32))
    aware = weighted(quantize_fitted(w, 4, 32, importance=importance))
    assert aware < 0.95 * plain
    # the same importance through the profile-level dispatcher
    assert weighted(quantize(w, 4, 32, "k_quant", importance)) == pytest.approx(aware)


def test_row_chunking_does_not_change_the_result() -> None:
    w = heavy_tailed(70, 64, seed=11)
    whole = quantize_fitted(w, 4, 32)
    chunked = quantize_fitted(w, 4, 32, row_chunk=16)
    np.testing.assert_array_equal(whole.q, chunked.q)
    np.testing.assert_array_equal(whole.scales, chunked.scales)
    np.testing.assert_array_equal(whole.zero_points, chunked.zero_points)
