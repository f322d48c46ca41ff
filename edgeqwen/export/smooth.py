"""Move the attention input's outlier channels into the q/k/v weights before quantizing (SmoothQuant).

Why: at accuracy level 4 every MatMulNBits rounds its input to int8, one scale per block of K, so one
large channel in a block coarsens the other 31 or 127. ``benchmarks/sensitivity.py --by activation``
measured where that costs on Qwen2.5-Coder-0.5B: the q/k/v projection's input (the attention RMSNorm's
output, whose few huge channels Qwen is known for) carries nearly all of it; giving that one matmul float
activations would move the default int4 bundle's perplexity ratios 1.031 / 1.015 / 1.043 -> 1.021 / 1.013 /
1.029 (English / code / licence); every other kind gains a fifth of that or less.

The input is ``RMSNorm(x) * gamma``, so dividing gamma's channel j by s_j and multiplying row j of the q/k/v
weight by s_j leaves the float model as it was while flattening the channels the kernel rounds. With
s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (SmoothQuant; alpha = 0.5 measured best of 0.5 / 0.75 / 1 in the
harness, and max better than RMS as the activation statistic) the harness recovered ~70% of that gain at no
runtime cost. Only weights that are re-quantized anyway are touched: an exact GGUF copy would stop being exact.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# op type -> index of its gamma input: the norms whose output 0 is the attention's q/k/v input
_NORM_GAMMA = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}


def smoothing_scales(act_max: np.ndarray, w_kn: np.ndarray, alpha: float) -> np.ndarray:
    """s [K]: SmoothQuant's per-channel migration, normalised to a geometric mean of 1 (so the weight's
    overall range, and hence its quantization grid, stays where it was)."""
    a = np.maximum(np.asarray(act_max, np.float64), 1e-5)
    w = np.maximum(np.abs(np.asarray(w_kn, np.float64)).max(axis=1), 1e-5)
    s = a ** alpha / w ** (1.0 - alpha)
    return (s / np.exp(np.log(s).mean())).astype(np.float32)


def smooth_attention_inputs(model: onnx.ModelProto, weights, act_max: dict[str, np.ndarray], alpha: float,
                            wanted=lambda name: True) -> dict[str, np.ndarray]:
    """Rewrite, in place, each (Skip)SimplifiedLayerNormalization whose output 0 feeds only MatMuls on
    ``wanted`` q/k/v weights with a recorded input maximum: gamma / s, and every such weight's rows * s.

    ``weights`` is the graph's ``ExternalWeights``; the rewritten tensors are stored in the graph (in memory).
    Returns {weight name: s} for the weights changed, so calibration statistics can follow them.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    done: dict[str, np.ndarray] = {}
    for norm in model.graph.node:
        if norm.op_type not in _NORM_GAMMA or not norm.output:
            continue
        readers = consumers.get(norm.output[0], [])
        names = [r.input[1] for r in readers if r.op_type == "MatMul" and len(r.input) == 2]
        if (not names or len(names) != len(readers) or not all("attn." in n and "o_proj" not in n for n in names)
                or not all(n in weights and n in act_max and wanted(n) for n in names)):
            continue
        gamma_name = norm.input[_NORM_GAMMA[norm.op_type]]
        if gamma_name not in weights:
            continue
        mats = [weights.array(n) for n in names]  # [K, N] each
        s = smoothing_scales(act_max[names[0]], np.concatenate(mats, axis=1), alpha)
        gamma = weights.array(gamma_name)
        _store(weights, gamma_name, (gamma.astype(np.float32) / s).astype(gamma.dtype))
        for n, w in zip(names, mats):
            _store(weights, n, (w.astype(np.float32) * s[:, None]).astype(w.dtype))
            done[n] = s
    return done


def _store(weights, name: str, value: np.ndarray) -> None:
    """Replace an initializer's data in place (the graph and ``weights`` share the TensorProto)."""
    weights.inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))


def follow_statistics(scales: dict[str, np.ndarray], importance: dict | None, hessians) -> None:
    """The smoothed weights see x / s: mean x^2 becomes mean x^2 / s^2, and GPTQ's inputs X become X / s."""
    for name, s in scales.items():
        if importance is not None and name in importance:
            importance[name] = importance[name] / (s * s)
        if hessians is not None:
            hessians.rescale(name, s)
