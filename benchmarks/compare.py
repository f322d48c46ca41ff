"""Side-by-side speed, memory and size: edgeqwen bundles vs onnxruntime-genai on the same model and machine.

Each measurement runs in a fresh subprocess (so peak RSS is that system's own), systems interleaved
A B A B ... so that machine noise hits all of them alike. Prints a table with ratios to the first edgeqwen
system and writes JSON to benchmarks/results/.

    python benchmarks/compare.py                                  # exports what is missing, then measures
    python benchmarks/compare.py --ours bundles/x --genai path    # explicit folders

Systems: edgeqwen (our bundle, our runtime), onnxruntime-genai running *our* bundle (through its
genai_config.json), and onnxruntime-genai on its own builder's default int4 output from the same source.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = r'''
import json, sys, time
def hwm():
    try:
        for l in open("/proc/self/status"):
            if l.startswith("VmHWM"): return int(l.split()[1]) / 1024
    except OSError: return 0.0
kind, folder, n_prompt, n_new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
text = open(sys.argv[6]).read()
t0 = time.perf_counter()
if kind == "edgeqwen":
    from edgeqwen import runtime
    from edgeqwen.runtime.generate import Stats, StopRule, generate
    from edgeqwen.runtime.sampling import Sampler, SamplingParams
    m = runtime.load(folder, threads=threads)
    load = time.perf_counter() - t0
    ids = m.encode(text)[:n_prompt]
    st = Stats()
    list(generate(m.engine, ids, Sampler(SamplingParams()), StopRule(n_new, frozenset()), st))
    out = {"load_s": load, "ttft_s": st.ttft_s, "decode_tps": st.decode_tps, "prefill_tps": st.prefill_tps}
else:
    import onnxruntime_genai as og
    cfg = og.Config(folder)
    m = og.Model(cfg)
    tok = og.Tokenizer(m)
    load = time.perf_counter() - t0
    ids = tok.encode(text)[:n_prompt]
    p = og.GeneratorParams(m)
    p.set_search_options(max_length=n_prompt + n_new + 8, do_sample=False)
    g = og.Generator(m, p)
    t1 = time.perf_counter()
    g.append_tokens(ids)
    g.generate_next_token()
    ttft = time.perf_counter() - t1
    t2 = time.perf_counter(); n = 0
    while n < n_new - 1 and not g.is_done():
        g.generate_next_token(); n += 1
    dec = n / (time.perf_counter() - t2)
    out = {"load_s": load, "ttft_s": ttft, "decode_tps": dec, "prefill_tps": len(ids) / ttft}
out["peak_rss_mb"] = hwm()
print("RESULT " + json.dumps(out))
'''


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file()) / 2**20, 1)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        from edgeqwen.profiles import detect_host

        h = detect_host()
        info |= {"cpu": h.cpu_model, "isa": list(h.isa), "ram_mb": h.ram_mb}
    except Exception:  # noqa: BLE001 - informative only
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("edgeqwen", "onnxruntime", "onnxruntime-genai"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return info


def run_once(kind: str, folder: Path, args, text_file: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run([sys.executable, "-c", WORKER, kind, str(folder), str(args.prompt_tokens),
                          str(args.new_tokens), str(args.threads), str(text_file)],
                         capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} on {folder} failed:\n{out.stderr[-2000:]}")


def ensure_genai_default(hf_dir: Path, dest: Path) -> Path:
    if not (dest / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "q", "-i", str(hf_dir),
                        "-o", str(dest), "-p", "int4", "-e", "cpu", "-c", str(dest) + ".cache"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", action="append", help="edgeqwen bundle folder (repeatable)")
    ap.add_argument("--genai", help="onnxruntime-genai default int4 build folder (built if missing)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--text", type=Path, help="prompt text (default: a real licence text + Python source)")
    args = ap.parse_args()

    from edgeqwen.catalog import DEFAULT_ALIAS
    from edgeqwen.export.sources import resolve_source

    work = HERE / "work"
    work.mkdir(exist_ok=True)
    src = resolve_source(DEFAULT_ALIAS, progress=False)
    ours = [Path(p) for p in (args.ours or [])]
    if not ours:
        from edgeqwen.export import export

        dest = work / "edgeqwen-int4"
        if not (dest / "edgeqwen.json").is_file():
            export(DEFAULT_ALIAS, "host", dest, force=True, progress=False)
        ours = [dest]
    genai_dir = ensure_genai_default(src.hf_dir, Path(args.genai) if args.genai else work / "genai-int4")
    text_file = args.text or (work / "prompt.txt")
    if not args.text:
        import inspect
        import textwrap

        lic = Path("/usr/share/common-licenses/Apache-2.0")
        text_file.write_text((lic.read_text() if lic.is_file() else "") + inspect.getsource(textwrap))

    systems = [(f"edgeqwen {p.name}", "edgeqwen", p) for p in ours]
    systems += [(f"genai on {ours[0].name}", "genai", ours[0]), ("genai default int4", "genai", genai_dir)]
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in systems}
    for r in range(args.runs):
        for name, kind, folder in systems:  # interleaved: A B C A B C ...
            try:
                samples[name].append(run_once(kind, folder, args, text_file))
            except RuntimeError as e:
                print(f"  {name}: {str(e).splitlines()[0]}", file=sys.stderr)
            print(f"run {r + 1}/{args.runs} {name}: {samples[name][-1] if samples[name] else 'failed'}",
                  file=sys.stderr)

    rows = []
    for name, kind, folder in systems:
        s = samples[name]
        if not s:
            rows.append({"system": name, "error": "failed"})
            continue
        med = {k: statistics.median(x[k] for x in s) for k in s[0]}
        rows.append({"system": name, "size_mb": folder_mb(folder), **{k: round(v, 3) for k, v in med.items()},
                     "decode_tps_min": round(min(x["decode_tps"] for x in s), 2),
                     "decode_tps_max": round(max(x["decode_tps"] for x in s), 2)})
    base = next(r for r in rows if "error" not in r)
    print(f"\n{'system':34} {'size MB':>8} {'load s':>7} {'TTFT s':>7} {'prefill t/s':>11} {'decode t/s':>10} "
          f"{'RSS MB':>7} {'decode ×':>8} {'TTFT ×':>7} {'RSS ×':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['system']:34} failed")
            continue
        print(f"{r['system']:34} {r['size_mb']:8.0f} {r['load_s']:7.2f} {r['ttft_s']:7.2f} {r['prefill_tps']:11.1f} "
              f"{r['decode_tps']:10.1f} {r['peak_rss_mb']:7.0f} {r['decode_tps'] / base['decode_tps']:8.2f} "
              f"{r['ttft_s'] / base['ttft_s']:7.2f} {r['peak_rss_mb'] / base['peak_rss_mb']:6.2f}")
    report = {"machine": machine(), "settings": vars(args) | {"text": str(text_file)}, "results": rows,
              "ratios_to": base["system"], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    print(f"\nwritten: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
