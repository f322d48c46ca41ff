"""GGUF repacking: our block decoders against the gguf package's reference dequantizer, and the coder that
chooses between copying GGUF codes exactly and fitting them (run on small GGUF files written here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize

from edgeqwen.export.blockquant import BlockQuantized
from edgeqwen.export.gguf_repack import (
    DECODERS,
    EXACT_TYPES,
    WITH_MINIMUM,
    concat_rows,
    gguf_coder,
    gguf_names,
    with_block_size,
)
from edgeqwen.export.quantize import QuantPlan, float_coder

# byte offset of the float16 super-block scale(s) of each type, so random blocks get sane, finite scales
SCALE_OFFSETS = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q6_K": (208,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                 "Q4_1": (0, 2), "Q5_1": (0, 2)}


def random_blocks(type_name: str, rows: int, k: int, seed: int) -> np.ndarray:
    """uint8 [rows, bytes]: random codes with float16 scales in a realistic range (both signs)."""
    qtype = GGMLQuantizationType[type_name]
    block, nbytes = GGML_QUANT_SIZES[qtype]
    assert k % block == 0
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // block, nbytes), dtype=np.uint8)
    for off in SCALE_OFFSETS[type_name]:
        d = (rng.uniform(0.002, 0.05, size=(rows, k // block)) * rng.choice([-1, 1], (rows, k // block)))
        raw[..., off : off + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, type_name: str) -> np.ndarray:
    return gguf_dequantize(raw, GGMLQuantizationType[type_name]).astype(np.float32)


@pytest.mark.parametrize("type_name", EXACT_TYPES)
def test_decoders_match_the_gguf_reference_bit_for_bit(type_name: str) -> None:
    raw = random_blocks(type_name, rows=6, k=512, seed=EXACT_TYPES.index(type_name))
    bq = DECODERS[type_name](raw)
    expected = reference(raw, type_name)
    assert expected.shape == (6, 512) and np.all(np.isfinite(expected))
    assert bq.k == 512 and bq.q.shape == (6, 512)
    if type_name in WITH_MINIMUM:  # their block offset is one fp32 rounding away from the reference's terms
        np.testing.assert_allclose(bq.dequantize(), expected, rtol=0, atol=2**-22 * np.abs(expected).max())
    else:
        assert np.array_equal(bq.dequantize(), expected)


def test_decoded_codes_fit_their_declared_width() -> None:
    widths = {"Q4_0": (4, 32), "Q5_0": (8, 32), "Q8_0": (8, 32), "Q6_K": (8, 16), "Q4_K": (4, 32),
              "Q4_1": (4, 32), "Q5_1": (8, 32), "Q5_K": (8, 32)}
    assert set(widths) == set(EXACT_TYPES)
    for type_name, (bits, block) in widths.items():
        bq = DECODERS[type_name](random_blocks(type_name, 3, 256, seed=1))
        assert (bq.bits, bq.block_size) == (bits, block), type_name
        assert int(bq.q.max()) < 2**bits
        # only the types with a float minimum need block offsets
        assert (bq.offsets is not None) == (type_name in WITH_MINIMUM), type_name
        if type_name in WITH_MINIMUM:
            # the zero point is the code nearest the block's zero; the offset what is left, <= half a step
            top = 15 if bits == 4 else 31
            assert int(bq.q.max()) <= top and bq.offsets.shape == bq.scales.shape == (3, 8)
            inside = (bq.zero_points > 0) & (bq.zero_points < top)  # not clipped to the code range
            assert inside.any(), type_name
            assert np.all(np.abs(bq.offsets[inside]) <= np.abs(bq.scales[inside]) / 2 * (1 + 1e-6)), type_name
        # Q5_0 and Q6_K use only the low 5/6 bits of their 8-bit codes
        if type_name == "Q5_0":
            assert int(bq.q.max()) < 32 and set(np.unique(bq.zero_points)) == {16}
        if type_name == "Q6_K":
            assert int(bq.q.max()) < 64 and set(np.unique(bq.zero_points)) == {32}


def test_with_block_size_splits_blocks_without_changing_values() -> None:
    bq = DECODERS["Q8_0"](random_blocks("Q8_0", 4, 128, seed=2))
    split = with_block_size(bq, 16)
    assert split.block_size == 16 and split.scales.shape == (4, 8) and split.zero_points.shape == (4, 8)
    assert np.array_equal(split.dequantize(), bq.dequantize())
    assert with_block_size(bq, 32) is bq


def test_concat_rows_stacks_parts_at_the_smallest_block() -> None:
    q6 = DECODERS["Q6_K"](random_blocks("Q6_K", 3, 256, seed=3))
    q8 = DECODERS["Q8_0"](random_blocks("Q8_0", 2, 256, seed=4))
    q5 = DECODERS["Q5_0"](random_blocks("Q5_0", 5, 256, seed=5))
    both = concat_rows([q8, q6, q5])
    assert both.bits == 8 and both.block_size == 16 and both.n == 10 and both.k == 256
    expected = np.concatenate([q8.dequantize(), q6.dequantize(), q5.dequantize()])
    assert np.array_equal(both.dequantize(), expected)


def test_concat_rows_keeps_q4_k_offsets_beside_parts_without_them() -> None:
    """A faithful pack of Q4_K and Q6_K parts (the 1.5B's q/k/v): 8-bit, block 16, Q4_K's offsets repeated
    over its half-blocks, zero offsets for the Q6_K rows; the values are both parts' own."""
    q4k = DECODERS["Q4_K"](random_blocks("Q4_K", 3, 256, seed=8))
    q6 = DECODERS["Q6_K"](random_blocks("Q6_K", 2, 256, seed=9))
    both = concat_rows([q4k, q6])
    assert both.bits == 8 and both.block_size == 16 and both.offsets.shape == (5, 16)
    assert np.all(both.offsets[3:] == 0) and np.array_equal(both.offsets[:3, 0::2], q4k.offsets)
    np.testing.assert_allclose(both.dequantize(), np.concatenate([q4k.dequantize(), q6.dequantize()]), rtol=0, atol=0)


def test_concat_rows_widens_4bit_parts_exactly() -> None:
    q4 = DECODERS["Q4_0"](random_blocks("Q4_0", 3, 64, seed=6))
    q8 = DECODERS["Q8_0"](random_blocks("Q8_0", 2, 64, seed=7))
    both = concat_rows([q4, q8])
    assert both.bits == 8 and both.n == 5
    assert np.array_equal(both.dequantize(), np.concatenate([q4.dequantize(), q8.dequantize()]))


# ------------------------------------------------------------------------------------------------ names


def test_gguf_names_maps_the_builder_graph_to_gguf_tensors() -> None:
    untied = {"token_embd.weight": 0, "output.weight": 0}
    tied = {"token_embd.weight": 0}
    assert gguf_names("model.embed_tokens.weight", untied) == ["token_embd.weight"]
    assert gguf_names("lm_head.MatMul.weight", untied) == ["output.weight"]
    assert gguf_names("lm_head.MatMul.weight", tied) == ["token_embd.weight"]
    assert gguf_names("model.layers.3.attn.qkv_proj.MatMul.weight", tied) == [
        "blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.3.attn_v.weight"]
    assert gguf_names("model.layers.0.attn.o_proj.MatMul.weight", tied) == ["blk.0.attn_output.weight"]
    assert gguf_names("model.layers.12.mlp.gate_up_proj.MatMul.weight", tied) == [
        "blk.12.ffn_gate.weight", "blk.12.ffn_up.weight"]
    assert gguf_names("model.layers.1.mlp.down_proj.MatMul.weight", tied) == ["blk.1.ffn_down.weight"]
    assert gguf_names("model.layers.1.mlp.rotary.MatMul.weight", tied) is None
    assert gguf_names("something.else", tied) is None


# ------------------------------------------------------------------------------------------- the coder

HIDDEN = 256  # one Q6_K/Q4_K super-block per row


def write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    """tensors: name -> (type name, raw uint8 [rows, bytes] or float32 [rows, K])."""
    writer = GGUFWriter(str(path), "qwen2")
    for name, (type_name, data) in tensors.items():
        if type_name == "F32":
            writer.add_tensor(name, data.astype(np.float32))
        else:
            writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def gguf_file(tmp_path: Path):
    """A GGUF with one attention block (q/k/v in different exact types), one Q4_0, one Q4_K and an F32."""
    raw = {
        "blk.0.attn_q.weight": ("Q6_K", random_blocks("Q6_K", 8, HIDDEN, seed=10)),
        "blk.0.attn_k.weight": ("Q8_0", random_blocks("Q8_0", 4, HIDDEN, seed=11)),
        "blk.0.attn_v.weight": ("Q5_0", random_blocks("Q5_0", 4, HIDDEN, seed=12)),
        "blk.0.attn_output.weight": ("Q4_0", random_blocks("Q4_0", 8, HIDDEN, seed=13)),
        "blk.0.ffn_up.weight": ("Q4_K", random_blocks("Q4_K", 16, HIDDEN, seed=14)),
        "blk.0.ffn_down.weight": ("F32", np.random.default_rng(15).normal(0, 0.05, (8, HIDDEN))),
        "output.weight": ("Q8_0", random_blocks("Q8_0", 4, HIDDEN, seed=16)),
    }
    path = write_gguf(tmp_path / "tiny.gguf", raw)
    floats = {name: (data.astype(np.float32) if t == "F32" else reference(data, t)) for name, (t, data) in raw.items()}
    return path, floats


def never(*args):  # the fallback coder must not be reached where the GGUF codes are copied
    raise AssertionError(f"fallback coder called for {args[0]}")


def recording_fallback(calls: list):
    def code(name, w_nk, bits, role):
        calls.append((name, bits, role))
        return BlockQuantized(np.zeros(w_nk.shape, np.uint8), np.ones((w_nk.shape[0], 1), np.float32),
                              np.zeros((w_nk.shape[0], 1), np.uint8), bits, w_nk.shape[1], w_nk.shape[1]), "stub"

    return code


QKV = "model.layers.0.attn.qkv_proj.MatMul.weight"
O_PROJ = "model.layers.0.attn.o_proj.MatMul.weight"
UP = "model.layers.0.mlp.up_proj.MatMul.weight"
DOWN = "model.layers.0.mlp.down_proj.MatMul.weight"


def test_faithful_copies_exact_types_bit_for_bit(gguf_file) -> None:
    path, floats = gguf_file
    code = gguf_coder(path, QuantPlan(precision="int4", gguf_mode="faithful"), fallback=never)
    w_qkv = np.concatenate([floats[f"blk.0.attn_{p}.weight"] for p in "qkv"])
    bq, how = code(QKV, w_qkv, 4, "body")
    assert how == "gguf-exact:Q5_0+Q6_K+Q8_0"
    assert bq.bits == 8 and bq.block_size == 16 and bq.n == 16
    assert np.array_equal(bq.dequantize(), w_qkv)
    bq, how = code(O_PROJ, floats["blk.0.attn_output.weight"], 4, "body")
    assert how == "gguf-exact:Q4_0" and bq.bits == 4 and bq.block_size == 32
    assert np.array_equal(bq.dequantize(), floats["blk.0.attn_output.weight"])
    bq, how = code(UP, floats["blk.0.ffn_up.weight"], 4, "body")
    assert how == "gguf-exact:Q4_K" and bq.bits == 4 and bq.block_size == 32 and bq.offsets is not None
    np.testing.assert_allclose(bq.dequantize(), floats["blk.0.ffn_up.weight"], rtol=0, atol=1e-7)


def test_q4_k_is_copied_exactly_with_block_offsets_in_the_body_only(gguf_file) -> None:
    """Q4_K is copied (codes, scales and its minimum as block offsets) where 8 bits were asked, since 8 would
    double the bytes of what stays a 4-bit value, and in faithful mode; fast mode fits it where 4 bits were
    asked (the offsets cost decode time). Gathers take no offsets: as an embedding or lm_head it is fitted."""
    path, floats = gguf_file
    w = floats["blk.0.ffn_up.weight"]
    calls: list = []
    for plan, bits in ((QuantPlan(precision="int4", gguf_mode="fast", block_size_8bit=128), 8),
                       (QuantPlan(precision="int8", gguf_mode="fast"), 8),
                       (QuantPlan(precision="int4", gguf_mode="faithful"), 4)):
        bq, how = gguf_coder(path, plan, fallback=recording_fallback(calls))(UP, w, bits, "body")
        assert how == "gguf-exact:Q4_K" and (bq.bits, bq.block_size) == (4, 32), (plan.precision, bits)
        np.testing.assert_allclose(bq.dequantize(), w, rtol=0, atol=1e-7)
        assert calls == []
    code = gguf_coder(path, QuantPlan(precision="int4", gguf_mode="fast"), fallback=recording_fallback(calls))
    bq, how = code(UP, w, 4, "body")
    assert how == "stub:Q4_K" and calls == [(UP, 4, "body")]
    for role in ("embed", "lm_head"):
        bq, how = code(UP, w, 8, role)
        assert how == "stub:Q4_K" and calls[-1] == (UP, 8, role)


def test_balanced_mode_copies_every_4_bit_body_weight_and_refits_the_rest_like_fast(gguf_file) -> None:
    """"balanced" = fast, except that a weight the GGUF already holds at 4 bits (Q4_K here) is copied exactly
    where 4 bits were asked, instead of being re-quantized; 5-bit and float weights still go to the plan's
    coder, and gathers (no offsets) still fit Q4_K."""
    path, floats = gguf_file
    calls: list = []
    code = gguf_coder(path, QuantPlan(precision="int4", gguf_mode="balanced"), fallback=recording_fallback(calls))
    w = floats["blk.0.ffn_up.weight"]
    bq, how = code(UP, w, 4, "body")
    assert how == "gguf-exact:Q4_K" and (bq.bits, bq.block_size) == (4, 32) and bq.offsets is not None
    np.testing.assert_allclose(bq.dequantize(), w, rtol=0, atol=1e-7)
    assert calls == []
    bq, how = code(DOWN, floats["blk.0.ffn_down.weight"], 4, "body")
    assert how == "stub:F32" and calls == [(DOWN, 4, "body")]
    w_qkv = np.concatenate([floats[f"blk.0.attn_{p}.weight"] for p in "qkv"])
    assert code(QKV, w_qkv, 4, "body")[1] == "stub:Q5_0+Q6_K+Q8_0"
    assert code(UP, w, 4, "embed")[1] == "stub:Q4_K" and calls[-1] == (UP, 4, "embed")


@pytest.mark.parametrize("type_name", ["Q4_1", "Q5_1", "Q5_K"])
def test_types_with_a_minimum_are_copied_where_the_plan_keeps_their_precision(tmp_path, type_name: str) -> None:
    """Q4_1/Q5_1/Q5_K in the body: exact (with offsets) in faithful and int8 plans; an int4 plan's 8-bit
    request copies the 4-bit type and refits the 5-bit ones at its wider block; 4 bits asked: fitted in
    "fast", and in "balanced" the 4-bit type copied, the 5-bit ones fitted."""
    raw = random_blocks(type_name, 8, HIDDEN, seed=20)
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (type_name, raw)})
    w = reference(raw, type_name)
    four_bit = type_name == "Q4_1"
    cases = [(QuantPlan(precision="int4", gguf_mode="faithful"), 4, True),
             (QuantPlan(precision="int8", gguf_mode="fast"), 8, True),
             (QuantPlan(precision="int4", gguf_mode="fast", block_size_8bit=128), 8, four_bit),
             (QuantPlan(precision="int4", gguf_mode="fast"), 4, False),
             (QuantPlan(precision="int4", gguf_mode="balanced"), 4, four_bit)]
    for plan, bits, exact in cases:
        calls: list = []
        bq, how = gguf_coder(path, plan, fallback=recording_fallback(calls))(UP, w, bits, "body")
        if exact:
            assert how == f"gguf-exact:{type_name}" and bq.offsets is not None and calls == [], plan
            assert bq.bits == (4 if four_bit else 8)
            np.testing.assert_allclose(bq.dequantize(), w, rtol=0, atol=2**-22 * np.abs(w).max())
        else:
            assert how == f"stub:{type_name}" and calls == [(UP, bits, "body")], plan


