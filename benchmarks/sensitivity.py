"""Which int4 weights cost the most faithfulness? Per-layer sensitivity of an exported bundle.

    python benchmarks/sensitivity.py BUNDLE [--tokens 512] [--by layer|kind|tensor] [--lm-head-bits 4]

Loads the float source (transformers), then puts the bundle's own dequantized weights into it (every
MatMulNBits, read back from model.onnx.data), so the "all quantized" row reproduces the bundle up to the
activation rounding of accuracy level 4. Then, one group at a time (a layer's 4-bit weights, one tensor,
or every tensor of a kind such as all down projections), the float weights are put back and the perplexity
ratio on the held-out texts is measured again.
The gain of a group is how much of the bundle's loss it alone accounts for: the groups with the largest
gain are the ones worth keeping at 8 bits (``eight_bit`` in a device profile), at ~6.5 MB each for a
0.5B layer. Prints a table and writes JSON into benchmarks/results/.

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
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

_ONNX_WEIGHT = re.compile(r"(?:model\.layers\.(\d+)\.(attn|mlp)\.(\w+)|lm_head)\.MatMul\.qweight$")


def bundle_weights(bundle: Path) -> dict[str, tuple[np.ndarray, int]]:
    """ONNX weight base name -> (dequantized float [N, K], bits), for every MatMulNBits of the bundle."""
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
        bq = BlockQuantized.from_packed(weights.array(node.input[1]), weights.array(node.input[2]), zp,
                                        n=attrs["N"], k=attrs["K"], bits=attrs["bits"],
                                        block_size=attrs["block_size"])
        offsets = node.input[1].removesuffix(".qweight") + ".offsets"  # GGUF Q4_K's minimum, [K/block, N]
        if offsets in weights:
            bq.offsets = np.ascontiguousarray(weights.array(offsets).T).astype(np.float32)
        out[node.input[1].removesuffix(".qweight")] = (bq.dequantize(), attrs["bits"])
    return out


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


class Harness:
    """A float model whose weights can be swapped between float and the bundle's values, and scored."""

    def __init__(self, hf_dir: Path, texts: dict[str, list[int]], threads: int | None):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        self.params = dict(self.model.named_parameters())
        self.params.setdefault("lm_head.weight", self.model.lm_head.weight)
        self.float = {}
        self.texts = {name: torch.tensor([ids]) for name, ids in texts.items()}

    def set(self, onnx_base: str, value: np.ndarray | None) -> None:
        """Put the bundle's value (or the float original, when ``value`` is None) in place."""
        seen = set()
        for pname, rows in hf_targets(onnx_base, self.model.config):
            p = self.params[pname]
            if id(p) in seen:  # tied embedding: one tensor under two names
                continue
            seen.add(id(p))
            if pname not in self.float:
                self.float[pname] = p.data.clone()
            src = self.float[pname] if value is None else self.torch.from_numpy(np.ascontiguousarray(value[rows]))
            p.data.copy_(src)

    def nll(self) -> dict[str, float]:
        torch = self.torch
        out = {}
        with torch.inference_mode():
            for name, ids in self.texts.items():
                logits = self.model(input_ids=ids).logits[0, :-1].float()
                out[name] = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--by", choices=["layer", "kind", "tensor"], default="layer")
    ap.add_argument("--bits", type=int, default=4, help="which weights to probe (default: the 4-bit ones)")
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
    reference = harness.nll()
    quantized = bundle_weights(args.bundle)
    for base, (w, _) in quantized.items():
        if not any(p in base for p in args.keep):
            harness.set(base, w)

    def row(label: str, nbytes_8bit: int = 0) -> dict:
        nll = harness.nll()
        ratios = {t: math.exp(nll[t] - reference[t]) for t in nll}
        r = {"group": label, "ratios": {t: round(v, 4) for t, v in ratios.items()},
             "mean_log_ratio": round(float(np.mean([nll[t] - reference[t] for t in nll])), 5),
             "extra_mb_at_8bit": round(nbytes_8bit / 1e6, 1)}
        print(f"{label:36s} " + " ".join(f"{v:7.4f}" for v in ratios.values()), flush=True)
        return r

    print(f"{'group':36s} " + " ".join(f"{t[:7]:>7s}" for t in texts))
    rows = [row("the bundle" + (f", float: {' '.join(args.keep)}" if args.keep else ""))]
    probe = {b: w for b, (w, bits) in quantized.items() if bits == args.bits and b != "lm_head.MatMul"
             and args.only in b and not any(p in b for p in args.keep)}
    groups: dict[str, list[str]] = {}
    for base in probe:
        m = _ONNX_WEIGHT.search(base + ".qweight")
        key = {"layer": f"layer {int(m.group(1)):2d}", "kind": f"every {m.group(3)}",
               "tensor": base.removesuffix(".MatMul")}[args.by]
        groups.setdefault(key, []).append(base)
    for key in sorted(groups):
        extra = sum(probe[b].size for b in groups[key]) // 2  # 4 -> 8 bits: half a byte more per weight
        for b in groups[key]:
            harness.set(b, None)
        r = row(f"{key} float", extra)
        r["gain"] = round(rows[0]["mean_log_ratio"] - r["mean_log_ratio"], 5)
        rows.append(r)
        for b in groups[key]:
            harness.set(b, probe[b])
    if args.lm_head_bits and "lm_head.MatMul" in quantized:
        w8 = quantized["lm_head.MatMul"][0]
        harness.set("lm_head.MatMul", quantize_fitted(w8, 4, 32).dequantize())
        r = row("lm_head+embed at 4 bits", -w8.size // 2)
        r["gain"] = round(rows[0]["mean_log_ratio"] - r["mean_log_ratio"], 5)
        rows.append(r)
        harness.set("lm_head.MatMul", w8)
    ranked = sorted(rows[1:], key=lambda r: -r.get("gain", 0))
    print("\nlargest gains (mean log-ratio over the texts):")
    for r in ranked[:8]:
        print(f"  {r['group']:34s} {r['gain']:+.5f}  (+{r['extra_mb_at_8bit']} MB at 8 bits)")
    out = HERE / "results" / f"sensitivity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"bundle": str(args.bundle), "tokens": args.tokens, "by": args.by, "keep": args.keep,
                               "reference_nll": reference, "rows": rows,
                               "seconds": round(time.time() - started, 1)}, indent=1))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
