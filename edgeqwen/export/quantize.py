"""Float ONNX graph -> weight-only quantized graph (MatMulNBits + GatherBlockQuantized).

The graph builder hands us a float graph whose linear layers are ``MatMul(x, W[K, N])`` with ``W`` an
initializer and whose embedding is ``Gather(E[V, H], ids)``. We replace each with its block-quantized
contrib op. Weights are read straight from the external-data file with ``np.memmap``, so a 2.5 GB fp32
graph never sits in memory twice.

Where the codes come from is a separate decision (``WeightCoder``): fitted/RTN quantization of the float
weights, or, for GGUF sources, a repack of the GGUF's own integer codes (see ``gguf_repack``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError
from .blockquant import BlockQuantized, quantize, quantize_rtn, split_coarse
from .halves import MS_DOMAIN, split_eight_bit


def promises_exact(precision: str, gguf_mode: str) -> bool:
    """int8 and "faithful" bundles keep the source's values where the kernels can express them."""
    return precision != "int4" or gguf_mode == "faithful"


@dataclass(frozen=True)
class QuantPlan:
    """What to quantize and how; derived from the device profile plus command-line overrides."""

    precision: str = "int4"  # int4 | int8 | fp32
    algo: str = "k_quant"  # rtn | rtn_asym | k_quant
    block_size: int = 32
    accuracy_level: int = 4
    # (layer type, level) pairs replacing accuracy_level for those weights (profiles.LAYER_TYPES)
    accuracy_levels: tuple[tuple[str, int], ...] = ()
    embed_bits: int | None = 4  # None keeps the embedding table in float
    lm_head_bits: int | None = 4
    gguf_mode: str = "balanced"  # fast | balanced | faithful (gguf_repack.py): only when the source is a GGUF file
    # One 8-bit matrix serves as both embedding table and lm_head when the two are the same weights (tied,
    # or, in int4 bundles, untied copies that differ only by quantization noise, as in GGUF files made from
    # tied checkpoints). Bundles that promise exact values (int8, "faithful") share only identical tables.
    share_embeddings: bool = True
    shared_bits: int = 8
    tie_tolerance: float = 0.08  # max relative Frobenius difference to treat embed and lm_head as one matrix
    # Mixed precision: weights whose name contains one of these stay at 8 bits in an int4 bundle.
    eight_bit: tuple[str, ...] = ()
    # Block size of those 8-bit body weights (None: block_size). Wider blocks cost 8-bit weights almost no
    # accuracy and save scale bytes and kernel time; exact GGUF copies then give way to an 8-bit refit.
    block_size_8bit: int | None = None
    # An 8-bit vocabulary matrix in an int4 bundle is stored as a coarse 4-bit half + a residual; the lm_head
    # reads the coarse half and rescores this many best candidates with both (0: a plain 8-bit lm_head).
    vocab_refine: int = 0
    # Bits of that split vocabulary matrix: 8, or 6 (re-coded, with a 2-bit residual; not in "faithful" mode)
    vocab_bits: int = 8
    # SmoothQuant strength for the attention input of q/k/v weights refit at 8 bits (smooth.py; 0: off)
    smooth_alpha: float = 0.0
    # Store 8-bit weights as two exact 4-bit halves (halves.py): float-activation CPU profiles, where
    # onnxruntime has no fast 8-bit kernel below accuracy level 4.
    eight_bit_halves: bool = False

    @property
    def promises_exact(self) -> bool:
        return promises_exact(self.precision, self.gguf_mode)

    @property
    def effective_tie_tolerance(self) -> float:
        """Sharing one matrix for two different tables would change one of them: not in exact bundles
        (the 0.5B GGUF's Q5_0 embedding and Q8_0 lm_head differ by 4.4%: sharing cost its int8 bundle
        0.7–0.9 points of agreement and a licence perplexity ratio of 1.009 against 1.002)."""
        return 0.0 if self.promises_exact else self.tie_tolerance

    @property
    def refit_block_8bit(self) -> int | None:
        """int4 bundles: the wider block their 8-bit body weights are refit at (None: they keep block_size,
        and GGUF imports copy those weights' codes exactly)."""
        b = self.block_size_8bit
        return b if self.precision == "int4" and b and b != self.block_size else None

    def level_for(self, weight_name: str) -> int:
        """The accuracy level of one weight: its kind's entry in ``accuracy_levels`` (``down_proj``), else its
        group's (``mlp``), else the bundle's. Weight names look like ``model.layers.3.mlp.down_proj.MatMul.weight``."""
        levels = dict(self.accuracy_levels)
        if _role(weight_name) == "lm_head":
            return levels.get("lm_head", self.accuracy_level)
        for kind, level in levels.items():
            if kind not in ("attn", "mlp", "lm_head") and f".{kind}." in weight_name:
                return level
        for group in ("attn", "mlp"):
            if group in levels and f".{group}." in weight_name:
                return levels[group]
        return self.accuracy_level

    @property
    def body_bits(self) -> int | None:
        return {"int4": 4, "int8": 8}.get(self.precision)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantReport:
    """What was done to each weight, for the manifest and the export summary."""

    tensors: dict[str, dict] = field(default_factory=dict)
    float_bytes: int = 0
    quant_bytes: int = 0
    tied: dict | None = None  # set when embedding and lm_head share one quantized matrix
    halves: dict | None = None  # set when 8-bit weights were stored as 4-bit halves (halves.py)

    def add(self, name: str, how: str, bq: BlockQuantized, float_bytes: int) -> None:
        self.tensors[name] = {"how": how, "bits": bq.bits, "block_size": bq.block_size, "shape": [bq.n, bq.k]}
        if bq.offsets is not None:
            self.tensors[name]["block_offsets"] = True
        self.float_bytes += float_bytes
        self.quant_bytes += bq.nbytes()

    def add_split(self, name: str, how: str, coarse: BlockQuantized, residual: BlockQuantized, top_k: int,
                  float_bytes: int) -> None:
        self.add(name, how, coarse, float_bytes)
        self.tensors[name].update(bits=f"4+{residual.bits}", refine_top_k=top_k)
        self.quant_bytes += residual.nbytes()

    def summary(self) -> dict:
        hows: dict[str, int] = {}
        for t in self.tensors.values():
            key = f"{t['how']}/{t['bits']}bit"
            hows[key] = hows.get(key, 0) + 1
        return {"tensors": len(self.tensors), "by_method": hows, "shared_embeddings": self.tied,
                "eight_bit_halves": self.halves,
                "float_mb": round(self.float_bytes / 2**20, 1), "quant_mb": round(self.quant_bytes / 2**20, 1)}