def test_fp16_graph_weights_still_get_the_exact_codes(gguf_file) -> None:
    """GPU profiles build an fp16 float graph: its weights are the GGUF values rounded to fp16, which must
    not read as a name/layout mismatch (it did: fp16 bundles silently fell back to fitted 4-bit)."""
    path, floats = gguf_file
    code = gguf_coder(path, QuantPlan(precision="int4", gguf_mode="faithful"), fallback=never)
    w = floats["blk.0.attn_output.weight"]
    bq, how = code(O_PROJ, w.astype(np.float16), 4, "body")
    assert how == "gguf-exact:Q4_0" and np.array_equal(bq.dequantize(), w)


def test_faithful_fits_inexact_types_at_8_bits_with_bounded_error(gguf_file) -> None:
    path, floats = gguf_file
    code = gguf_coder(path, QuantPlan(precision="int4", gguf_mode="faithful", block_size=32), fallback=never)
    for name, gguf_name, type_name in ((DOWN, "blk.0.ffn_down.weight", "F32"),):
        w = floats[gguf_name]
        bq, how = code(name, w, 4, "body")
        assert how == f"gguf-fit8:{type_name}"
        assert bq.bits == 8 and bq.block_size == 32
        blocks = w.reshape(w.shape[0], -1, 32)
        # the grid spans the block's values and zero (an integer zero point must be representable)
        span = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0))[..., None]
        err = np.abs(bq.dequantize() - w).reshape(blocks.shape)
        # 8-bit steps are 1/255 of the span; the range search may clip an outlier by about a step more
        assert np.all(err <= 2 * span / 255 + 1e-7), type_name
        assert np.sqrt(np.mean(err**2) / np.mean(w**2)) < 1 / 128, type_name  # a 4-bit fit is ~10x worse


