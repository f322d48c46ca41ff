"""Activation statistics for calibrated quantization, from a calibration text shipped with the package.

For every linear layer we record the mean squared activation of each input channel over the calibration
tokens. A weight column that multiplies a channel with large activations contributes more to the layer's
output error, so the int4 fit weights its error by this importance (``blockquant.quantize_fitted``).
This is the statistic llama.cpp calls an importance matrix and the one AWQ builds on; it needs one forward
pass of the float model over ~1-2k tokens (seconds on a CPU) and no hub.

GPTQ needs the whole second-moment matrix ``X^T X`` of each layer's input, not just its diagonal. The pass
keeps the inputs ``X`` themselves ([tokens, K]) and forms ``X^T X`` only when the quantizer asks for one
layer's: with ~1.4k calibration tokens and K up to 11,008 (the 3B's down projections), X is 4-8x smaller
than X^T X, and all layers' Gram matrices at once would need 2.3 GB (0.5B), 9 GB (1.5B), 17 GB (3B).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np

_HF_LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
_ONNX_FOR = {  # HF module -> the builder graph's initializer(s) that take the same input
    "q_proj": ("attn.qkv_proj", "attn.q_proj"), "k_proj": ("attn.qkv_proj", "attn.k_proj"),
    "v_proj": ("attn.qkv_proj", "attn.v_proj"), "o_proj": ("attn.o_proj",),
    "gate_proj": ("mlp.gate_proj", "mlp.gate_up_proj"), "up_proj": ("mlp.up_proj", "mlp.gate_up_proj"),
    "down_proj": ("mlp.down_proj",),
}
_SAME_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # module -> the one it shares input with


def calibration_text() -> str:
    return (resources.files("edgeqwen.data") / "calibration.txt").read_text(encoding="utf-8")


def onnx_names(hf_module: str) -> list[str]:
    if hf_module == "lm_head":
        return ["lm_head.MatMul.weight"]
    m = _HF_LINEAR.match(hf_module)
    if not m or m.group(3) not in _ONNX_FOR:
        return []
    return [f"model.layers.{m.group(1)}.{target}.MatMul.weight" for target in _ONNX_FOR[m.group(3)]]


class GramMatrices(Mapping):
    """ONNX weight name -> mean ``x^T x`` of its input, computed on access from the recorded inputs."""

    def __init__(self, inputs: dict[str, np.ndarray]):
        self._inputs = inputs  # names sharing an input share one array

    def __getitem__(self, name: str) -> np.ndarray:
        x = self._inputs[name]
        return (x.T @ x) / np.float32(len(x))

    def __iter__(self):
        return iter(self._inputs)

    def __len__(self) -> int:
        return len(self._inputs)

    def rescale(self, name: str, s: np.ndarray) -> None:
        """The weight now reads x / s (``smooth.py``): its Gram matrix follows."""
        if name in self._inputs:
            self._inputs[name] = self._inputs[name] / s


def input_statistics(hf_dir: Path, text: str | None = None, *, max_tokens: int = 2048, threads: int | None = None,
                     hessian_for: tuple[str, ...] = (),
                     maxima: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], GramMatrices]:
    """(importance, hessians): per-channel mean x^2 for every linear layer, and the mean ``x^T x`` ([K, K])
    for the layers whose ONNX weight name contains one of ``hessian_for`` (e.g. ``("mlp.",)``). ``maxima``,
    when given, is filled with each layer's per-channel max |x| (what ``smooth.py`` migrates)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    tokenizer = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
    ids = tokenizer.encode(text or calibration_text(), add_special_tokens=False).ids[:max_tokens]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    peaks: dict[str, torch.Tensor] = {}
    kept: dict[str, np.ndarray] = {}
    hooks = []

    def hook(name):
        # q/k/v (and gate/up) read the same input: it is kept once and serves them all
        keep = (name.rsplit(".", 1)[-1] not in _SAME_INPUT
                and any(key in o for o in onnx_names(name) for key in hessian_for))

        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x.double() ** 2).sum(dim=0)
            peak = x.abs().amax(dim=0)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
            if keep:
                kept[name] = x.float().numpy().copy()

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and onnx_names(name):
            hooks.append(module.register_forward_hook(hook(name)))
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    del model
    out: dict[str, np.ndarray] = {}
    inputs: dict[str, np.ndarray] = {}
    for name, total in sums.items():
        head, _, leaf = name.rpartition(".")
        x = kept.get(f"{head}.{_SAME_INPUT[leaf]}" if leaf in _SAME_INPUT else name)
        mean_sq = (total / len(ids)).float().numpy()
        for onnx_name in onnx_names(name):
            out[onnx_name] = mean_sq  # a packed weight (qkv_proj, gate_up_proj) reads its parts' shared input
            if maxima is not None:
                maxima[onnx_name] = peaks[name].float().numpy()
            if x is not None and any(key in onnx_name for key in hessian_for):
                inputs[onnx_name] = x
    return out, GramMatrices(inputs)