# A weight coder gets (onnx initializer name, float weight as [N, K], bits, role) and returns codes.
WeightCoder = Callable[[str, np.ndarray, int, str], tuple[BlockQuantized, str]]


def float_coder(plan: QuantPlan, importance: dict[str, np.ndarray] | None = None,
                hessians: Mapping[str, np.ndarray] | None = None) -> WeightCoder:
    """Quantize the float weights with the plan's algorithm, weighted by calibration importance if given.

    GPTQ runs where a Hessian was recorded and the weight goes to 4 bits; 8-bit weights and the
    embedding/lm_head get the fitted (k-quant) quantizer, whose error at 8 bits is already negligible.
    """
    importance, hessians = importance or {}, hessians or {}

    def code(name: str, w_nk: np.ndarray, bits: int, role: str) -> tuple[BlockQuantized, str]:
        imp = importance.get(name) if plan.algo in ("k_quant", "gptq") else None
        if plan.algo == "gptq" and bits == 4 and name in hessians:
            return quantize(w_nk, bits, plan.block_size, "gptq", imp, hessians[name]), "gptq"
        algo = "k_quant" if plan.algo == "gptq" else plan.algo
        how = algo + ("+imatrix" if imp is not None else "")
        block = wide_8bit_block(plan, w_nk, bits, role)
        if block:
            return quantize(w_nk, bits, block, algo, imp), f"{how}/block{block}"
        return quantize(w_nk, bits, plan.block_size, algo, imp), how

    return code