def test_fast_mode_copies_q4_0_and_sensitive_types_and_refits_the_rest(gguf_file) -> None:
    path, floats = gguf_file
    calls: list = []
    code = gguf_coder(path, QuantPlan(precision="int4", gguf_mode="fast"), fallback=recording_fallback(calls))
    bq, how = code(O_PROJ, floats["blk.0.attn_output.weight"], 4, "body")
    assert how == "gguf-exact:Q4_0" and bq.bits == 4
    # Q4_K asked at 4 bits and F32: fast mode hands them to the plan's coder at the plan's bits
    bq, how = code(UP, floats["blk.0.ffn_up.weight"], 4, "body")
    assert how == "stub:Q4_K" and calls == [(UP, 4, "body")]
    bq, how = code(DOWN, floats["blk.0.ffn_down.weight"], 4, "body")
    assert how == "stub:F32" and calls[-1] == (DOWN, 4, "body")
    # a mixed pack with a 5-bit part is neither all-4-bit nor all-sensitive: refit at 4 bits
    w_qkv = np.concatenate([floats[f"blk.0.attn_{p}.weight"] for p in "qkv"])
    bq, how = code(QKV, w_qkv, 4, "body")
    assert how == "stub:Q5_0+Q6_K+Q8_0" and calls[-1] == (QKV, 4, "body")


