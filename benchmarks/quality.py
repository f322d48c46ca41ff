"""Faithfulness of bundles and their peers against the float source on held-out texts.

    python benchmarks/quality.py BUNDLE [BUNDLE ...] [--tokens 512] [--skip genai] [--skip llama.cpp]

For each system and text: teacher-forced top-1 agreement with the float model (transformers on the source)
and the perplexity ratio system / float, all on the same token ids and through the same arithmetic
(``verify.score_rows``). Texts: the two built-in verification texts, the Apache-2.0 licence text of the OS
(English, heavily memorised by code models, hence the most sensitive) and the source of Python's
``textwrap`` module.

Peers, side by side in the same run (a peer that is missing gets a row saying why, never dropped):
- onnxruntime-genai on its own builder's default int4 build of the same source (built if missing);
- llama.cpp (llama-cpp-python) on the source GGUF itself: the weights the reference was dequantized from,
  so its row measures the harness and llama.cpp's own arithmetic, not a quantization;
- llama.cpp on 4-bit re-quantizations of that GGUF made with llama.cpp's own quantizer (``--requant``,
  default Q4_0 and IQ4_NL: on Qwen2.5-0.5B's 896-wide rows the k-quants fall back to Q5_0, so llama.cpp's
  "Q4_K_M" of this model is mostly 5-bit, and these two are its real 4-bit formats).

Prints a table and writes JSON into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import ensure_genai_default, folder_mb  # noqa: E402 - the sibling benchmark script
# llama.cpp file types offered by --requant (llama.h's LLAMA_FTYPE_MOSTLY_*)
REQUANT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "IQ4_NL": 25}


@dataclass
class System:
    name: str
    kind: str  # edgeqwen | genai | llama.cpp
    size_mb: float
    rows: Callable[[Sequence[int]], Iterable[np.ndarray]]  # teacher-forced rows; row i predicts tokens[i + 1]


def held_out_texts() -> dict[str, str]:
    from edgeqwen.export.verify import builtin_texts

    texts = builtin_texts()
    lic = Path("/usr/share/common-licenses/Apache-2.0")
    if lic.is_file():
        texts["apache-licence"] = lic.read_text()
    texts["py-textwrap"] = inspect.getsource(textwrap)
    return texts


def edgeqwen_system(bundle: Path, threads: int | None) -> tuple[System, object]:
    from edgeqwen import runtime
    from edgeqwen.export.verify import bundle_logits

    model = runtime.load(bundle, threads=threads)
    size = sum(f["size"] for f in model.manifest.files.values()) / 2**20
    name = f"edgeqwen {bundle.name} ({model.manifest.precision})"
    return System(name, "edgeqwen", round(size, 1), lambda toks: bundle_logits(model, toks)), model


def genai_system(folder: Path, threads: int | None, name: str) -> System:
    """onnxruntime-genai, one token per step (its generator returns the last position's logits only)."""
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    if threads:  # its builder writes no thread count, and og.Model then runs one intra-op thread
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(cfg)

    def rows(tokens: Sequence[int]) -> Iterable[np.ndarray]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(tokens) + 8, do_sample=False)
        gen = og.Generator(model, params)
        for t in tokens[:-1]:
            gen.append_tokens([int(t)])
            yield np.array(gen.get_logits(), dtype=np.float32).reshape(-1)

    return System(name, "genai", folder_mb(folder), rows)


def llama_system(gguf: Path, label: str, threads: int | None, n_ctx: int) -> System:
    """llama.cpp with logits for every position, the whole text in one batch."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)

    def rows(tokens: Sequence[int]) -> Iterable[np.ndarray]:
        llm.reset()
        llm.eval([int(t) for t in tokens[:-1]])
        yield from np.array(llm.scores[: len(tokens) - 1], dtype=np.float32)

    return System(f"llama.cpp {label}", "llama.cpp", folder_mb(gguf), rows)


def requantize(gguf: Path, ftype: str, dest: Path, threads: int | None) -> Path:
    """llama.cpp's own quantizer (what ``llama-quantize --allow-requantize`` runs), cached in benchmarks/work."""
    import llama_cpp

    out = dest / f"{gguf.stem}-requant-{ftype}.gguf"
    if out.is_file():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = REQUANT_TYPES[ftype]
    params.allow_requantize = True
    params.nthread = threads or 0
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({ftype}) returned {rc}")
    tmp.rename(out)
    return out


