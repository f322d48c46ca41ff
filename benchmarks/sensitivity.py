"""Which int4 weights cost the most faithfulness? Per-layer sensitivity of an exported bundle.

    python benchmarks/sensitivity.py BUNDLE [--tokens 512] [--by layer|kind|tensor|activation] [--act-round]

Loads the float source (transformers), then puts the bundle's own dequantized weights into it (every
MatMulNBits, read back from model.onnx.data; a split vocabulary matrix is scored as the bundle does: every
token by the coarse half, the best ``refine_k`` corrected by the residual half). Then, one group at a time (a
layer's 4-bit weights, one tensor, or every tensor of a kind such as all down projections), the float
weights are put back and the perplexity ratio and top-1 agreement on the held-out texts are measured again.
The gain of a group is how much of the bundle's loss it alone accounts for: the groups with the largest
gain are the ones worth keeping at 8 bits (``eight_bit`` in a device profile), at ~6.5 MB each for a
0.5B layer. Prints a table and writes JSON into benchmarks/results/.

``--act-round`` also rounds each matmul's input as accuracy level 4 does (int8, symmetric, one scale per
block of the weight's block size: checked against onnxruntime's kernel), so the "bundle" row reproduces
the bundle itself, not just its weights. ``--by activation`` (implies it) keeps the bundle's weights and
turns that rounding off for one kind of matmul per row: what accuracy level 1 on that kind would buy.

``--lm-head-bits 4`` adds one what-if row: the shared embedding/lm_head re-fitted at 4 bits (68 MB
smaller, and the largest single read per decoded token).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

_ONNX_WEIGHT = re.compile(r"(?:model\.layers\.(\d+)\.(attn|mlp)\.(\w+)|lm_head)\.MatMul\.qweight$")


@dataclass
class Weight:
    """One MatMulNBits weight of a bundle, dequantized: what the harness puts into the float model."""

    value: np.ndarray  # float [N, K]: the values the bundle multiplies by (offsets and residual included)
    bits: int
    block_size: int
    accuracy_level: int
    offsets: np.ndarray | None = None  # [N, K]: the part of ``value`` added in float (GGUF Q4_K's minimum)
    coarse: np.ndarray | None = None  # split vocabulary: the half the lm_head scores every token with
    refine_k: int = 0  # ... and how many best candidates it scores again with ``value``


def _dense_offsets(bq) -> np.ndarray:
    return np.repeat(bq.offsets, bq.block_size, axis=1)[:, : bq.k]


def bundle_weights(bundle: Path) -> dict[str, Weight]:
    """ONNX weight base name -> its dequantized ``Weight``, for every MatMulNBits of the bundle."""
    import onnx
    from onnx import helper

    from edgeqwen.export.blockquant import BlockQuantized
    from edgeqwen.export.quantize import ExternalWeights

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    weights = ExternalWeights(model, bundle)
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or not _ONNX_WEIGHT.search(node.input[1]):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        zp = weights.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
        bq = BlockQuantized.from_packed(weights.array(node.input[1]), weights.array(node.input[2]), zp,
                                        n=n, k=k, bits=attrs["bits"], block_size=block)
        base = node.input[1].removesuffix(".qweight")
        w = Weight(bq.dequantize(), attrs["bits"], block, attrs.get("accuracy_level", 0))
        if base + ".offsets" in weights:  # GGUF Q4_K's minimum, [K/block, N]
            bq.offsets = np.ascontiguousarray(weights.array(base + ".offsets").T).astype(np.float32)
            w.value, w.offsets = bq.dequantize(), _dense_offsets(bq)
        if base + ".residual.qweight" in weights:  # split vocabulary (quantize._refined_vocab)
            codes = weights.array(base + ".residual.qweight")
            div = float(weights.array(base + ".residual.div"))
            residual = BlockQuantized.from_packed(codes, bq.scales / div, None, n=n, k=k,
                                                  bits=codes.shape[-1] * 8 // block, block_size=block)
            if base + ".residual.qzeros" in weights:  # one per byte, unpacked ([V, K_blocks, 1])
                residual.zero_points = weights.array(base + ".residual.qzeros").reshape(n, -1).astype(np.uint8)
            w.coarse, w.value = w.value, w.value + residual.dequantize()
            w.refine_k = int(weights.array(base + ".refine_k").reshape(-1)[0])
        out[base] = w
    return out


_NORM = re.compile(r"^model\.layers\.\d+\.input_layernorm\.weight$")


def bundle_norms(bundle: Path) -> dict[str, np.ndarray]:
    """The attention norms' gammas as the bundle has them: smoothing (export/smooth.py) divides them by the
    scales it multiplied the q/k/v rows by, so the float model needs both to compute what the bundle does."""
    import onnx

    from edgeqwen.export.quantize import ExternalWeights

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    weights = ExternalWeights(model, bundle)
    return {t.name: np.array(weights.array(t.name), np.float32) for t in model.graph.initializer
            if _NORM.match(t.name)}


def hf_targets(onnx_base: str, config) -> list[tuple[str, slice]]:
    """The transformers parameter(s) one ONNX weight stands for, with the ONNX rows each one takes."""
    if onnx_base == "lm_head.MatMul":
        return [("lm_head.weight", slice(None)), ("model.embed_tokens.weight", slice(None))]
    m = _ONNX_WEIGHT.search(onnx_base + ".qweight")
    layer, block, part = m.group(1), m.group(2), m.group(3)
    prefix = f"model.layers.{layer}." + ("self_attn." if block == "attn" else "mlp.")
    if part == "qkv_proj":
        hd = config.hidden_size // config.num_attention_heads
        q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
        return [(prefix + "q_proj.weight", slice(0, q)), (prefix + "k_proj.weight", slice(q, q + kv)),
                (prefix + "v_proj.weight", slice(q + kv, q + 2 * kv))]
    if part == "gate_up_proj":
        i = config.intermediate_size
        return [(prefix + "gate_proj.weight", slice(0, i)), (prefix + "up_proj.weight", slice(i, 2 * i))]
    return [(prefix + f"{part}.weight", slice(None))]


def kind_of(onnx_base: str) -> str:
    """qkv_proj, o_proj, gate_proj, up_proj, down_proj (or gate_up_proj), or lm_head."""
    m = _ONNX_WEIGHT.search(onnx_base + ".qweight")
    return m.group(3) or "lm_head"


def round_activations(x, block: int):
    """Accuracy level 4's input rounding: int8, symmetric, one scale (max |x| / 127) per block along K."""
    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // block, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    scale = scale.masked_fill(scale == 0, 1.0)
    return ((blocks / scale).round() * scale).reshape(shape)