def test_a_q8_0_lm_head_is_copied_unless_the_plan_asks_for_4_bits(gguf_file) -> None:
    """The GGUF's 8-bit output matrix is kept exactly by default; a profile without "lm_head" in eight_bit
    asks for 4 bits, and then it is refitted like any other weight."""
    path, floats = gguf_file
    calls: list = []
    code = gguf_coder(path, QuantPlan(precision="int4", gguf_mode="fast"), fallback=recording_fallback(calls))
    bq, how = code("lm_head.MatMul.weight", floats["output.weight"], 8, "lm_head")
    assert how == "gguf-exact:Q8_0" and bq.bits == 8 and calls == []
    bq, how = code("lm_head.MatMul.weight", floats["output.weight"], 4, "lm_head")
    assert how == "stub:Q8_0" and calls == [("lm_head.MatMul.weight", 4, "lm_head")]
    # a body tensor of a sensitive type stays exact even when 4 bits were asked (the GGUF's own choice)
    bq, how = code("model.layers.0.attn.k_proj.MatMul.weight", floats["blk.0.attn_k.weight"], 4, "body")
    assert how == "gguf-exact:Q8_0"


def test_an_int4_plan_with_a_wider_8_bit_block_refits_what_it_keeps_at_8_bits(gguf_file) -> None:
    """With block_size_8bit, the 8-bit body weights of an int4 bundle (sensitive GGUF types, and weights the
    profile keeps at 8 bits) go to the fallback at 8 bits instead of being copied with the GGUF's 16/32-wide
    blocks; Q4_0 copies, the vocabulary matrix, faithful mode and int8 plans are unchanged."""
    path, floats = gguf_file
    calls: list = []
    plan = QuantPlan(precision="int4", gguf_mode="fast", block_size_8bit=128)
    code = gguf_coder(path, plan, fallback=recording_fallback(calls))
    k_name = "model.layers.0.attn.k_proj.MatMul.weight"
    bq, how = code(k_name, floats["blk.0.attn_k.weight"], 4, "body")  # Q8_0: sensitive, kept at 8 bits
    assert how == "stub:Q8_0" and calls == [(k_name, 8, "body")]
    bq, how = code(QKV, np.concatenate([floats[f"blk.0.attn_{p}.weight"] for p in "qkv"]), 8, "body")
    assert how == "stub:Q5_0+Q6_K+Q8_0" and calls[-1] == (QKV, 8, "body")
    bq, how = code(O_PROJ, floats["blk.0.attn_output.weight"], 4, "body")
    assert how == "gguf-exact:Q4_0"
    bq, how = code("lm_head.MatMul.weight", floats["output.weight"], 8, "lm_head")
    assert how == "gguf-exact:Q8_0" and len(calls) == 2
    for other in (QuantPlan(precision="int4", gguf_mode="faithful", block_size_8bit=128),
                  QuantPlan(precision="int8", gguf_mode="fast", block_size_8bit=128),
                  QuantPlan(precision="int4", gguf_mode="fast", block_size_8bit=192)):  # 192 does not divide K
        bq, how = gguf_coder(path, other, fallback=never)(k_name, floats["blk.0.attn_k.weight"], 8, "body")
        assert how == "gguf-exact:Q8_0" and bq.block_size == 32