def wide_8bit_block(plan: QuantPlan, w_nk: np.ndarray, bits: int, role: str) -> int | None:
    """The plan's wider block for an 8-bit body weight of an int4 bundle, where it divides the row."""
    b = plan.refit_block_8bit
    if bits == 8 and role == "body" and b and w_nk.shape[1] % b == 0:
        return b
    return None


class ExternalWeights:
    """Reads initializers of a graph saved with external data, lazily and without copying the file."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path):
        self.base_dir = Path(base_dir)
        self.inits = {t.name: t for t in model.graph.initializer}
        self._maps: dict[str, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.inits

    def array(self, name: str) -> np.ndarray:
        return self._read(self.inits[name])

    def _read(self, t: onnx.TensorProto) -> np.ndarray:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        path = str(self.base_dir / info["location"])
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        raw = self._maps[path][offset : offset + length]
        return np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims))

    def materialize_rest(self, model: onnx.ModelProto) -> None:
        """Load every still-external initializer into memory so the model can be saved elsewhere."""
        tensors = list(model.graph.initializer)
        for node in model.graph.node:  # Optimum also stores large Constant-node values externally
            tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                t.CopyFrom(numpy_helper.from_array(np.array(self._read(t)), t.name))


def _role(name: str) -> str:
    if "embed_tokens" in name:
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    return "body"


def _matmul_nbits(node: onnx.NodeProto, bq: BlockQuantized, wname: str, accuracy_level: int,
                  dtype: type = np.float32) -> tuple:
    base = wname.replace(".weight", "")
    b, s, z = f"{base}.qweight", f"{base}.scales", f"{base}.qzeros"
    inits = [
        numpy_helper.from_array(bq.packed_codes(), b),
        numpy_helper.from_array(bq.scales.reshape(-1).astype(dtype), s),
    ]
    inputs = [node.input[0], b, s]
    if not bq.default_zero_point():  # the kernels assume 2**(bits-1) when the input is absent
        inits.append(numpy_helper.from_array(bq.packed_zero_points().reshape(-1), z))
        inputs.append(z)
    new = helper.make_node(
        "MatMulNBits", inputs, list(node.output), name=node.name + "NBits", domain=MS_DOMAIN,
        K=bq.k, N=bq.n, bits=bq.bits, block_size=bq.block_size, accuracy_level=accuracy_level,
    )
    return new, inits


def _offset_correction(node: onnx.NodeProto, bq: BlockQuantized, wname: str, accuracy_level: int,
                       dtype: type = np.float32, stored: type = np.float16) -> tuple[list, list]:
    """MatMulNBits for a weight with block offsets (the float minimum of GGUF Q4_1/Q5_1/Q4_K/Q5_K, what its
    integer zero point leaves over): x @ W = MatMulNBits(x) + s @ O, where
    s holds the sums of x over each K block ([..., K/block]) and O the offsets ([K/block, N]). The extra
    matmul reads 4 bytes per block, as much as the scales: Q4_K stays exact at ~6 bits a weight.
    O is stored as ``stored``: int4 bundles keep it in fp16 and the graph casts it back (onnxruntime folds the
    Cast at load, so run time is unchanged): 2 bytes per block less on disk, for an error of at most 1/4096
    of a quantization step (|O| is at most half a step), far below accuracy level 4's own rounding of the
    input. Bundles that promise the GGUF's exact values (int8, "faithful") store it at the graph's dtype.
    The hidden states are [batch, seq, K] in the graphs we rewrite (Reshape copies the first two dims)."""
    if bq.k != bq.k_blocks * bq.block_size:
        raise ExportError(f"{wname}: block offsets need K ({bq.k}) to be a whole number of blocks.",
                          "this is a bug in the GGUF import; please report it with the model name.")
    head, inits = _matmul_nbits(node, bq, wname, accuracy_level, dtype)
    base, x, out, t = wname.replace(".weight", ""), node.input[0], node.output[0], node.name + "Offsets"
    head.output[0] = out + "/codes"
    shape, axes, offsets = f"{base}.block_view", f"{base}.block_axis", f"{base}.offsets"
    inits += [numpy_helper.from_array(np.array([0, 0, bq.k_blocks, bq.block_size], np.int64), shape),
              numpy_helper.from_array(np.array([-1], np.int64), axes),
              numpy_helper.from_array(np.ascontiguousarray(bq.offsets.T).astype(stored), offsets)]
    cast = []
    if np.dtype(stored) != np.dtype(dtype):
        cast = [helper.make_node("Cast", [offsets], [offsets + "/float"], name=t + "/Cast",
                                 to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))]
        offsets = offsets + "/float"
    nodes = [helper.make_node("Reshape", [x, shape], [t + "/blocks"], name=t + "/Reshape"),
             helper.make_node("ReduceSum", [t + "/blocks", axes], [t + "/sums"], name=t + "/ReduceSum", keepdims=0),
             head, *cast,
             helper.make_node("MatMul", [t + "/sums", offsets], [t + "/shift"], name=t + "/MatMul"),
             helper.make_node("Add", [out + "/codes", t + "/shift"], [out], name=t + "/Add")]
    return nodes, inits


def _gather_block_quantized(node: onnx.NodeProto, bq: BlockQuantized, wname: str, dtype: type = np.float32) -> tuple:
    base = wname.replace(".weight", "")
    d, s, z = f"{base}.qweight", f"{base}.scales", f"{base}.qzeros"
    codes = bq.packed_codes().reshape(bq.n, -1)
    inits = [
        numpy_helper.from_array(codes, d),
        numpy_helper.from_array(bq.scales.astype(dtype), s),
        numpy_helper.from_array(bq.packed_zero_points(), z),
    ]
    new = helper.make_node(
        "GatherBlockQuantized", [d, node.input[1], s, z], list(node.output), name=node.name + "BlockQuantized",
        domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=bq.block_size, bits=bq.bits,
    )
    return new, inits


def keeps_8_bits(weight_name: str, patterns: tuple[str, ...]) -> bool:
    """The ``eight_bit`` rule: a weight stays 8-bit when any pattern is a substring of its graph name
    (``model.layers.14.mlp.up_proj.MatMul.weight``); patterns end with a dot or a full kind name, so
    ``layers.1.`` never matches layer 14."""
    return any(p in weight_name for p in patterns)


def _gbq(name: str, codes: str, indices: str, scales: str, zp: str | None, out: str, bq: BlockQuantized):
    """GatherBlockQuantized over a MatMulNBits-packed [V, K_blocks, blob] codes tensor (quantize_axis=2)."""
    return helper.make_node("GatherBlockQuantized", [codes, indices, scales] + ([zp] if zp else []), [out],
                            name=name, domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                            block_size=bq.block_size, bits=bq.bits)


def _gather_view(base: str, bq: BlockQuantized, flat_scales: str) -> tuple[list, list, str | None]:
    """Nodes and initializers that let GatherBlockQuantized read a MatMulNBits weight: its flat scales
    reshaped to [V, K_blocks, 1] (a constant onnxruntime folds at load, so the 16 MB are stored once) and
    zero points in the gather's layout, when they are not the default."""
    s, z, s_shape = f"{base}.scales", f"{base}.qzeros", f"{base}.scales_shape"
    inits = [numpy_helper.from_array(np.array([bq.n, bq.k_blocks, 1], np.int64), s_shape)]
    nodes = [helper.make_node("Reshape", [flat_scales, s_shape], [s], name=f"{base}/ScalesReshape")]
    zp_inits, zp = _gather_zero_points(bq, z)
    return nodes, inits + zp_inits, zp