class Harness:
    """A float model whose weights can be swapped between float and the bundle's values, and scored.

    With ``act_round`` on, every linear layer holding a bundle weight of accuracy level 4 rounds its input
    as the kernel does (``float_kinds`` exempts kinds, as accuracy level 1 would), and a split vocabulary
    is scored as the bundle's graph does it: the coarse half for every token (its input rounded), the best
    ``refine_k`` candidates' coarse logits plus their residual rows' float dot product (a MatMul)."""

    def __init__(self, hf_dir: Path, texts: dict[str, list[int]], threads: int | None):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        self.params = dict(self.model.named_parameters())
        self.params.setdefault("lm_head.weight", self.model.lm_head.weight)
        self.modules = dict(self.model.named_modules())
        self.float = {}
        self.texts = {name: torch.tensor([ids]) for name, ids in texts.items()}
        self.act_round = False
        self.float_kinds: set[str] = set()
        self.rounding: dict[str, tuple[int, str, object]] = {}  # module -> (block, kind, dense offsets)
        self.refine = None  # (coarse [V, K] tensor, top k, block) while the bundle's split vocabulary is in
        self.input_scales: dict[str, object] = {}  # "model.layers.N.self_attn." -> smoothing's s ([K] tensor)
        for name, module in self.modules.items():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.register_forward_pre_hook(self._pre)
                module.register_forward_hook(self._post)
        self._head_forward = self.model.lm_head.forward
        self.model.lm_head.forward = self._head

    def _spec(self, module):
        spec = self.rounding.get(getattr(module, "_sens_name", None))
        if not self.act_round or spec is None or spec[1] in self.float_kinds:
            return None
        return spec

    def _pre(self, module, args):
        spec = self._spec(module)
        if spec is None:
            return None
        if spec[2] is not None:  # _post needs the unrounded input for the float offsets
            module._sens_input = args[0]
        return (round_activations(args[0], spec[0]),)

    def _post(self, module, args, output):
        spec = self._spec(module)
        if spec is None or spec[2] is None:
            return None
        # the bundle adds the Q4_K offsets as (block sums of the unrounded x) @ offsets, in float
        return output + self.torch.nn.functional.linear(module._sens_input - args[0], spec[2])

    def _head(self, x):
        if self.refine is None:
            spec = self.rounding.get("lm_head")
            if self.act_round and spec is not None and "lm_head" not in self.float_kinds:
                x = round_activations(x, spec[0])
            return self._head_forward(x)
        coarse, k, block = self.refine
        rounded = self.act_round and "lm_head" not in self.float_kinds
        logits = (round_activations(x, block) if rounded else x) @ coarse.T
        ids = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        residual = self.model.lm_head.weight[ids] - coarse[ids]  # [..., k, K]: the whole matrix less the coarse
        return logits.scatter(-1, ids, logits.gather(-1, ids) + (residual @ x.unsqueeze(-1)).squeeze(-1))

    def set(self, onnx_base: str, weight: Weight | None) -> None:
        """Put the bundle's weight (or the float original, when ``weight`` is None) in place."""
        torch = self.torch
        seen = set()
        for pname, rows in hf_targets(onnx_base, self.model.config):
            p = self.params[pname]
            mname = pname.removesuffix(".weight")
            if mname != "lm_head" and isinstance(self.modules.get(mname), torch.nn.Linear):
                self.modules[mname]._sens_name = mname
                off = None if weight is None or weight.offsets is None else torch.from_numpy(
                    np.ascontiguousarray(weight.offsets[rows]))
                quantized = weight is not None and weight.accuracy_level == 4
                if quantized:
                    self.rounding[mname] = (weight.block_size, kind_of(onnx_base), off)
                else:
                    self.rounding.pop(mname, None)
            if id(p) in seen:  # tied embedding: one tensor under two names
                continue
            seen.add(id(p))
            if pname not in self.float:
                self.float[pname] = p.data.clone()
            if weight is None:  # the float weight, smoothed as the bundle's norm expects (``smooth_norms``)
                parts = pname.rsplit(".", 2)  # [..."model.layers.N.self_attn", "q_proj", "weight"]
                qkv = len(parts) == 3 and parts[1] in ("q_proj", "k_proj", "v_proj")
                scale = self.input_scales.get(parts[0] + ".") if qkv else None
                src = self.float[pname] if scale is None else self.float[pname] * scale
            else:
                src = torch.from_numpy(np.ascontiguousarray(weight.value[rows]))
            p.data.copy_(src)
        if onnx_base == "lm_head.MatMul":
            split = weight is not None and weight.coarse is not None
            self.refine = (torch.from_numpy(weight.coarse), weight.refine_k, weight.block_size) if split else None
            if weight is not None and not split and weight.accuracy_level == 4:
                self.rounding["lm_head"] = (weight.block_size, "lm_head", None)
            else:
                self.rounding.pop("lm_head", None)

    def set_tensor(self, pname: str, value: np.ndarray) -> None:
        """Overwrite one transformers parameter (e.g. a norm's gamma read from the bundle)."""
        self.params[pname].data.copy_(self.torch.from_numpy(np.ascontiguousarray(value)))

    def smooth_norms(self, gammas: dict[str, np.ndarray]) -> None:
        """Take the bundle's attention-norm gammas. Smoothing (export/smooth.py) divided a gamma by s and
        multiplied the q/k/v input columns by s, so a q/k/v put back float must be multiplied by s too, or its
        row measures the mismatch (ratios ~10), not the quantization."""
        for name, gamma in gammas.items():
            if name not in self.params:
                continue
            original = self.params[name].data.numpy().copy()
            self.set_tensor(name, gamma)
            s = np.divide(original, gamma, out=np.ones_like(gamma), where=gamma != 0)
            if not np.allclose(s, 1.0):
                self.input_scales[name.replace("input_layernorm.weight", "self_attn.")] = self.torch.from_numpy(s)

    def score(self) -> dict[str, tuple[float, np.ndarray]]:
        """Per text: mean NLL of the next tokens and the top-1 prediction at every position."""
        torch = self.torch
        out = {}
        with torch.inference_mode():
            for name, ids in self.texts.items():
                logits = self.model(input_ids=ids).logits[0, :-1].float()
                out[name] = (float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])),
                             logits.argmax(-1).numpy())
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--by", choices=["layer", "kind", "tensor", "activation"], default="layer")
    ap.add_argument("--bits", type=int, default=4, help="which weights to probe (default: the 4-bit ones)")
    ap.add_argument("--act-round", action="store_true",
                    help="round each matmul's input as accuracy level 4 does (implied by --by activation)")
    ap.add_argument("--lm-head-bits", type=int, choices=[4], default=None)
    ap.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                    help="weights whose name contains PATTERN stay float in every row (e.g. mlp.gate_proj: "
                         "what is left to gain once those go to 8 bits)")
    ap.add_argument("--only", default="", metavar="PATTERN", help="probe only weights whose name contains this")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from quality import held_out_texts

    from edgeqwen import runtime
    from edgeqwen.export.blockquant import quantize_fitted
    from edgeqwen.export.sources import resolve_source

    started = time.time()
    tokenizer_model = runtime.load(args.bundle, threads=1)
    texts = {name: tokenizer_model.encode(t)[: args.tokens] for name, t in held_out_texts().items()}
    spec = tokenizer_model.manifest.source["spec"]
    del tokenizer_model
    harness = Harness(resolve_source(spec, progress=False).hf_dir, texts, args.threads)
    reference = harness.score()
    quantized = bundle_weights(args.bundle)
    for base, w in quantized.items():
        if not any(p in base for p in args.keep):
            harness.set(base, w)
    harness.smooth_norms(bundle_norms(args.bundle))
    harness.act_round = args.act_round or args.by == "activation"

    def row(label: str, nbytes_8bit: int = 0) -> dict:
        scores = harness.score()
        ratios = {t: math.exp(scores[t][0] - reference[t][0]) for t in scores}
        agree = {t: float((scores[t][1] == reference[t][1]).mean()) for t in scores}
        r = {"group": label, "ratios": {t: round(v, 4) for t, v in ratios.items()},
             "agreement": {t: round(v, 4) for t, v in agree.items()},
             "mean_log_ratio": round(float(np.mean([scores[t][0] - reference[t][0] for t in scores])), 5),
             "extra_mb_at_8bit": round(nbytes_8bit / 1e6, 1)}
        print(f"{label:36s} " + " ".join(f"{ratios[t]:7.4f} {agree[t] * 100:5.1f}%" for t in scores), flush=True)
        return r

    print(f"{'group':36s} " + " ".join(f"{t[:14]:>14s}" for t in texts))
    label = "the bundle" + (" (activations rounded)" if harness.act_round else "")
    rows = [row(label + (f", float: {' '.join(args.keep)}" if args.keep else ""))]

    def probe_row(label: str, extra: int = 0) -> None:
        r = row(label, extra)
        r["gain"] = round(rows[0]["mean_log_ratio"] - r["mean_log_ratio"], 5)
        rows.append(r)

    if args.by == "activation":
        for kind in sorted({kind_of(b) for b, w in quantized.items() if w.accuracy_level == 4}):
            harness.float_kinds = {kind}
            probe_row(f"every {kind}: float activations")
        harness.float_kinds = set()
    else:
        probe = {b: w for b, w in quantized.items() if w.bits == args.bits and b != "lm_head.MatMul"
                 and args.only in b and not any(p in b for p in args.keep)}
        groups: dict[str, list[str]] = {}
        for base in probe:
            m = _ONNX_WEIGHT.search(base + ".qweight")
            key = {"layer": f"layer {int(m.group(1)):2d}", "kind": f"every {m.group(3)}",
                   "tensor": base.removesuffix(".MatMul")}[args.by]
            groups.setdefault(key, []).append(base)
        for key in sorted(groups):
            extra = sum(probe[b].value.size for b in groups[key]) // 2  # 4 -> 8 bits: half a byte more a weight
            for b in groups[key]:
                harness.set(b, None)
            probe_row(f"{key} float", extra)
            for b in groups[key]:
                harness.set(b, probe[b])
    if args.lm_head_bits and "lm_head.MatMul" in quantized:
        head = quantized["lm_head.MatMul"]
        harness.set("lm_head.MatMul", Weight(quantize_fitted(head.value, 4, 32).dequantize(), 4, 32,
                                             head.accuracy_level))
        probe_row("lm_head+embed at 4 bits", -head.value.size // 2)
        harness.set("lm_head.MatMul", head)
    ranked = sorted(rows[1:], key=lambda r: -r.get("gain", 0))
    print("\nlargest gains (mean log-ratio over the texts):")
    for r in ranked[:8]:
        print(f"  {r['group']:34s} {r['gain']:+.5f}  (+{r['extra_mb_at_8bit']} MB at 8 bits)")
    out = HERE / "results" / f"sensitivity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"bundle": str(args.bundle), "tokens": args.tokens, "by": args.by, "keep": args.keep,
                               "act_round": harness.act_round,
                               "reference_nll": {t: v[0] for t, v in reference.items()}, "rows": rows,
                               "seconds": round(time.time() - started, 1)}, indent=1))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
