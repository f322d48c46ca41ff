"""Side-by-side speed, memory and size: edgeqwen bundles vs onnxruntime-genai on the same model and machine.

Each measurement runs in a fresh subprocess (so peak RSS is that system's own), systems interleaved
A B A B ... so that machine noise hits all of them alike. Prints a table with ratios to the first edgeqwen
system and writes JSON to benchmarks/results/.

    python benchmarks/compare.py                                  # exports what is missing, then measures
    python benchmarks/compare.py --ours bundles/x --genai path    # explicit folders

The first edgeqwen row decodes one token per step (``lookup=0``): the loop against the C++ loops. The
"+ lookup" row is the runtime's default, prompt lookup (``runtime/lookup.py``), whose gain depends on how
much the answer repeats earlier text: little on the default licence continuation, much on a code edit
(``--text benchmarks/code_edit_prompt.txt --new-tokens 100``: a chat prompt asking to edit a function).
``--sampled`` adds two rows that sample as the runtime does by default (the bundle's generation config:
temperature, top-k, top-p, repetition penalty; fixed seed), ours and genai's default build, one token a step.

Systems: edgeqwen (our bundle, our runtime), onnxruntime-genai running *our* bundle (through its
genai_config.json), onnxruntime-genai on its own builder's default int4 output from the same source (with
``max_length`` = prompt + answer, its best case and the goals' baseline, and again with its default
``max_length``, which sizes the KV cache for the model's whole context), llama.cpp (llama-cpp-python) on the
source GGUF itself (Q4_K_M), and Optimum's ORTModelForCausalLM on its own fp32 export (run with the pinned
Optimum tool folder the portable backend uses). A peer that is not installed gets a row saying so; rows are
never dropped.

Also: a streaming-read bandwidth probe (``bandwidth.py``) and the weight bytes each system reads per
decoded token, so every decode figure is shown as a fraction of the bandwidth ceiling; a PNG chart is
written next to the JSON when matplotlib is installed. ``--quick`` runs the whole harness on the tests'
tiny model (CI smoke run; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
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
sampling = json.loads(sys.argv[7])  # the "-sampled" kinds: temperature, top_k, top_p, repetition_penalty
t0 = time.perf_counter()
if kind in ("edgeqwen", "edgeqwen-lookup", "edgeqwen-sampled"):
    from edgeqwen import runtime
    from edgeqwen.runtime.lookup import DEFAULT_MAX_DRAFT
    from edgeqwen.runtime.generate import Stats, StopRule, generate
    from edgeqwen.runtime.sampling import Sampler, SamplingParams
    m = runtime.load(folder, threads=threads)
    load = time.perf_counter() - t0
    ids = m.encode(text)[:n_prompt]
    st = Stats()
    lookup = min(DEFAULT_MAX_DRAFT, m.max_lookup) if kind == "edgeqwen-lookup" else 0
    params = SamplingParams(**sampling, seed=0) if kind == "edgeqwen-sampled" else SamplingParams()
    list(generate(m.engine, ids, Sampler(params), StopRule(n_new, frozenset()), st, lookup=lookup))
    out = {"load_s": load, "ttft_s": st.ttft_s, "decode_tps": st.decode_tps, "prefill_tps": st.prefill_tps}
    if kind == "edgeqwen-lookup":  # 0 drafted on bundles exported before the logits window (max_lookup 0)
        out["lookup_accepted"] = st.accepted_tokens / max(st.drafted_tokens, 1)
elif kind == "llama.cpp":
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=folder, n_ctx=n_prompt + n_new + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    load = time.perf_counter() - t0
    ids = llm.tokenize(text.encode(), add_bos=False)[:n_prompt]
    n_vocab = llm.n_vocab()
    def last_logits():  # the context's own buffer: Llama.scores is only filled with logits_all=True
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
    t1 = time.perf_counter()
    llm.eval(ids)
    tok = int(np.argmax(last_logits()))
    ttft = time.perf_counter() - t1
    t2 = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    dec = (n_new - 1) / (time.perf_counter() - t2)
    out = {"load_s": load, "ttft_s": ttft, "decode_tps": dec, "prefill_tps": len(ids) / ttft}
elif kind == "optimum":
    import onnxruntime as ort, torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer
    torch.set_num_threads(threads)
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    m = ORTModelForCausalLM.from_pretrained(folder, session_options=so, provider="CPUExecutionProvider")
    tok = AutoTokenizer.from_pretrained(folder)
    load = time.perf_counter() - t0
    ids = torch.tensor([tok(text).input_ids[:n_prompt]])
    kw = dict(do_sample=False, pad_token_id=0)
    t1 = time.perf_counter(); m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw); ttft = time.perf_counter() - t1
    t2 = time.perf_counter(); m.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
    full = time.perf_counter() - t2
    out = {"load_s": load, "ttft_s": ttft, "decode_tps": (n_new - 1) / max(full - ttft, 1e-9),
           "prefill_tps": ids.shape[1] / ttft}
else:
    import onnxruntime_genai as og
    cfg = og.Config(folder)
    # the same thread count as every other system: without it onnxruntime-genai runs its session with
    # ONE intra-op thread (its builder writes no intra_op_num_threads), which halved its decode speed here
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    m = og.Model(cfg)
    tok = og.Tokenizer(m)
    load = time.perf_counter() - t0
    ids = tok.encode(text)[:n_prompt]
    p = og.GeneratorParams(m)
    if kind == "genai-maxlen":  # what a caller gets without max_length: the KV cache sized for the whole context
        p.set_search_options(do_sample=False)
    elif kind == "genai-sampled":  # min_length: no early end of text, so both sampled rows decode n_new tokens
        p.set_search_options(max_length=n_prompt + n_new + 8, min_length=n_prompt + n_new, do_sample=True,
                             random_seed=0, **sampling)
    else:
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
    """MiB of a model folder's files, or of one model file (a GGUF)."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else [p for p in folder.iterdir() if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        from edgeqwen.hostinfo import detect_host

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
    if kind == "optimum":  # transformers 4.57 + optimum from the pinned tool folder, first on the path
        from edgeqwen.export.graph import optimum_tool_dir

        env["PYTHONPATH"] = os.pathsep.join([str(optimum_tool_dir(progress=False)), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", WORKER, kind, str(folder), str(args.prompt_tokens),
                          str(args.new_tokens), str(args.threads), str(text_file), json.dumps(getattr(args, "sampling", {}))],
                         capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} on {folder} failed: {exit_reason(out.returncode)}\n{out.stderr[-2000:]}")