def _gather_zero_points(bq: BlockQuantized, name: str) -> tuple[list, str | None]:
    """Zero points for a GatherBlockQuantized over a [V, K_blocks, blob] view, or none where the default
    holds (2- and 4-bit gathers assume the middle code, like MatMulNBits). Sub-byte zero points are packed
    along the quantized axis, here of length 1 (one block per row of the view): one per byte."""
    if bq.default_zero_point() and bq.bits < 8:
        return [], None
    return [numpy_helper.from_array(bq.zero_points.astype(np.uint8).reshape(bq.n, -1, 1), name)], name


def _shared_embedding(gather: onnx.NodeProto, matmul: onnx.NodeProto, bq: BlockQuantized, wname: str,
                      accuracy_level: int, dtype: type = np.float32) -> tuple:
    """lm_head MatMulNBits + embedding GatherBlockQuantized reading one codes initializer.

    The codes are stored once as MatMulNBits wants them ([V, K_blocks, blob]); the gather reads the same
    3-D tensor with quantize_axis=2 and a Reshape back to [..., hidden].
    """
    head, inits = _matmul_nbits(matmul, bq, wname, accuracy_level, dtype)
    base, out = "model.embed_tokens.shared", gather.output[0]
    view, view_inits, zp = _gather_view(base, bq, head.input[2])
    shape = f"{base}.shape"
    inits = inits + view_inits + [numpy_helper.from_array(np.array([0, 0, bq.k], np.int64), shape)]
    gbq = _gbq(gather.name + "BlockQuantizedShared", head.input[1], gather.input[1], f"{base}.scales", zp,
               out + "/blocks", bq)
    reshape = helper.make_node("Reshape", [out + "/blocks", shape], [out], name=gather.name + "/Reshape")
    return [*view, gbq, reshape], head, inits


