"""8-bit MatMulNBits as two 4-bit halves, for profiles that keep activations in float.

Why: onnxruntime's CPU provider has a fast 8-bit MatMulNBits kernel only for accuracy level 4 (activations
rounded to int8 per block). At accuracy level 0 or 1 (float activations) an 8-bit weight falls back to
dequantizing the whole matrix on every call: one 4864×896 matmul at M = 1 takes 6.7 ms against 0.05 ms at
level 4, which makes an "exact arithmetic" int8 bundle decode at ~1 token/s. The 4-bit float kernel is fast
(0.17 ms), so an 8-bit code ``q`` with zero point ``z`` is split, exactly, as

    q = 2**t * h + l,  z = 2**t * zh + zl   →   s * (q - z) = (2**t * s) * (h - zh) + s * (l - zl)

with ``t`` the fewest low bits that leave ``h`` within 4 bits (t = 1 for GGUF Q5_0 codes, 2 for Q6_K, 4 for
full 8-bit codes). Both halves are 4-bit MatMulNBits nodes on the same input, summed by an Add: every weight
keeps its exact value, and the result differs from a float matmul only by float rounding. On the 0.5B int8
bundle: teacher-forced agreement with the float model 96.9 → 100% (English) at 0.42× the decode speed of
accuracy level 4 (18.3 vs 43.4 tok/s), where the unsplit level-0 graph runs at about 1 token/s.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .blockquant import BlockQuantized

MS_DOMAIN = "com.microsoft"


def split_codes(codes: np.ndarray, zero_points: np.ndarray) -> tuple[int, tuple, tuple]:
    """Split 8-bit codes [N, blocks, block] and zero points [N, blocks] into (t, (h, zh), (l, zl))."""
    top = max(int(codes.max(initial=0)), int(zero_points.max(initial=0)))
    t = max(0, top.bit_length() - 4)
    mask = (1 << t) - 1
    return t, (codes >> t, zero_points >> t), (codes & mask, zero_points & mask)


def split_eight_bit(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> tuple[list, list, int, int]:
    """Rewrite every 8-bit MatMulNBits in ``nodes`` that computes at accuracy level 0 or 1 as two 4-bit ones
    plus an Add (at level 4 onnxruntime's 8-bit kernel is fast: a profile's ``accuracy_levels`` may mix both).

    ``inits`` are the initializers the nodes read (the quantizer's new ones). An initializer that another node
    still reads (the codes a shared embedding's gather also uses) is kept. Returns (nodes, initializers, number
    of weights split, bytes added)."""
    by_name = {t.name: t for t in inits}
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    out_nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    dropped: set[str] = set()
    count = delta = 0
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs.get("bits") != 8 or len(node.input) > 4 \
                or attrs.get("accuracy_level", 0) not in (0, 1) or node.input[1] not in by_name:
            out_nodes.append(node)
            continue
        n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
        codes = numpy_helper.to_array(by_name[node.input[1]])
        blocks = codes.shape[1]
        scales = numpy_helper.to_array(by_name[node.input[2]]).reshape(n, blocks)
        has_zp = len(node.input) > 3 and bool(node.input[3])
        zp = (numpy_helper.to_array(by_name[node.input[3]]).reshape(n, blocks).astype(np.int32) if has_zp
              else np.full((n, blocks), 128, np.int32))  # the kernel's default for 8 bits
        t, (h, zh), (lo, zl) = split_codes(codes.astype(np.int32), zp)
        base = node.input[1].removesuffix(".qweight")
        halves = [("hi", h, zh, scales * (1 << t))]
        if t:
            halves.append(("lo", lo, zl, scales))
        outs = []
        for tag, q, z, s in halves:
            names = [f"{base}.{tag}.qweight", f"{base}.{tag}.scales", f"{base}.{tag}.qzeros"]
            half = BlockQuantized(q.reshape(n, -1).astype(np.uint8), s, z.astype(np.uint8), 4, block, k)
            tensors = [numpy_helper.from_array(half.packed_codes(), names[0]),
                       numpy_helper.from_array(s.reshape(-1).astype(scales.dtype), names[1]),
                       numpy_helper.from_array(half.packed_zero_points().reshape(-1), names[2])]
            added += tensors
            delta += sum(len(x.raw_data) for x in tensors)
            out = node.output[0] if len(halves) == 1 else f"{node.output[0]}/{tag}"
            outs.append(out)
            out_nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], *names], [out], name=f"{node.name}/{tag}", domain=MS_DOMAIN,
                K=k, N=n, bits=4, block_size=block, accuracy_level=attrs.get("accuracy_level", 0)))
        if len(outs) == 2:
            out_nodes.append(helper.make_node("Add", outs, list(node.output), name=f"{node.name}/sum"))
        for name in node.input[1:]:
            readers[name] -= 1
            if name and readers[name] == 0:
                dropped.add(name)
                delta -= len(by_name[name].raw_data)  # from_array stores raw bytes
        count += 1
    kept = [t for t in inits if t.name not in dropped]
    return out_nodes, kept + added, count, delta