def test_the_float_coder_fits_8_bit_body_weights_at_the_wider_block() -> None:
    w = np.random.default_rng(3).normal(0, 0.05, (8, HIDDEN)).astype(np.float32)
    code = float_coder(QuantPlan(precision="int4", algo="k_quant", block_size=32, block_size_8bit=128))
    bq, how = code(DOWN, w, 8, "body")
    assert bq.bits == 8 and bq.block_size == 128 and how == "k_quant/block128"
    assert np.sqrt(np.mean((bq.dequantize() - w) ** 2) / np.mean(w**2)) < 1 / 100
    bq, how = code(DOWN, w, 4, "body")
    assert bq.bits == 4 and bq.block_size == 32 and how == "k_quant"
    bq, how = code("lm_head.MatMul.weight", w, 8, "lm_head")  # the vocabulary matrix keeps the plan's block
    assert bq.block_size == 32


def test_mismatched_weights_are_not_copied(gguf_file) -> None:
    """The guard: codes that do not reproduce the graph's float weights (name/layout mismatch) are refit."""
    path, floats = gguf_file
    calls: list = []
    code = gguf_coder(path, QuantPlan(precision="int4", gguf_mode="fast"), fallback=recording_fallback(calls))
    wrong = floats["blk.0.attn_output.weight"][::-1].copy()  # rows in the wrong order
    _, how = code(O_PROJ, wrong, 4, "body")
    assert how == "stub:Q4_0" and calls == [(O_PROJ, 4, "body")]


