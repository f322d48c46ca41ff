"""Memory-bandwidth ceiling for decode, and how close a bundle gets to it.

    python benchmarks/bandwidth.py [BUNDLE ...] [--threads N] [--mb 512] [--decode-tps X ...]

Decoding one token reads every weight once (batch 1: a matrix-vector product per layer), so
``decode tok/s x bytes of weights read per token`` cannot exceed the machine's memory bandwidth. The probe
times a streaming read (a sum over a buffer far larger than the caches) split across ``threads`` threads,
the access pattern of MatMulNBits at batch 1; the bytes per token come from the bundle's graph (the
initializers each MatMulNBits reads, plus one embedding row). Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def read_bandwidth_gbs(mb: int = 512, threads: int = 2, repeats: int = 5) -> float:
    """Best-of-N streaming read bandwidth in GB/s (10^9 bytes), numpy releasing the GIL per chunk."""
    buf = np.ones(mb * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def weight_bytes_per_token(bundle: Path) -> int:
    """Bytes of initializers a decode step reads: MatMulNBits weights/scales/zero points, one embedding row."""
    import onnx

    model = onnx.load(str(Path(bundle) / "model.onnx"), load_external_data=False)
    size = {}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        size[t.name] = n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    for node in model.graph.node:  # a Cast of an initializer is folded at load: count what it folds into
        if node.op_type == "Cast" and node.input[0] in size:
            to = next(a.i for a in node.attribute if a.name == "to")
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(to).itemsize
            src = next(t for t in model.graph.initializer if t.name == node.input[0])
            size[node.output[0]] = (int(np.prod(src.dims)) if src.dims else 1) * itemsize
    total = 0
    seen = set()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "MatMul", "DequantizeLinear"):
            for name in node.input[1:] if node.op_type == "MatMulNBits" else node.input:
                if name in size and name not in seen:
                    seen.add(name)
                    total += size[name]
        elif node.op_type in ("GatherBlockQuantized", "Gather") and node.input[0] in size:
            table = [t for t in model.graph.initializer if t.name == node.input[0]][0]
            if table.name not in seen:
                total += size[table.name] // max(int(table.dims[0]), 1)  # one row per token
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--mb", type=int, default=512, help="probe buffer size (far above the last-level cache)")
    ap.add_argument("--decode-tps", type=float, action="append", default=[],
                    help="measured decode tok/s for each bundle, in order (e.g. from compare.py)")
    args = ap.parse_args()
    gbs = read_bandwidth_gbs(args.mb, args.threads)
    rows = []
    for i, b in enumerate(args.bundles):
        per_token = weight_bytes_per_token(b)
        row = {"bundle": str(b), "bytes_per_token": per_token, "ceiling_tps": round(gbs * 1e9 / per_token, 1)}
        if i < len(args.decode_tps):
            row["decode_tps"] = args.decode_tps[i]
            row["fraction_of_ceiling"] = round(args.decode_tps[i] / row["ceiling_tps"], 3)
        rows.append(row)
    report = {"read_bandwidth_gbs": round(gbs, 2), "threads": args.threads, "buffer_mb": args.mb, "bundles": rows}
    print(f"streaming read bandwidth: {gbs:.1f} GB/s ({args.threads} threads, {args.mb} MB buffer)",
          file=sys.stderr)
    for r in rows:
        frac = f"{r['fraction_of_ceiling']:.0%} of ceiling" if "fraction_of_ceiling" in r else ""
        print(f"  {r['bundle']}: {r['bytes_per_token'] / 2**20:.0f} MiB/token -> ceiling {r['ceiling_tps']} tok/s "
              f"{frac}", file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
