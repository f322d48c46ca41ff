"""One decode step of a graph, stepped directly with onnxruntime: where does the time go?

    python benchmarks/step_profile.py FOLDER [FOLDER...] [--context 16 512] [--threads 2] [--profile]

Works on any onnxruntime-genai-style decoder folder (an edgeqwen bundle, or onnxruntime-genai's builder
output): feeds one token with a zero KV cache of ``--context`` tokens, times ``--steps`` steps, and with
``--profile`` sums onnxruntime's per-node times by operator and lists the slowest MatMulNBits. No generation
loop is involved, so it separates "the graph is slower" from "the loop around it is slower". Prints a table
and JSON (nothing is written to results/: these are diagnostics, not goals).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def kv_shape(folder: Path, inp) -> tuple[int, int]:
    """(kv_heads, head_dim): from the graph when static, else from genai_config.json (both kinds of folder
    carry one)."""
    heads, dim = inp.shape[1], inp.shape[3]
    if isinstance(heads, int) and isinstance(dim, int):
        return heads, dim
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    return int(decoder["num_key_value_heads"]), int(decoder["head_size"])


def feeds_for(folder: Path, session: ort.InferenceSession, context: int) -> dict:
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = np.array([[100]], dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, context + 1), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.array([[context]], dtype=np.int64)
        elif inp.name.startswith("past_key_values."):
            kv_heads, head_dim = kv_shape(folder, inp)
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros((1, kv_heads, context, head_dim), dtype=dtype)
        else:
            raise SystemExit(f"unexpected graph input {inp.name!r}")
    return feeds


def step(folder: Path, context: int, threads: int, steps: int, profile: bool) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = profile
    so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "edgeqwen_step")
    session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = feeds_for(folder, session, context)
    for _ in range(3):
        session.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(steps):
        session.run(None, feeds)
    ms = (time.perf_counter() - t0) / steps * 1000
    out = {"folder": str(folder), "context": context, "threads": threads, "step_ms": round(ms, 2),
           "tokens_per_s": round(1000 / ms, 1)}
    if profile:
        path = session.end_profiling()
        events = [e for e in json.loads(Path(path).read_text())
                  if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        Path(path).unlink()
        runs = steps + 3
        by_op: collections.Counter = collections.Counter()
        by_node: collections.Counter = collections.Counter()
        for e in events:
            by_op[e["args"].get("op_name")] += e["dur"]
            if e["args"].get("op_name") == "MatMulNBits":
                by_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
        out["ms_per_step_by_op"] = {op: round(d / runs / 1000, 3) for op, d in by_op.most_common(8)}
        out["slowest_matmuls_ms"] = {n: round(d / runs / 1000, 3) for n, d in by_node.most_common(4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--context", type=int, nargs="+", default=[16, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="per-operator times (slows every step a little)")
    args = ap.parse_args()
    rows = [step(f, c, args.threads, args.steps, args.profile) for c in args.context for f in args.folders]
    print(f"{'graph':60} {'context':>7} {'ms/step':>8} {'tok/s':>7}")
    for r in rows:
        print(f"{r['folder'][-60:]:60} {r['context']:7} {r['step_ms']:8.2f} {r['tokens_per_s']:7.1f}")
        for op, ms in r.get("ms_per_step_by_op", {}).items():
            print(f"    {op:40} {ms:7.3f} ms")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