def peers(args, src, n_ctx: int) -> tuple[list[System], dict[str, str]]:
    systems: list[System] = []
    missing: dict[str, str] = {}
    work = HERE / "work"
    genai_name = f"onnxruntime-genai on {args.genai.name}" if args.genai else "onnxruntime-genai default int4"
    if "genai" in args.skip:
        missing[genai_name] = "skipped (--skip genai)"
    else:
        try:
            folder = args.genai
            if folder is None:  # its builder's default int4 output, one build per source model
                folder = work / "genai" / Path(src.hf_dir).name
                folder.parent.mkdir(parents=True, exist_ok=True)
                ensure_genai_default(src.hf_dir, folder)
            systems.append(genai_system(folder, args.threads, genai_name))
        except Exception as e:  # noqa: BLE001 - a missing peer is a row, not a crash
            missing[genai_name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    gguf = args.gguf or src.gguf_path
    labels = ["source GGUF"] + [f"{t} re-quantized" for t in args.requant]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        missing.update({f"llama.cpp {lb}": "not installed (pip install -r benchmarks/requirements.txt)"
                        for lb in labels})
        return systems, missing
    if "llama.cpp" in args.skip or gguf is None:
        why = "skipped (--skip llama.cpp)" if gguf else "no GGUF source (pass --gguf)"
        missing.update({f"llama.cpp {lb}": why for lb in labels})
        return systems, missing
    systems.append(llama_system(Path(gguf), "source GGUF", args.threads, n_ctx))
    for ftype in args.requant:
        try:
            path = requantize(Path(gguf), ftype, work / "requant", args.threads)
            systems.append(llama_system(path, f"{ftype} re-quantized", args.threads, n_ctx))
        except Exception as e:  # noqa: BLE001
            missing[f"llama.cpp {ftype} re-quantized"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return systems, missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--genai", type=Path, help="a folder onnxruntime-genai runs (default: its builder's int4 build "
                    "of the source, built if missing; an edgeqwen bundle works too)")
    ap.add_argument("--gguf", type=Path, help="GGUF for llama.cpp (default: the source GGUF of the first bundle)")
    ap.add_argument("--requant", type=lambda s: [t for t in s.split(",") if t], default=["Q4_0", "IQ4_NL"],
                    help=f"llama.cpp re-quantizations of the GGUF, comma-separated, of {', '.join(REQUANT_TYPES)}"
                         " ('' for none)")
    ap.add_argument("--skip", action="append", default=[], choices=["genai", "llama.cpp"],
                    help="leave a peer out (it still gets a row)")
    args = ap.parse_args()
    bad = [t for t in args.requant if t not in REQUANT_TYPES]
    if bad:
        ap.error(f"--requant: unknown type {bad[0]!r}; choose from {', '.join(REQUANT_TYPES)}")

    from edgeqwen.export.sources import resolve_source
    from edgeqwen.export.verify import Reference, score_rows

    texts = held_out_texts()
    systems, models = [], []
    for bundle in args.bundles:
        system, model = edgeqwen_system(bundle, args.threads)
        systems.append(system)
        models.append(model)
    first_model = models[0]
    spec = first_model.manifest.source["spec"]
    others = [b for b, m in zip(args.bundles, models) if m.manifest.source["spec"] != spec]
    if others:  # one reference and one token sequence per text: every bundle must come from the same model
        other_spec = models[args.bundles.index(others[0])].manifest.source["spec"]
        ap.error(f"{others[0]} was exported from {other_spec!r}, not {spec!r} like {args.bundles[0]}; "
                 "score the bundles of one source model per run")
    src = resolve_source(spec, progress=False)
    more, missing = peers(args, src, n_ctx=args.tokens + 8)
    systems += more
    reference = Reference(src.hf_dir, threads=args.threads)

    results = []
    for text_name, text in texts.items():  # text outer: the reference's rows are computed once per text
        ids = first_model.encode(text)[: args.tokens]  # one token sequence for every system (same vocabulary)
        for system in systems:
            t0 = time.perf_counter()
            s = score_rows(reference, text_name, ids, system.rows(ids))
            results.append({"system": system.name, "kind": system.kind, "size_mb": system.size_mb,
                            "text": text_name, "tokens": s.tokens, "agreement": round(s.agreement, 4),
                            "perplexity": round(s.perplexity, 4),
                            "reference_perplexity": round(s.reference_perplexity, 4), "ratio": round(s.ratio, 4),
                            "seconds": round(time.perf_counter() - t0, 1)})
            r = results[-1]
            print(f"{system.name[:44]:44} {r['size_mb']:7.0f} MiB {text_name:16} agree {r['agreement']:.3f} "
                  f"ppl {r['perplexity']:.3f} / {r['reference_perplexity']:.3f} = ×{r['ratio']:.3f}",
                  file=sys.stderr, flush=True)

    print(table(systems, list(texts), results, missing))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"tokens": args.tokens, "results": results, "missing": missing}, indent=2))
    print(f"written: {path}", file=sys.stderr)
    return 0


def table(systems: list[System], texts: list[str], results: list[dict], missing: dict[str, str]) -> str:
    """Markdown: one row per system, 'ratio (agreement)' per text."""
    cell = {(r["system"], r["text"]): f"×{r['ratio']:.3f} ({100 * r['agreement']:.1f}%)" for r in results}
    lines = ["| system | MiB | " + " | ".join(texts) + " |", "|---" * (len(texts) + 2) + "|"]
    for s in systems:
        lines.append(f"| {s.name} | {s.size_mb:.1f} | " + " | ".join(cell.get((s.name, t), "—") for t in texts) + " |")
    for name, why in missing.items():
        lines.append(f"| {name} | — | {why} |" + " |" * (len(texts) - 1))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