def _refined_vocab(gather: onnx.NodeProto | None, matmul: onnx.NodeProto, coarse: BlockQuantized,
                   residual: BlockQuantized, wname: str, accuracy_level: int, top_k: int,
                   dtype: type = np.float32) -> tuple:
    """The vocabulary matrix as a coarse 4-bit part + a 4- or 2-bit residual (``blockquant.split_coarse``).

    lm_head: the coarse half alone gives approximate logits (MatMulNBits, half the bytes of 8 bits); TopK
    picks the ``top_k`` best; their residual rows are gathered and dotted with the hidden state in float,
    and added to their coarse logits (TopK's values); ScatterElements writes those sums over the approximate
    logits. Every token greedy or top-k/top-p sampling can pick gets its 8-bit logit; only the far tail keeps
    4-bit error. The candidates' coarse rows are not gathered again: their dot is already in TopK's values,
    and reading 128 random rows a step from the mapped coarse table faulted ~50 MB of it back into RSS within
    a 128-token answer. The embedding (when shared) sums both halves' rows, so it is the 8-bit table.
    Returns (embedding nodes or [], lm_head nodes, initializers).
    """
    logits = matmul.output[0]
    coarse_node = onnx.NodeProto()
    coarse_node.CopyFrom(matmul)
    coarse_node.output[0] = logits + "/coarse"
    head, inits = _matmul_nbits(coarse_node, coarse, wname, accuracy_level, dtype)
    base = wname.replace(".weight", "")
    c_view, c_inits, c_zp = _gather_view(f"{base}.coarse", coarse, head.input[2])
    if gather is None:  # the coarse codes are read by the lm_head alone: no gather needs their zero points
        c_inits = [t for t in c_inits if t.name != c_zp]
    r_codes, r_scales, r_div = f"{base}.residual.qweight", f"{base}.residual.scales", f"{base}.residual.div"
    # the residual's scales are the coarse ones / 2^bits (split_coarse): computed in the graph, folded at load
    r_view = [helper.make_node("Div", [f"{base}.coarse.scales", r_div], [r_scales], name=f"{base}/ResidualScales")]
    r_inits = [numpy_helper.from_array(residual.packed_codes(), r_codes),
               numpy_helper.from_array(np.array(1 << residual.bits, dtype), r_div)]
    r_zp_inits, r_zp = _gather_zero_points(residual, f"{base}.residual.qzeros")
    r_inits += r_zp_inits
    inits = inits + c_inits + r_inits
    # Reshape targets [..., K_blocks, block] -> [..., hidden], 0 = kept: the candidates' rows are
    # [batch, seq, top_k, ...] (3 leading axes), the embedding's [batch, seq, ...] (2)
    rows3, rows2 = f"{base}.rows_shape3", f"{base}.rows_shape2"
    inits.append(numpy_helper.from_array(np.array([0, 0, 0, coarse.k], np.int64), rows3))
    embed = []
    if gather is not None:  # both halves' rows, summed: the embedding is the whole (8- or 6-bit) table
        ids, out, tag = gather.input[1], gather.output[0], gather.name + "Split"
        inits.append(numpy_helper.from_array(np.array([0, 0, coarse.k], np.int64), rows2))
        embed = [_gbq(f"{tag}/Coarse", head.input[1], ids, f"{base}.coarse.scales", c_zp, out + "/c", coarse),
                 _gbq(f"{tag}/Residual", r_codes, ids, r_scales, r_zp, out + "/r", residual),
                 helper.make_node("Add", [out + "/c", out + "/r"], [out + "/blocks"], name=f"{tag}/Add"),
                 helper.make_node("Reshape", [out + "/blocks", rows2], [out], name=f"{tag}/Reshape")]
    k, last = f"{base}.refine_k", f"{base}.axis_last"
    inits += [numpy_helper.from_array(np.array([min(top_k, coarse.n)], np.int64), k),
              numpy_helper.from_array(np.array([-1], np.int64), last)]
    t, hidden = matmul.name + "Refine", matmul.input[0]
    # residual rows [..., top_k, hidden] @ hidden [..., hidden, 1]: a MatMul, whose kernels accumulate fp16 in fp32
    refine = [helper.make_node("TopK", [logits + "/coarse", k], [t + "/values", t + "/ids"], name=t + "/TopK", axis=-1),
              _gbq(f"{t}/Residual", r_codes, t + "/ids", r_scales, r_zp, t + "/rows/r", residual),
              helper.make_node("Reshape", [t + "/rows/r", rows3], [t + "/rows"], name=t + "/Reshape"),
              helper.make_node("Unsqueeze", [hidden, last], [t + "/hidden"], name=t + "/Unsqueeze"),
              helper.make_node("MatMul", [t + "/rows", t + "/hidden"], [t + "/dots"], name=t + "/Dot"),
              helper.make_node("Squeeze", [t + "/dots", last], [t + "/residual"], name=t + "/Squeeze"),
              helper.make_node("Add", [t + "/values", t + "/residual"], [t + "/exact"], name=t + "/Add"),
              helper.make_node("ScatterElements", [logits + "/coarse", t + "/ids", t + "/exact"], [logits],
                               name=t + "/Scatter", axis=-1)]
    views = [*c_view, *r_view]  # before the first reader: the embedding if shared, else the lm_head
    if gather is None:
        return [], [*views, head, *refine], inits
    return [*views, *embed], [head, *refine], inits