def test_names_missing_from_the_gguf_go_to_the_fallback(gguf_file) -> None:
    path, _ = gguf_file
    calls: list = []
    code = gguf_coder(path, QuantPlan(precision="int8", gguf_mode="fast"), fallback=recording_fallback(calls))
    w = np.zeros((8, HIDDEN), np.float32)
    _, how = code("model.layers.5.mlp.down_proj.MatMul.weight", w, 8, "body")
    assert how == "stub:?" and calls == [("model.layers.5.mlp.down_proj.MatMul.weight", 8, "body")]


def test_four_bit_copies_names_the_weights_smoothing_must_leave_alone(gguf_file) -> None:
    """o_proj (Q4_0) and up_proj (Q4_K) stay exact 4-bit copies even where 8 bits were asked, so smooth.py
    must not re-code them; q/k/v (Q6_K + Q8_0 + Q5_0) is refit at 8 bits anyway; an F32 part is no copy."""
    from edgeqwen.export.gguf_repack import four_bit_copies

    path, _ = gguf_file
    up = "model.layers.0.mlp.up_proj.MatMul.weight"
    down = "model.layers.0.mlp.down_proj.MatMul.weight"
    assert four_bit_copies(path, [QKV, O_PROJ, up, down, "model.layers.7.attn.qkv_proj.MatMul.weight"]) == {O_PROJ, up}


