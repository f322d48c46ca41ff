"""Export wall time and bundle size: edgeqwen int4/int8 next to onnxruntime-genai's builder, same source.

    python benchmarks/export_bench.py [--model ALIAS_OR_PATH] [--threads N] [--verify] [--quick]

Each export runs in a fresh subprocess (its own memory, timed from the outside). The source (GGUF fetch and its float HF conversion) is
resolved once beforehand and is cached, so the figures are the export itself. Prints a table and JSON and
writes the JSON into benchmarks/results/. ``--quick`` uses the tiny test model (CI smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, exit code, tail of output)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False)
    return time.perf_counter() - t0, proc.returncode, proc.stdout[-1500:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="alias, HF folder or .gguf (default: the catalog default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--verify", action="store_true", help="include edgeqwen's verification in its time")
    ap.add_argument("--quick", action="store_true", help="tiny random model (CI smoke run; figures meaningless)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the bundles under this folder")
    args = ap.parse_args()

    env = dict(os.environ)
    if args.quick:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from conftest import tiny_model  # noqa: PLC0415 - the tests' tiny model builder

        model = str(tiny_model("qwen2_untied"))
        env["EDGEQWEN_ALLOW_ANY_SIZE"] = "1"
    else:
        from edgeqwen.catalog import DEFAULT_ALIAS

        model = args.model or DEFAULT_ALIAS
    os.environ.update(env)
    from edgeqwen.export.sources import resolve_source

    src = resolve_source(model, progress=True)  # fetch + convert once, outside the timings
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="edgeqwen-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    exe = [sys.executable, "-m", "edgeqwen.cli", "export", model, "--device", "host", "--force"]
    if not args.verify:
        exe.append("--no-verify")
    systems = [
        ("edgeqwen int4 (default)", exe + ["--precision", "int4", "-o", str(work / "edgeqwen-int4")],
         work / "edgeqwen-int4"),
        ("edgeqwen int8", exe + ["--precision", "int8", "-o", str(work / "edgeqwen-int8")], work / "edgeqwen-int8"),
        ("genai builder int4 (default)",
         [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "q", "-i", str(src.hf_dir),
          "-o", str(work / "genai-int4"), "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")],
         work / "genai-int4"),
    ]
    rows = []
    for name, cmd, out in systems:
        shutil.rmtree(out, ignore_errors=True)
        wall, code, tail = timed(cmd, env)
        row = {"system": name, "wall_s": round(wall, 1), "exit": code}
        if code == 0:
            row["size_mb"] = folder_mb(out)
            row["size_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        else:
            row["error"] = tail.strip().splitlines()[-1] if tail.strip() else "failed"
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr)
    shutil.rmtree(work / "genai-cache", ignore_errors=True)
    base = rows[0]
    print(f"\n{'system':32} {'wall s':>7} {'size MB':>8} {'time ×':>7} {'size ×':>7}")
    for r in rows:
        if "size_mb" not in r:
            print(f"{r['system']:32} failed: {r.get('error')}")
            continue
        tr = r["wall_s"] / base["wall_s"] if "size_mb" in base else float("nan")
        sr = r["size_mb"] / base["size_mb"] if "size_mb" in base else float("nan")
        print(f"{r['system']:32} {r['wall_s']:7.1f} {r['size_mb']:8.1f} {tr:7.2f} {sr:7.2f}")
    report = {"model": model, "source_sha256": src.sha256, "verify": args.verify, "quick": args.quick,
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version()},
              "results": rows, "ratios_to": base["system"], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"export-{'quick-' if args.quick else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"written: {path}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