def _refines(plan: QuantPlan, bq: BlockQuantized) -> bool:
    """Split an 8-bit vocabulary matrix only in int4 bundles (int8 ones stay exact end to end)."""
    return plan.vocab_refine > 0 and plan.body_bits == 4 and bq.bits == 8


def _split_for_refine(bq: BlockQuantized, w_nk: np.ndarray, how: str, block: int | None = None,
                      bits: int = 8) -> tuple:
    """(coarse, residual, how) for ``_refined_vocab``. The split is exact for a symmetric 8-bit grid (GGUF
    Q8_0 copies, RTN): its zero point 128 leaves room for the offset that makes the coarse half round to
    nearest. An asymmetric fit fills all 256 codes, so that weight is re-coded with symmetric RTN first.

    ``block`` (the plan's ``block_size_8bit``) re-codes the matrix at that wider block first: the coarse
    half is what every decode step reads, and at block 32 its fp32 scales are a fifth of its bytes
    (measured, 151,936 x 896 MatMulNBits at M = 1: 2.5 ms at block 32, 1.9 ms at 64 or 128). ``bits`` = 6
    re-codes it at 6 bits (symmetric RTN), which leaves a 2-bit residual."""
    wide = block if block and block != bq.block_size and w_nk.shape[1] % block == 0 else None
    if bits != 8 or wide or not bq.default_zero_point():
        bq = quantize_rtn(w_nk, bits, wide or bq.block_size, symmetric=True)
        how = ("rtn-symmetric" + (f"/{bits}bit" if bits != 8 else "") + (f"/block{wide}" if wide else "")
               + f"(for the split; not {how})")
    coarse, residual = split_coarse(bq)
    return coarse, residual, how


