"""Block-wise weight quantization in the layout of onnxruntime's MatMulNBits / GatherBlockQuantized.

A weight is handled as ``W[N, K]`` (one row per output feature, blocks of ``block_size`` along K), which is
how both kernels store it: ``value = (q - zero_point) * scale`` with unsigned ``q`` of ``bits`` bits and one
``scale``/``zero_point`` per block. Everything here is numpy over all blocks at once, so quantizing a 0.5B
model takes seconds, not minutes.

Why our own fit instead of onnxruntime's default quantizer: its RTN symmetric grid wastes one of the 16 int4
levels and ignores that Qwen's blocks are rarely centred on zero; on Qwen2.5-Coder-0.5B that costs a 1.55×
perplexity ratio. An asymmetric grid whose scale and zero point are *searched* per block (the idea behind
llama.cpp's k-quants) lands near the source's own grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlockQuantized:
    """Unpacked codes plus per-block parameters; ``pack_*`` give the kernels' byte layouts."""

    q: np.ndarray  # uint8 [N, K_padded], values in [0, 2**bits)
    scales: np.ndarray  # float32 [N, K_blocks]
    zero_points: np.ndarray  # uint8 [N, K_blocks]
    bits: int
    block_size: int
    k: int  # original K (before padding to a whole block)
    # float32 [N, K_blocks] added to every value of a block: what is left of a GGUF type's float minimum (Q4_1,
    # Q5_1, Q4_K, Q5_K) after the integer zero point; the graph adds it as (per-block sums of x) @ offsets
    # (``quantize._offset_correction``)
    offsets: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def k_blocks(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: what the kernels compute from the packed form (for tests and verification)."""
        blocks = self.q.reshape(self.n, self.k_blocks, self.block_size).astype(np.float32)
        w = (blocks - self.zero_points[..., None].astype(np.float32)) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(self.n, -1)[:, : self.k]

    def packed_codes(self) -> np.ndarray:
        """uint8 [N, K_blocks, blob]: MatMulNBits' B; reshaped to [N, K*bits/8] it is GatherBlockQuantized's data.
        Codes narrower than a byte are packed lowest bits first (2 per byte at 4 bits, 4 at 2 bits)."""
        q = self.q.reshape(self.n, self.k_blocks, self.block_size)
        return np.ascontiguousarray(_pack(q, self.bits))

    def packed_zero_points(self) -> np.ndarray:
        """uint8 [N, ceil(K_blocks*bits/8)]: zero points packed along the row as the codes are."""
        zp = self.zero_points
        per = 8 // self.bits
        if zp.shape[1] % per:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], per - zp.shape[1] % per), np.uint8)], axis=1)
        return np.ascontiguousarray(_pack(zp, self.bits))

    def default_zero_point(self) -> bool:
        """True when every zero point is the kernels' implicit one (symmetric grids need no zp tensor)."""
        return bool(np.all(self.zero_points == (1 << (self.bits - 1))))

    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.size * 4
        return self.packed_codes().size + self.scales.size * 4 + self.packed_zero_points().size + extra

    @classmethod
    def from_packed(cls, codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, n: int, k: int,
                    bits: int, block_size: int) -> "BlockQuantized":
        """Inverse of ``packed_codes``/``packed_zero_points``: read a MatMulNBits weight back from a bundle
        (for measurements on exported bundles, e.g. benchmarks/sensitivity.py)."""
        k_blocks = -(-k // block_size)
        q = _unpack(np.asarray(codes, np.uint8).reshape(n, k_blocks, -1), bits)
        if zero_points is None:
            zp = np.full((n, k_blocks), 1 << (bits - 1), np.uint8)
        else:
            zp = _unpack(np.asarray(zero_points, np.uint8).reshape(n, -1), bits)[:, :k_blocks]
        return cls(q=np.ascontiguousarray(q.reshape(n, -1)),
                   scales=np.asarray(scales, np.float32).reshape(n, k_blocks), zero_points=zp,
                   bits=bits, block_size=block_size, k=k)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes of ``bits`` (8, 4 or 2) along the last axis, lowest bits first, as onnxruntime reads them."""
    if bits == 8:
        return q.astype(np.uint8)
    per = 8 // bits
    out = np.zeros(q.shape[:-1] + (q.shape[-1] // per,), np.uint8)
    for i in range(per):
        out |= (q[..., i::per].astype(np.uint8) & ((1 << bits) - 1)) << (bits * i)
    return out


def _unpack(raw: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return raw
    per = 8 // bits
    parts = [(raw >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(raw.shape[:-1] + (-1,))


def split_coarse(bq: BlockQuantized) -> tuple[BlockQuantized, BlockQuantized]:
    """An 8- or 6-bit matrix as a coarse 4-bit one plus a 4- or 2-bit residual whose sum is exactly its values.

    Why: the decode step reads the whole lm_head; at 8 bits Qwen's 151,936 x hidden vocabulary matrix is
    a quarter of the step. The coarse half alone (half the bytes) ranks the vocabulary, and the graph then
    rescores the best candidates with both parts (``quantize._refined_vocab``), so the logits that decide
    greedy and top-k/top-p picks are the full-precision ones, bit for bit, and the embedding lookup reads
    the whole matrix. A 6-bit matrix has the same coarse part (a step of 1/8 of the block's largest value)
    with a 2-bit residual: 34 MB less on the 0.5B, for perplexity ratios up to +0.017 (benchmarks/README.md).

    Each block's code c (value d*(c - z)) is shifted by an offset o and split at ``r = bits - 4``:
    c + o = 2^r*hi + lo, z + o = 2^r*z_hi + z_lo, so d*(c - z) = 2^r*d*(hi - z_hi) + d*(lo - z_lo). o is
    chosen per block so that z_lo is 2^(r-1) where the block's codes allow it: the coarse part is then a
    round-to-nearest grid (its error d*(lo - z_lo) lies in [-2^(r-1)*d, (2^(r-1)-1)*d]), not a truncating one.
    """
    if bq.bits not in (6, 8) or bq.offsets is not None:
        raise ValueError(f"split_coarse needs a plain 8- or 6-bit matrix (4-bit coarse + 4- or 2-bit residual), got "
                         f"{bq.bits} bits" + (" with block offsets" if bq.offsets is not None else ""))
    r = bq.bits - 4
    top, mid, low_mask = (1 << bq.bits) - 1, 1 << (r - 1), (1 << r) - 1
    c = bq.q.reshape(bq.n, bq.k_blocks, bq.block_size).astype(np.int32)
    z = bq.zero_points.astype(np.int32)
    low = np.maximum(-c.min(axis=-1), -z)  # c + o >= 0 and z + o >= 0
    high = np.minimum(top - c.max(axis=-1), top - z)  # ... and both stay within the code range
    o0 = (mid - z) % (1 << r)
    o = o0 + (1 << r) * -((o0 - low) // (1 << r))  # the smallest o >= low with (z + o) % 2^r == 2^(r-1)
    o = np.clip(o, low, high)
    shifted, zs = c + o[..., None], z + o
    coarse = BlockQuantized(q=(shifted >> r).reshape(bq.n, -1).astype(np.uint8), scales=bq.scales * (1 << r),
                            zero_points=(zs >> r).astype(np.uint8), bits=4, block_size=bq.block_size, k=bq.k)
    residual = BlockQuantized(q=(shifted & low_mask).reshape(bq.n, -1).astype(np.uint8), scales=bq.scales.copy(),
                              zero_points=(zs & low_mask).astype(np.uint8), bits=r, block_size=bq.block_size,
                              k=bq.k)
    return coarse, residual


def _blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """[N, K] -> [N, K_blocks, block] float32, zero-padding K up to a whole block."""
    n, k = w.shape
    pad = (-k) % block_size
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), dtype=w.dtype)], axis=1)
    return w.astype(np.float32, copy=False).reshape(n, -1, block_size), k


def _finish(q, scale, zp, bits, block_size, k) -> BlockQuantized:
    n = q.shape[0]
    return BlockQuantized(
        q=q.reshape(n, -1).astype(np.uint8),
        scales=scale.astype(np.float32),
        zero_points=zp.astype(np.uint8),
        bits=bits,
        block_size=block_size,
        k=k,
    )


def quantize_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> BlockQuantized:
    """Round-to-nearest: the baseline (what onnxruntime-genai's builder does by default when symmetric)."""
    x, k = _blocks(w, block_size)
    qmax = (1 << bits) - 1
    if symmetric:
        # the value of largest magnitude maps to the lowest level (-2**(bits-1)), as onnxruntime's RTN does
        mid = 1 << (bits - 1)
        idx = np.abs(x).argmax(axis=-1)[..., None]
        signed_max = np.take_along_axis(x, idx, axis=-1)[..., 0]
        scale = np.where(signed_max != 0, signed_max / -mid, 1.0).astype(np.float32)
        zp = np.full(scale.shape, mid, np.int32)
    else:
        lo = np.minimum(x.min(axis=-1), 0.0)
        hi = np.maximum(x.max(axis=-1), 0.0)
        scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
        zp = np.clip(np.round(-lo / scale), 0, qmax).astype(np.int32)
    q = np.clip(np.round(x / scale[..., None]) + zp[..., None], 0, qmax)
    return _finish(q, scale, zp, bits, block_size, k)


def quantize_fitted(
    w: np.ndarray,
    bits: int,
    block_size: int,
    *,
    importance: np.ndarray | None = None,
    grid: tuple[float, ...] = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8, 0.75),
    row_chunk: int = 2048,
) -> BlockQuantized:
    """Asymmetric block quantization with a searched range and a weighted least-squares refit (k-quant style).

    For each block we try a few shrunken [min, max] ranges (clipping outliers often lowers the total
    error), quantize, refit scale *and* offset by weighted least squares for the resulting codes, snap the
    offset to an integer zero point, and keep the candidate with the lowest weighted squared error.

    ``importance`` ([K], e.g. the mean squared activation of each input channel on calibration text) weights
    the error: a weight that multiplies large activations is fitted more closely. That is the cheap half of
    what AWQ/GPTQ/imatrix do, and on Qwen it is most of the gain. Rows are processed in chunks to bound
    memory on the 151,936-row lm_head.
    """
    n, k = w.shape
    imp = None
    if importance is not None:
        imp = np.asarray(importance, np.float32)
        imp = imp / max(float(imp.mean()), 1e-30) + 0.02  # never let a channel's weight drop to zero
        pad = (-k) % block_size
        imp = np.concatenate([imp, np.zeros(pad, np.float32)]).reshape(1, -1, block_size)
    parts = [_fit_rows(w[i : i + row_chunk], bits, block_size, grid, imp) for i in range(0, n, row_chunk)]
    return BlockQuantized(
        q=np.concatenate([p.q for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        zero_points=np.concatenate([p.zero_points for p in parts]),
        bits=bits,
        block_size=block_size,
        k=k,
    )


def _fit_rows(w: np.ndarray, bits: int, block_size: int, grid, imp) -> BlockQuantized:
    x, k = _blocks(w, block_size)
    wt = np.ones_like(x[:1]) if imp is None else imp  # broadcast over rows
    qmax = float((1 << bits) - 1)
    lo0 = np.minimum(x.min(axis=-1), 0.0)
    hi0 = np.maximum(x.max(axis=-1), 0.0)
    tiny = np.maximum(hi0 - lo0, 1e-20) / qmax * 1e-6
    best_err = np.full(lo0.shape, np.inf, np.float32)
    best_scale = np.zeros_like(lo0)
    best_zp = np.zeros_like(lo0)
    sw = wt.sum(axis=-1)
    swx = (wt * x).sum(axis=-1)
    for f in grid:
        scale = np.maximum((hi0 - lo0) * f / qmax, tiny)
        zp = np.clip(np.round(-lo0 * f / scale), 0, qmax)
        q = np.clip(np.round(x / scale[..., None]) + zp[..., None], 0, qmax)
        # weighted least squares for x ~ a*q + b, then snap b = -a*zp to an integer zero point
        swq = (wt * q).sum(axis=-1)
        swqq = (wt * q * q).sum(axis=-1)
        swqx = (wt * q * x).sum(axis=-1)
        det = sw * swqq - swq * swq
        ok = det > 0
        a = np.where(ok, (sw * swqx - swq * swx) / np.where(ok, det, 1), scale)
        b = np.where(ok, (swqq * swx - swq * swqx) / np.where(ok, det, 1), -scale * zp)
        a = np.where(a > tiny, a, scale)
        zp2 = np.clip(np.round(-b / a), 0, qmax)
        q2 = np.clip(np.round(x / a[..., None]) + zp2[..., None], 0, qmax)
        d = q2 - zp2[..., None]
        den = (wt * d * d).sum(axis=-1)
        a2 = np.where(den > 0, (wt * d * x).sum(axis=-1) / np.maximum(den, 1e-30), a)
        a2 = np.where(a2 > tiny, a2, a)
        err = (wt * (x - a2[..., None] * d) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, a2, best_scale)
        best_zp = np.where(better, zp2, best_zp)
    q = np.clip(np.round(x / best_scale[..., None]) + best_zp[..., None], 0, qmax)
    return _finish(q, best_scale, best_zp, bits, block_size, k)


def quantize_hqq(w: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    """HQQ (half-quadratic optimisation of the zero point), onnxruntime's implementation, calibration-free.

    HQQ ends with a *float* zero point per block; MatMulNBits accepts those only on a slow path (measured
    40x slower at M=1), so the optimised zero point is rounded to the integer grid and the codes redone.
    """
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    n, k = w.shape
    x, _ = _blocks(w, block_size)
    hqq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    _, scale, zero = hqq.quantize_internal(torch.from_numpy(np.array(x.reshape(n, -1))), bits=bits,
                                           group_size=block_size)
    qmax = (1 << bits) - 1
    scale = scale.numpy().reshape(n, -1).astype(np.float32)
    zp = np.clip(np.round(zero.numpy().reshape(n, -1)), 0, qmax)
    q = np.clip(np.round(x / scale[..., None]) + zp[..., None], 0, qmax)
    return _finish(q, scale, zp, bits, block_size, k)


def quantize_gptq(w: np.ndarray, bits: int, block_size: int, hessian: np.ndarray,
                  importance: np.ndarray | None = None, damp: float = 0.3) -> BlockQuantized:
    """GPTQ: quantize input channels in order and push each one's rounding error onto the channels not yet
    quantized, through the inverse of the calibration Hessian ``H = X^T X`` ([K, K]).

    Written here rather than taken from onnxruntime: its port (``neural_compressor.weight_only.gptq``, ORT
    1.32) propagates the error with a column of the *upper* Cholesky factor, which is zero below the
    diagonal, so it returns exactly round-to-nearest (checked in tests/test_blockquant.py). Each block's
    scale and zero point come from the fitted quantizer on the block's error-updated weights, so the grid
    stays asymmetric with integer zero points (the fast MatMulNBits path).
    """
    n, k = w.shape
    if k % block_size:
        return quantize_fitted(w, bits, block_size, importance=importance)
    qmax = (1 << bits) - 1
    W = np.array(w, np.float64)
    H = np.array(hessian, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += damp * float(np.mean(np.diag(H)))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U; row j of U carries channel j's error
    codes = np.zeros((n, k), np.float64)
    scales = np.zeros((n, k // block_size), np.float32)
    zps = np.zeros((n, k // block_size), np.float64)
    for b, g0 in enumerate(range(0, k, block_size)):
        g1 = g0 + block_size
        imp = None if importance is None else importance[g0:g1]
        fit = quantize_fitted(W[:, g0:g1].astype(np.float32), bits, block_size, importance=imp)
        scale, zp = fit.scales[:, 0].astype(np.float64), fit.zero_points[:, 0].astype(np.float64)
        errors = np.zeros((n, block_size))
        for j in range(g0, g1):
            col = W[:, j]
            q = np.clip(np.round(col / scale) + zp, 0, qmax)
            err = (col - (q - zp) * scale) / U[j, j]
            W[:, j + 1 : g1] -= np.outer(err, U[j, j + 1 : g1])
            errors[:, j - g0] = err
            codes[:, j] = q
        W[:, g1:] -= errors @ U[g0:g1, g1:]
        scales[:, b], zps[:, b] = scale, zp
    return _finish(codes, scales, zps, bits, block_size, k)


def quantize(w: np.ndarray, bits: int, block_size: int, algo: str, importance: np.ndarray | None = None,
             hessian: np.ndarray | None = None) -> BlockQuantized:
    """Dispatch on the algorithm name used in device profiles."""
    if algo == "hqq":
        return quantize_hqq(w, bits, block_size)
    if algo == "gptq" and hessian is not None:
        return quantize_gptq(w, bits, block_size, hessian, importance)
    if algo == "rtn":
        return quantize_rtn(w, bits, block_size, symmetric=True)
    if algo == "rtn_asym":
        return quantize_rtn(w, bits, block_size, symmetric=False)
    if algo in ("k_quant", "gptq"):  # gptq without a Hessian (lm_head, embeddings): the fitted quantizer
        return quantize_fitted(w, bits, block_size, importance=importance)
    raise ValueError(f"unknown block quantization algorithm {algo!r}")