def exit_reason(returncode: int) -> str:
    """A worker's exit status in words: a peer built for an instruction this CPU lacks dies of SIGILL with
    nothing on stderr, and the table should say so rather than print an empty error."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if name == "SIGILL":
        return ("killed by SIGILL (illegal instruction: built for a CPU feature this machine lacks; "
                "rebuild it here, e.g. `make bench`)")
    return f"killed by {name}"


def ensure_genai_default(hf_dir: Path, dest: Path) -> Path:
    if not (dest / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "q", "-i", str(hf_dir),
                        "-o", str(dest), "-p", "int4", "-e", "cpu", "-c", str(dest) + ".cache"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dest


def ensure_optimum_export(hf_dir: Path, dest: Path) -> Path:
    """Optimum's own fp32 export (what ORTModelForCausalLM users run), through the pinned tool folder."""
    if not (dest / "model.onnx").is_file():
        from edgeqwen.export.graph import optimum_tool_dir

        import edgeqwen.export as ex

        worker = Path(ex.__file__).with_name("_optimum_worker.py")
        env = dict(os.environ, PYTHONPATH=str(optimum_tool_dir(progress=False)), HF_HUB_OFFLINE="1")
        subprocess.run([sys.executable, str(worker), str(hf_dir), str(dest)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dest


def bytes_per_token(kind: str, folder: Path) -> int | None:
    """Weight bytes one decode step reads (for the bandwidth ceiling)."""
    from bandwidth import weight_bytes_per_token

    if kind == "edgeqwen-lookup":  # several tokens per read of the weights: no per-token ceiling
        return None
    try:
        if kind == "llama.cpp":
            from gguf import GGUFReader

            tensors = GGUFReader(str(folder)).tensors
            total = sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight")
            emb = next((t for t in tensors if t.name == "token_embd.weight"), None)
            return total + (int(emb.n_bytes) // int(emb.shape[-1]) if emb is not None else 0)
        return weight_bytes_per_token(folder)
    except Exception:  # noqa: BLE001 - a missing figure, not a failed benchmark
        return None


def chart(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import textwrap

    ok = [r for r in rows if "decode_tps" in r]
    names = [textwrap.fill(r["system"], 18) for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    for ax, key, title in zip(axes, ("decode_tps", "ttft_s", "peak_rss_mb"),
                              ("decode tokens/s (higher is better)", "TTFT, 512-token prompt, s (lower is better)",
                               "peak RSS, MB (lower is better)")):
        ax.bar(range(len(ok)), [r[key] for r in ok], color=["#2a7" if r["system"].startswith("edgeqwen") else "#999"
                                                            for r in ok])
        ax.set_xticks(range(len(ok)), names, fontsize=7, rotation=35, ha="right")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", action="append", help="edgeqwen bundle folder (repeatable)")
    ap.add_argument("--genai", help="onnxruntime-genai default int4 build folder (built if missing)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--text", type=Path, help="prompt text (default: a real licence text + Python source)")
    ap.add_argument("--gguf", type=Path, help="GGUF for llama.cpp (default: the source GGUF of the default model)")
    ap.add_argument("--skip", action="append", default=[], choices=["llama.cpp", "optimum"],
                    help="leave a peer out (it still gets a row)")
    ap.add_argument("--sampled", action="store_true",
                    help="add rows that sample as the runtime does by default (our bundle's generation config: "
                         "temperature, top-k, top-p, repetition penalty), for us and genai's default, one token "
                         "per step")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 1 run, short prompt (CI smoke run)")
    args = ap.parse_args()
    args.sampling = {}
    sys.path.insert(0, str(HERE))

    from edgeqwen.catalog import DEFAULT_ALIAS
    from edgeqwen.export.sources import resolve_source

    work = HERE / "work" / ("quick" if args.quick else "")
    work.mkdir(parents=True, exist_ok=True)
    model = DEFAULT_ALIAS
    if args.quick:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from conftest import tiny_model  # noqa: PLC0415 - the tests' tiny model builder

        model = str(tiny_model("qwen2_untied"))
        os.environ["EDGEQWEN_ALLOW_ANY_SIZE"] = "1"
        args.runs, args.prompt_tokens, args.new_tokens = 1, min(args.prompt_tokens, 64), min(args.new_tokens, 16)
    src = resolve_source(model, progress=False)
    ours = [Path(p) for p in (args.ours or [])]
    if not ours:
        from edgeqwen.export import export

        dest = work / "edgeqwen-int4"
        manifest = dest / "edgeqwen.json"
        stale = not manifest.is_file() or json.loads(manifest.read_text())["io"].get("logits_window", 1) < 2
        if stale:  # missing, or exported before the logits window (no prompt lookup, no model.genai.onnx)
            export(model, "host", dest, force=True, progress=False, verify=False)
        ours = [dest]
    genai_dir = ensure_genai_default(src.hf_dir, Path(args.genai) if args.genai else work / "genai-int4")
    text_file = args.text or (work / "prompt.txt")
    if not args.text:
        import inspect
        import textwrap

        lic = Path("/usr/share/common-licenses/Apache-2.0")
        text_file.write_text((lic.read_text() if lic.is_file() else "") + inspect.getsource(textwrap))

    systems = [(f"edgeqwen {p.name}", "edgeqwen", p) for p in ours]
    # the same bundle with prompt lookup (runtime/lookup.py, on by default in the runtime): greedy, so the
    # same text up to kernel rounding, with drafted tokens checked in one run
    systems.insert(1, (f"edgeqwen {ours[0].name} + lookup", "edgeqwen-lookup", ours[0]))
    if args.sampled:
        generation = json.loads((ours[0] / "generation_config.json").read_text())
        # Qwen's published settings where the bundle has none (the tests' tiny model)
        args.sampling = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
        args.sampling |= {k: generation[k] for k in args.sampling if k in generation}
        systems.insert(2, (f"edgeqwen {ours[0].name}, sampled", "edgeqwen-sampled", ours[0]))
        systems.append(("genai default int4, sampled", "genai-sampled", genai_dir))
    systems += [(f"genai on {ours[0].name}", "genai", ours[0]), ("genai default int4", "genai", genai_dir),
                # the same build with its default max_length (the model's context): the goals compare against
                # the row above (max_length = prompt + answer, its best case); this row is what callers get
                # unless they size the cache themselves
                ("genai default int4, default max_length", "genai-maxlen", genai_dir)]
    missing: dict[str, str] = {}
    gguf = args.gguf or src.gguf_path
    try:
        import llama_cpp  # noqa: F401

        has_llama = True
    except ImportError:
        has_llama = False
    if "llama.cpp" in args.skip:
        missing["llama.cpp Q4_K_M (source GGUF)"] = "skipped (--skip llama.cpp)"
    elif not has_llama:
        missing["llama.cpp Q4_K_M (source GGUF)"] = "not installed (pip install -r benchmarks/requirements.txt)"
    elif gguf is None:
        missing["llama.cpp Q4_K_M (source GGUF)"] = "no GGUF source (pass --gguf)"
    else:
        systems.append(("llama.cpp Q4_K_M (source GGUF)", "llama.cpp", Path(gguf)))
    if "optimum" in args.skip:
        missing["optimum ORTModelForCausalLM fp32"] = "skipped (--skip optimum)"
    else:
        try:
            systems.append(("optimum ORTModelForCausalLM fp32", "optimum",
                            ensure_optimum_export(src.hf_dir, work / "optimum-fp32")))
        except (subprocess.CalledProcessError, Exception) as e:  # noqa: BLE001 - reported as a row
            missing["optimum ORTModelForCausalLM fp32"] = f"export failed: {str(e).splitlines()[0][:120]}"
    from bandwidth import read_bandwidth_gbs

    bandwidth = read_bandwidth_gbs(threads=args.threads)
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in systems}
    errors: dict[str, str] = {}
    for r in range(args.runs):
        for name, kind, folder in systems:  # interleaved: A B C A B C ...
            try:
                samples[name].append(run_once(kind, folder, args, text_file))
            except RuntimeError as e:
                errors[name] = str(e).splitlines()[0]
                print(f"  {name}: {errors[name]}", file=sys.stderr)
            print(f"run {r + 1}/{args.runs} {name}: {samples[name][-1] if samples[name] else 'failed'}",
                  file=sys.stderr)

    rows = []
    for name, kind, folder in systems:
        s = samples[name]
        if not s:
            rows.append({"system": name, "error": errors.get(name, "failed")})
            continue
        med = {k: statistics.median(x[k] for x in s) for k in s[0]}
        size = folder_mb(folder)
        row = {"system": name, "size_mb": size, **{k: round(v, 3) for k, v in med.items()},
               "decode_tps_min": round(min(x["decode_tps"] for x in s), 2),
               "decode_tps_max": round(max(x["decode_tps"] for x in s), 2)}
        per_token = bytes_per_token(kind, folder)
        if per_token:
            row["weight_mb_per_token"] = round(per_token / 2**20, 1)
            row["fraction_of_bandwidth"] = round(row["decode_tps"] * per_token / (bandwidth * 1e9), 3)
        rows.append(row)
    rows += [{"system": name, "error": why} for name, why in missing.items()]
    base = next(r for r in rows if "error" not in r)
    print(f"\n{'system':36} {'size MB':>8} {'load s':>7} {'TTFT s':>7} {'prefill t/s':>11} {'decode t/s':>10} "
          f"{'RSS MB':>7} {'decode ×':>8} {'TTFT ×':>7} {'RSS ×':>6} {'% of BW':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['system']:36} {r['error']}")
            continue
        bw = f"{r['fraction_of_bandwidth']:.0%}" if "fraction_of_bandwidth" in r else "-"
        print(f"{r['system']:36} {r['size_mb']:8.0f} {r['load_s']:7.2f} {r['ttft_s']:7.2f} {r['prefill_tps']:11.1f} "
              f"{r['decode_tps']:10.1f} {r['peak_rss_mb']:7.0f} {r['decode_tps'] / base['decode_tps']:8.2f} "
              f"{r['ttft_s'] / base['ttft_s']:7.2f} {r['peak_rss_mb'] / base['peak_rss_mb']:6.2f} {bw:>7}")
    print(f"streaming read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads)")
    report = {"machine": machine() | {"read_bandwidth_gbs": round(bandwidth, 2)},
              "settings": vars(args) | {"text": str(text_file)}, "results": rows,
              "ratios_to": base["system"], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stem = f"compare-{'quick-' if args.quick else ''}{time.strftime('%Y%m%d-%H%M%S')}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    if chart(rows, out_dir / f"{stem}.png"):
        print(f"chart: {out_dir / (stem + '.png')}", file=sys.stderr)
    print(f"\nwritten: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