def _lm_head(gather: onnx.NodeProto | None, head: onnx.NodeProto, bq: BlockQuantized, w_nk: np.ndarray, how: str,
             plan: QuantPlan, dtype: type, report: QuantReport, float_bytes: int) -> tuple:
    """The lm_head, and the embedding too when ``gather`` shares its matrix: split and refined when the plan
    asks for it, else one MatMulNBits (whose codes the gather reads). Records the weight in ``report``.
    Returns (embedding nodes or [], lm_head nodes, initializers)."""
    name = head.input[1]
    if _refines(plan, bq):
        # "faithful" GGUF imports keep the source's own 8-bit codes, blocks and all
        faithful = plan.gguf_mode == "faithful"
        block = plan.block_size_8bit if not faithful else None
        coarse, residual, how = _split_for_refine(bq, w_nk, how, block, 8 if faithful else plan.vocab_bits)
        report.add_split(name, how, coarse, residual, plan.vocab_refine, float_bytes)
        return _refined_vocab(gather, head, coarse, residual, name, plan.level_for(name), plan.vocab_refine, dtype)
    report.add(name, how, bq, float_bytes)
    if gather is None:
        node, inits = _matmul_nbits(head, bq, name, plan.level_for(name), dtype)
        return [], [node], inits
    nodes, node, inits = _shared_embedding(gather, head, bq, name, plan.level_for(name), dtype)
    return nodes, [node], inits


def _float_dtype(graph: onnx.GraphProto, weights: "ExternalWeights") -> type:
    """The graph's float type (fp16 for GPU profiles): block scales must match it, since MatMulNBits and
    GatherBlockQuantized take their output type from the scales."""
    for node in graph.node:
        if node.op_type in ("MatMul", "Gather") and len(node.input) == 2:
            name = node.input[1] if node.op_type == "MatMul" else node.input[0]
            if name in weights and weights.inits[name].data_type == onnx.TensorProto.FLOAT16:
                return np.float16
    return np.float32


def _tie_candidates(graph: onnx.GraphProto, weights: "ExternalWeights"):
    """The embedding Gather and lm_head MatMul nodes, if the graph has both with float initializers."""
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in weights
                   and _role(n.input[0]) == "embed"), None)
    head = next((n for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in weights
                 and _role(n.input[1]) == "lm_head"), None)
    return gather, head