def _qwen2_gguf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A one-layer qwen2 GGUF with a 64-token vocabulary and only the tensors given."""
    writer = GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(512)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([chr(ord("a") + i % 26) * (1 + i // 26) for i in range(64)])
    writer.add_token_types([1] * 64)
    writer.add_token_merges([])
    writer.add_eos_token_id(1)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tensors, words", [
    # the embedding's shape disagrees with the vocabulary: transformers raises
    ({"token_embd.weight": np.zeros((32, 256), np.float32)}, r"transformers could not load tiny\.gguf: RuntimeError"),
    # shapes fine, but the layer's weights are absent: transformers would fill them with random values
    ({"token_embd.weight": np.zeros((64, 256), np.float32), "output_norm.weight": np.ones(256, np.float32)},
     r"tiny\.gguf lacks \d+ weight tensor\(s\) the model needs, e\.g\. model\.layers\.0\."),
])
def test_a_gguf_that_does_not_load_whole_is_a_source_error(tmp_path: Path, monkeypatch, tensors, words) -> None:
    from edgeqwen.errors import SourceError
    from edgeqwen.export.sources import resolve_source

    monkeypatch.setenv("EDGEQWEN_ALLOW_ANY_SIZE", "1")
    monkeypatch.setenv("EDGEQWEN_HOME", str(tmp_path / "home"))
    path = _qwen2_gguf(tmp_path / "tiny.gguf", tensors)
    with pytest.raises(SourceError, match=words) as info:
        resolve_source(str(path), progress=False)
    assert "Hugging Face folder" in info.value.fix
    assert not any((tmp_path / "home").rglob(".tmp-*"))  # the half-converted folder is gone


# A GGUF of the whole tiny model, as llama.cpp lays one out: the conversion, the name mapping and the repack
# together. The real 0.5B (tests/e2e) covers only Qwen2 and its own types; Qwen3 GGUFs (q/k norms, a head size
# transformers' loader does not read) come through here.
MIXED_TYPES = {"attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q8_0", "ffn_up": "Q4_0",
               "ffn_gate": "Q4_1", "ffn_down": "Q5_0", "token_embd": "Q8_0", "output": "Q8_0"}


@pytest.mark.parametrize("kind", ["qwen2_untied", "qwen3"])
def test_a_whole_gguf_converts_to_its_own_values_and_exports_exactly(kind: str, tiny_models, tmp_path: Path,
                                                                     monkeypatch) -> None:
    import gguf
    import torch
    from tiny_gguf import write_gguf
    from transformers import AutoModelForCausalLM

    from edgeqwen import runtime
    from edgeqwen.bundle import read_manifest
    from edgeqwen.export import export
    from edgeqwen.export.sources import gguf_to_hf

    monkeypatch.setenv("EDGEQWEN_ALLOW_ANY_SIZE", "1")
    monkeypatch.setenv("EDGEQWEN_HOME", str(tmp_path / "home"))
    path = write_gguf(tiny_models[kind], tmp_path / f"{kind}.gguf", MIXED_TYPES)

    # the float folder holds exactly the GGUF's dequantized values (a Qwen3 used to fail: head size 128 assumed)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_to_hf(path, progress=False)), dtype=torch.float32)
    arch = gguf.MODEL_ARCH.QWEN3 if kind == "qwen3" else gguf.MODEL_ARCH.QWEN2
    names = gguf.get_tensor_name_map(arch, 2)
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}
    state = reference.state_dict()
    for name, value in state.items():
        if name == "lm_head.weight" and reference.config.tie_word_embeddings:
            continue
        expected = stored[names.get_name(name, try_suffixes=(".weight", ".bias"))]
        np.testing.assert_array_equal(value.numpy(), expected.reshape(value.shape), err_msg=name)
    assert (kind == "qwen3") == ("model.layers.0.self_attn.q_norm.weight" in state)

    # int8 copies every weight's codes; with float activations it computes what transformers does on that file
    export(str(path), "host", tmp_path / "int8", precision="int8", progress=False)
    manifest = read_manifest(tmp_path / "int8")
    hows = {name: t["how"] for name, t in manifest.quantization["tensors"].items()}
    # 2 layers x (qkv, o, gate, up, down), lm_head and, when not tied to it, the embedding
    assert len(hows) == (11 if reference.config.tie_word_embeddings else 12), hows
    assert all(how.startswith("gguf-exact:") for how in hows.values()), hows
    assert manifest.verification["agreement"] == 1.0
    model = runtime.load(tmp_path / "int8", threads=1)
    prompt = "def add(a, b):\n    return"
    ours = model.generate(prompt, max_new_tokens=24, temperature=0, stop_token_ids=[]).tokens
    ids = torch.tensor([model.encode(prompt)])
    theirs = reference.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, ids.shape[1]:]
    assert list(ours) == theirs.tolist() and len(ours) == 24

    # int4 ("balanced"): the weights the GGUF holds at 4 bits are its own codes, never re-quantized
    export(str(path), "host", tmp_path / "int4", precision="int4", progress=False)
    tensors = read_manifest(tmp_path / "int4").quantization["tensors"]
    four = {name: t["how"] for name, t in tensors.items() if "up_proj" in name or "gate_proj" in name}
    assert sorted(four.values()) == ["gguf-exact:Q4_0"] * 2 + ["gguf-exact:Q4_1"] * 2, four
    assert all(tensors[name]["bits"] == 4 for name in four)
