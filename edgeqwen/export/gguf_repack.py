"""GGUF-aware weight import: reuse the GGUF's own integer codes instead of re-quantizing its dequantized floats.

Re-quantizing an already quantized weight stacks two rounding errors. When a GGUF block type maps exactly
onto what onnxruntime's MatMulNBits/GatherBlockQuantized kernels compute (``(q - zp) * scale`` per block),
we copy the codes and scales bit for bit:

============  ==========================================  =======================================
GGUF type     GGUF value                                  ONNX form (exact)
============  ==========================================  =======================================
Q4_0          d * (q4 - 8), block 32                      4-bit, zp 8, scale d, block 32
Q5_0          d * (q5 - 16), block 32                     8-bit, zp 16, scale d, block 32
Q8_0          d * q8, block 32                            8-bit, zp 128, scale d, block 32
Q6_K          d * sc_j * (q6 - 32), sub-blocks of 16       8-bit, zp 32, scale d*sc_j, block 16
Q4_1          d * q4 + m, block 32                        4-bit, zp z ~ -m/d, scale d, offset m + d*z  (*)
Q5_1          d * q5 + m, block 32                        8-bit, zp z ~ -m/d, scale d, offset m + d*z  (*)
Q4_K          d * sc_j * q4 - dmin * m_j, sub-blocks of 32  4-bit, zp z_j ~ dmin*m_j / (d*sc_j), scale d*sc_j,
                                                          block 32, offset d*sc_j*z_j - dmin*m_j       (*)
Q5_K          as Q4_K with 5-bit codes                     8-bit, otherwise as Q4_K                     (*)
============  ==========================================  =======================================

(*) These types carry a float minimum, which no integer zero point expresses. The zero point is the code
nearest the block's zero and the rest travels as a per-block *offset* (at most half a step) that the graph
adds as (per-block sums of the input) @ offsets, a [K/32, N] float matmul (``quantize._offset_correction``):
exact up to one fp32 rounding (int4 bundles store the offsets in fp16: up to 1/4096 of a step more), at
~1 bit a weight more than the codes (~0.5 in fp16). Only the body's MatMulNBits take it;
GatherBlockQuantized has no such term, so an embedding or shared vocabulary matrix of these types is fitted.

Every other type (Q2_K, Q3_K, the IQ types, and plain F16/F32 weights) has no such form; those are *fitted*: asymmetric block quantization with a searched
scale and zero point (``blockquant.quantize_fitted``) of the exactly dequantized values, at 8 bits in
"faithful" mode (error ~1/256 of a block's range) and at the plan's bits in "fast" and "balanced" modes.

Three modes (profile key ``gguf_mode``, ``--gguf-mode``):

- "faithful" is exact where the table allows and 8-bit elsewhere: the bundle is larger and decodes slower,
  but says what the GGUF says.
- "balanced" (the int4 profiles' default) is "fast" except that every body weight the GGUF already holds at
  4 bits (Q4_0, Q4_1, Q4_K) is copied exactly wherever it is, offsets and all, instead of being re-quantized
  to 4 bits a second time (int4 bundles store the offsets in fp16: ≤ 1/4096 of a step). Measured
  (benchmarks/README.md, "gguf_mode balanced"): on the 1.5B, whose GGUF is a real Q4_K_M, top-1 agreement
  92.7 / 98.8 / 95.9 / 94.3% → 97.4 / 99.7 / 99.2 / 97.9% at the same size (+0.5%) for a 4–6% longer step,
  and the export is ~4× faster (no GPTQ for those weights); on the 0.5B (12 Q4_K weights) +0.6 to +1.5
  points for a 1.5–5% longer step.
- "fast" fits int4 everywhere except Q4_0 (already 4-bit, copied exactly) and the weights kept at 8 bits
  (the GGUF's own Q6_K/Q8_0 ones, and those the profile lists in ``eight_bit``): an int4 profile refits those
  at 8 bits with its wider ``block_size_8bit`` rather than copying them with the GGUF's 16/32-wide blocks,
  whose scales cost decode time; a Q4_1/Q4_K weight among them is copied exactly at 4 bits with its offsets
  (8 bits would double its bytes to hold 4-bit values).

The vocabulary matrix is copied exactly here; an int4 bundle that splits it for the lm_head
(``quantize._split_for_refine``) re-codes it at that wider block too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .blockquant import BlockQuantized, quantize_fitted
from .quantize import QuantPlan, WeightCoder, wide_8bit_block

EXACT_TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q6_K", "Q4_1", "Q5_1", "Q4_K", "Q5_K")
WITH_MINIMUM = ("Q4_1", "Q5_1", "Q4_K", "Q5_K")  # exact only with block offsets: MatMulNBits in the body
FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")
SENSITIVE = ("Q6_K", "Q8_0")


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _codes_32(qs: np.ndarray, qh: np.ndarray | None = None) -> np.ndarray:
    """Codes of the block-32 types (Q4_0/Q4_1/Q5_0/Q5_1): element j in the low nibble of byte j, j+16 in
    its high nibble; the 5-bit types add bit j of the 32-bit mask ``qh`` (4 bytes) as bit 4."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)
    if qh is not None:
        mask = np.ascontiguousarray(qh).view(np.uint32)  # [n, blocks, 1]
        q |= (((mask >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4)
    return q


def decode_q4_0(rows: np.ndarray) -> BlockQuantized:
    n = rows.shape[0]
    b = rows.reshape(n, -1, 18)
    d = _f16(b[..., 0:2]).reshape(n, -1)
    q = _codes_32(b[..., 2:18])
    return BlockQuantized(q.reshape(n, -1), d, np.full(d.shape, 8, np.uint8), 4, 32, q.shape[1] * 32)


def decode_q5_0(rows: np.ndarray) -> BlockQuantized:
    n = rows.shape[0]
    b = rows.reshape(n, -1, 22)
    d = _f16(b[..., 0:2]).reshape(n, -1)
    q = _codes_32(b[..., 6:22], b[..., 2:6])
    return BlockQuantized(q.reshape(n, -1), d, np.full(d.shape, 16, np.uint8), 8, 32, q.shape[1] * 32)


def decode_q8_0(rows: np.ndarray) -> BlockQuantized:
    n = rows.shape[0]
    b = rows.reshape(n, -1, 34)
    d = _f16(b[..., 0:2]).reshape(n, -1)
    q = (np.ascontiguousarray(b[..., 2:34]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return BlockQuantized(q.reshape(n, -1), d, np.full(d.shape, 128, np.uint8), 8, 32, q.shape[1] * 32)


def decode_q6_k(rows: np.ndarray) -> BlockQuantized:
    n = rows.shape[0]
    b = rows.reshape(n, -1, 210)
    nb = b.shape[1]
    ql, qh = b[..., 0:128], b[..., 128:192]
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)  # [n, nb, 16]
    d = _f16(b[..., 208:210])  # [n, nb, 1]
    q = np.empty((n, nb, 256), np.uint8)
    for half in range(2):  # two halves of 128 values, each from 64 ql bytes and 32 qh bytes
        l = ql[..., half * 64 : half * 64 + 64]
        h = qh[..., half * 32 : half * 32 + 32]
        o = half * 128
        q[..., o : o + 32] = (l[..., :32] & 0x0F) | ((h & 3) << 4)
        q[..., o + 32 : o + 64] = (l[..., 32:] & 0x0F) | (((h >> 2) & 3) << 4)
        q[..., o + 64 : o + 96] = (l[..., :32] >> 4) | (((h >> 4) & 3) << 4)
        q[..., o + 96 : o + 128] = (l[..., 32:] >> 4) | (((h >> 6) & 3) << 4)
    scales = (d * sc).reshape(n, nb * 16)  # one scale per 16 values; fp16 x int8 is exact in fp32
    return BlockQuantized(q.reshape(n, -1), scales, np.full(scales.shape, 32, np.uint8), 8, 16, nb * 256)


def _with_minimum(q: np.ndarray, scales: np.ndarray, mins: np.ndarray, bits: int, k: int) -> BlockQuantized:
    """Blocks of 32 whose value is ``scale * q + mins`` (a float minimum, which no integer zero point holds):
    zp is the code nearest the block's zero and the offset what is left, at most half a step. The kernel then
    multiplies centred codes, as for any asymmetric weight (with zp 0 its int8-rounded activations met codes
    of twice the magnitude: the 1.5B's English ratio went 1.019 -> 1.026)."""
    top = (1 << (5 if bits == 8 else 4)) - 1  # 5-bit codes ride in 8-bit storage
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(scales != 0, np.clip(np.rint(-mins / scales), 0, top), 0).astype(np.uint8)
    offsets = (mins + scales * zp).astype(np.float32)
    return BlockQuantized(q, scales.astype(np.float32), zp, bits, 32, k, offsets=offsets)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K super-block's 12 bytes: sub-blocks 0-3 in the low 6
    bits of bytes 0-3 / 4-7; sub-blocks 4-7 in bytes 8-11 (low 4 bits) plus the spare top bits of 0-3 / 4-7."""
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def decode_q4_k(rows: np.ndarray) -> BlockQuantized:
    """Q4_K super-blocks (256 values: fp16 d and dmin, eight 6-bit scale/min pairs, 4-bit codes):
    value d*sc*q - dmin*m per sub-block of 32."""
    n = rows.shape[0]
    b = rows.reshape(n, -1, 144)
    nb = b.shape[1]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [n, nb, 1]
    sc, mn = _k_scales_mins(b[..., 4:16])
    qs = b[..., 16:144].reshape(n, nb, 4, 1, 32)  # 4 x 32 bytes: sub-block 2i in low nibbles, 2i+1 in high
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb * 256)
    # fp16 x 6-bit integer: exact in fp32
    return _with_minimum(q, (d * sc).reshape(n, -1), -(dmin * mn).reshape(n, -1), 4, nb * 256)


def decode_q5_k(rows: np.ndarray) -> BlockQuantized:
    """Q5_K: Q4_K's layout plus 32 bytes of high bits (bit i of byte l: value l of sub-block i); 5-bit
    codes in 8-bit storage."""
    n = rows.shape[0]
    b = rows.reshape(n, -1, 176)
    nb = b.shape[1]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales_mins(b[..., 4:16])
    qh = b[..., 16:48][:, :, None, :]  # [n, nb, 1, 32]
    qs = b[..., 48:176].reshape(n, nb, 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb, 8, 32)
    high = (qh >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1
    q = (low | (high << 4)).reshape(n, nb * 256)
    return _with_minimum(q, (d * sc).reshape(n, -1), -(dmin * mn).reshape(n, -1), 8, nb * 256)


def decode_q4_1(rows: np.ndarray) -> BlockQuantized:
    """Q4_1: blocks of 32, fp16 scale d and minimum m, value d*q + m."""
    n = rows.shape[0]
    b = rows.reshape(n, -1, 20)
    d, m = _f16(b[..., 0:2]).reshape(n, -1), _f16(b[..., 2:4]).reshape(n, -1)
    q = _codes_32(b[..., 4:20])
    return _with_minimum(q.reshape(n, -1), d, m, 4, q.shape[1] * 32)


def decode_q5_1(rows: np.ndarray) -> BlockQuantized:
    """Q5_1: Q4_1 plus a 32-bit mask of high bits; 5-bit codes in 8-bit storage."""
    n = rows.shape[0]
    b = rows.reshape(n, -1, 24)
    d, m = _f16(b[..., 0:2]).reshape(n, -1), _f16(b[..., 2:4]).reshape(n, -1)
    q = _codes_32(b[..., 8:24], b[..., 4:8])
    return _with_minimum(q.reshape(n, -1), d, m, 8, q.shape[1] * 32)


DECODERS: dict[str, Callable[[np.ndarray], BlockQuantized]] = {
    "Q4_0": decode_q4_0, "Q5_0": decode_q5_0, "Q8_0": decode_q8_0, "Q6_K": decode_q6_k,
    "Q4_1": decode_q4_1, "Q5_1": decode_q5_1, "Q4_K": decode_q4_k, "Q5_K": decode_q5_k,
}


def with_block_size(bq: BlockQuantized, block_size: int) -> BlockQuantized:
    """Split blocks into smaller ones (same values): lets tensors of different block sizes share one node."""
    if block_size == bq.block_size:
        return bq
    r = bq.block_size // block_size
    offsets = None if bq.offsets is None else np.repeat(bq.offsets, r, axis=1)
    return BlockQuantized(bq.q, np.repeat(bq.scales, r, axis=1), np.repeat(bq.zero_points, r, axis=1),
                          bq.bits, block_size, bq.k, offsets)


def concat_rows(parts: list[BlockQuantized]) -> BlockQuantized:
    # a 4-bit part (codes 0..15 around its zero point) is exactly representable in 8-bit storage, so mixed
    # packs (e.g. Q4_0 q/k with a Q8_0 v) widen to 8 bits instead of failing
    bits = max(p.bits for p in parts)
    parts = [p if p.bits == bits else BlockQuantized(p.q, p.scales, p.zero_points, bits, p.block_size, p.k, p.offsets)
             for p in parts]
    bs = min(p.block_size for p in parts)
    parts = [with_block_size(p, bs) for p in parts]
    offsets = None
    if any(p.offsets is not None for p in parts):
        offsets = np.concatenate([np.zeros_like(p.scales) if p.offsets is None else p.offsets for p in parts])
    return BlockQuantized(np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]),
                          np.concatenate([p.zero_points for p in parts]), bits, bs, parts[0].k, offsets)


_LAYER = re.compile(r"model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.MatMul\.weight$")
_PARTS = {"qkv_proj": ("attn_q", "attn_k", "attn_v"), "q_proj": ("attn_q",), "k_proj": ("attn_k",),
          "v_proj": ("attn_v",), "o_proj": ("attn_output",), "gate_proj": ("ffn_gate",), "up_proj": ("ffn_up",),
          "down_proj": ("ffn_down",), "gate_up_proj": ("ffn_gate", "ffn_up")}


def gguf_names(onnx_name: str, tensors: dict) -> list[str] | None:
    """The GGUF tensors (stacked along output rows) behind one ONNX initializer of the builder's graph."""
    if "embed_tokens" in onnx_name:
        return ["token_embd.weight"]
    if onnx_name.startswith("lm_head"):
        return ["output.weight"] if "output.weight" in tensors else ["token_embd.weight"]
    m = _LAYER.match(onnx_name)
    if not m or m.group(3) not in _PARTS:
        return None
    return [f"blk.{m.group(1)}.{p}.weight" for p in _PARTS[m.group(3)]]


class GGUFTensors:
    """Raw GGUF tensors by name, memory-mapped by the gguf package's reader."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        self.tensors = {t.name: t for t in reader.tensors}

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def rows(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        data = np.asarray(t.data)
        n = int(t.shape[-1]) if len(t.shape) > 1 else 1  # GGUF shapes are [K, N] (fastest first)
        return data.reshape(n, -1)


def _types(g: GGUFTensors, names: list[str] | None) -> list[str]:
    """The GGUF types of the parts behind one ONNX weight ([] when any part is missing)."""
    return [g.type_name(n) for n in names] if names and all(n in g.tensors for n in names) else []


def _four_bit_copy(types: list[str], minimum_ok: bool) -> bool:
    """Every part a 4-bit type copied exactly at 4 bits (those with a float minimum only where offsets are ok)."""
    return bool(types) and all(t == "Q4_0" or (t in FOUR_BIT and minimum_ok) for t in types)


def four_bit_copies(path: Path, names) -> set[str]:
    """The body weights among ``names`` that an int4 "fast" or "balanced" import keeps as exact 4-bit copies
    even where the profile asked for 8 bits (``gguf_coder``'s rule): re-coding them (``smooth.py``) would turn
    them into 8-bit fits, twice the bytes."""
    g = GGUFTensors(path)
    return {name for name in names if _four_bit_copy(_types(g, gguf_names(name, g.tensors)), minimum_ok=True)}


def gguf_coder(path: Path, plan: QuantPlan, *, fallback: WeightCoder) -> WeightCoder:
    """A WeightCoder that copies exact GGUF codes where the mode allows and fits the rest."""
    g = GGUFTensors(path)

    def code(name: str, w_nk: np.ndarray, bits: int, role: str) -> tuple[BlockQuantized, str]:
        names = gguf_names(name, g.tensors)
        types = _types(g, names)
        faithful = plan.gguf_mode == "faithful"
        # fast mode still copies exactly what the GGUF itself kept at >= 6 bits (Q6_K, Q8_0): llama.cpp's
        # mixes (Q4_K_M, ...) put those types on the tensors its measurements found sensitive
        # ...except an lm_head the profile asked for at 4 bits (its eight_bit list leaves out "lm_head")
        sensitive = all(t in SENSITIVE for t in types) and not (role == "lm_head" and bits == 4)
        # a type with a float minimum (Q4_1, Q5_1, Q4_K, Q5_K) is exact only with block offsets, which only the
        # body's MatMulNBits takes (not the gathers), at ~1 bit a weight and 4 small nodes more than a fit;
        # "fast" copies the 4-bit ones only where the plan asked for 8 bits (measured on the 0.5B's Q4_K
        # down_proj: exact copies gave +1.5 to +3 points of top-1 agreement for a 3% longer decode step);
        # "balanced" copies them wherever they are, so no weight the GGUF holds at 4 bits is re-quantized
        offsets_ok = role == "body"
        minimum_ok = offsets_ok and (faithful or bits == 8 or plan.gguf_mode == "balanced")
        four = _four_bit_copy(types, minimum_ok)
        keep = faithful or four or bits == 8 or sensitive
        if not faithful and not four and (bits == 8 or sensitive) and wide_8bit_block(plan, w_nk, 8, role):
            # an int4 bundle's 8-bit weights: a refit at the plan's wider block beats the exact copy, whose
            # per-16/32 scales the decode step would have to read (the 8-bit refit error is ~1/16 of int4's);
            # a 4-bit GGUF type stays an exact 4-bit copy even where 8 bits were asked: 8 would double the bytes
            keep, bits = False, 8
        exact_ok = (types and all(t in DECODERS for t in types) and keep
                    and (offsets_ok or not any(t in WITH_MINIMUM for t in types)))
        if exact_ok:
            bq = concat_rows([DECODERS[t](g.rows(n)) for t, n in zip(types, names)])
            # guard against a name/layout mismatch: the exact codes must reproduce the float weights, up to
            # the graph's own rounding (GPU profiles build fp16 graphs: 2**-11 relative)
            scale = float(np.abs(w_nk).max()) or 1.0
            tol = (1e-3 if w_nk.dtype == np.float16 else 1e-5) * scale
            if bq.q.shape == w_nk.shape and float(np.abs(bq.dequantize() - w_nk.astype(np.float32)).max()) <= tol:
                return bq, "gguf-exact:" + "+".join(sorted(set(types)))
        if faithful:
            return quantize_fitted(w_nk, 8, plan.block_size), "gguf-fit8:" + "+".join(sorted(set(types)) or ["?"])
        bq, how = fallback(name, w_nk, bits, role)
        return bq, f"{how}:" + "+".join(sorted(set(types)) or ["?"])

    return code