def quantize_graph(
    model: onnx.ModelProto,
    weights: ExternalWeights,
    plan: QuantPlan,
    coder: WeightCoder | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> QuantReport:
    """Rewrite ``model`` in place. Float initializers that were replaced are dropped from the graph."""
    if plan.body_bits is None:
        raise ExportError(f"quantize_graph needs int4 or int8, got precision {plan.precision!r}.",
                          "use --precision int4 or int8, or skip quantization for fp32.")
    coder = coder or float_coder(plan)
    report = QuantReport()
    graph = model.graph
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    replaced: set[str] = set()
    shared: dict[str, list[onnx.NodeProto]] = {}
    gather, head = _tie_candidates(graph, weights)
    dtype = _float_dtype(graph, weights)
    if plan.share_embeddings and gather is not None and head is not None:
        emb, lm = weights.array(gather.input[0]), weights.array(head.input[1])  # [V, H] and [H, V]
        if emb.shape == lm.shape[::-1] and emb.shape[1] % plan.block_size == 0:
            lm_nk = np.ascontiguousarray(lm.T)
            diff = float(np.linalg.norm(emb - lm_nk) / max(float(np.linalg.norm(lm_nk)), 1e-30))
            if diff <= plan.effective_tie_tolerance:
                bq, how = coder(head.input[1], lm_nk, plan.shared_bits, "lm_head")
                nodes, head_nodes, inits = _lm_head(gather, head, bq, lm_nk, how + f"+shared-embedding(diff {diff:.3f})",
                                                    plan, dtype, report, lm.nbytes + emb.nbytes)
                shared[gather.name], shared[head.name] = nodes, head_nodes
                replaced |= {gather.input[0], head.input[1]}
                new_inits.extend(inits)
                report.tied = {"relative_difference": round(diff, 4),
                               "bits": report.tensors[head.input[1]]["bits"]}
    for node in progress(list(graph.node)):
        if node.name in shared:
            new_nodes.extend(shared[node.name])
            continue
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in weights:
            wname = node.input[1]
            role = _role(wname)
            bits = plan.lm_head_bits if role == "lm_head" else plan.body_bits
            if bits is not None and keeps_8_bits(wname, plan.eight_bit):
                bits = 8
            w = weights.array(wname)
            if bits is None or w.ndim != 2 or w.shape[0] % plan.block_size:
                new_nodes.append(node)
                continue
            w_nk = np.ascontiguousarray(w.T)
            bq, how = coder(wname, w_nk, bits, role)
            if role == "lm_head":
                _, new, inits = _lm_head(None, node, bq, w_nk, how, plan, dtype, report, w.nbytes)
                replaced.add(wname)
                new_nodes.extend(new)
                new_inits.extend(inits)
                continue
            if bq.offsets is not None:
                new, inits = _offset_correction(node, bq, wname, plan.level_for(wname), dtype,
                                                stored=dtype if plan.promises_exact else np.float16)
            else:
                matmul, inits = _matmul_nbits(node, bq, wname, plan.level_for(wname), dtype)
                new = [matmul]
        elif node.op_type == "Gather" and node.input[0] in weights and plan.embed_bits:
            wname = node.input[0]
            w = weights.array(wname)
            if w.ndim != 2 or w.shape[1] % plan.block_size:
                new_nodes.append(node)
                continue
            bq, how = coder(wname, w, plan.embed_bits, "embed")
            gather_node, inits = _gather_block_quantized(node, bq, wname, dtype)
            new = [gather_node]
        else:
            new_nodes.append(node)
            continue
        report.add(wname, how, bq, w.nbytes)
        replaced.add(wname)
        new_nodes.extend(new)
        new_inits.extend(inits)
    if plan.eight_bit_halves:
        new_nodes, new_inits, count, added = split_eight_bit(new_nodes, new_inits)
        if count:
            report.halves = {"weights": count, "added_mb": round(added / 2**20, 1)}
            report.quant_bytes += added
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    weights.materialize_rest(model)  # only the small float tensors are left (norms, biases, rotary caches)
    graph.initializer.extend(new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return report


def save_with_external_data(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> None:
    """Write model.onnx + model.onnx.data (one external file, as onnxruntime-genai expects)."""
    folder = Path(folder)
    data = folder / f"{name}.data"
    if data.exists():
        os.remove(data)
    onnx.save_model(model, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.data", size_threshold=1024, convert_attribute=False)
