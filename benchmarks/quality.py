"""Faithfulness of bundles against the float source on held-out texts (not the texts export verifies on).

    python benchmarks/quality.py BUNDLE [BUNDLE ...] [--tokens 512]

For each bundle and text: teacher-forced top-1 agreement with the float model (transformers) and the
perplexity ratio bundle / float. Held-out texts: the Apache-2.0 licence text of the OS (English, heavily
memorised by code models, hence the most sensitive) and the source of Python's ``textwrap`` module, plus the
two built-in verification texts. Prints a table and writes JSON into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def held_out_texts() -> dict[str, str]:
    from edgeqwen.export.verify import builtin_texts

    texts = builtin_texts()
    lic = Path("/usr/share/common-licenses/Apache-2.0")
    if lic.is_file():
        texts["apache-licence"] = lic.read_text()
    texts["py-textwrap"] = inspect.getsource(textwrap)
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from edgeqwen import runtime
    from edgeqwen.export.sources import resolve_source
    from edgeqwen.export.verify import Reference, score

    texts = held_out_texts()
    results = []
    reference = None
    for bundle in args.bundles:
        model = runtime.load(bundle, threads=args.threads)
        source = model.manifest.source["spec"]
        if reference is None:
            reference = Reference(resolve_source(source, progress=False).hf_dir, threads=args.threads)
        size = sum(f["size"] for f in model.manifest.files.values()) / 2**20
        for name, text in texts.items():
            s = score(model, reference, name, model.encode(text)[: args.tokens])
            results.append({"bundle": str(bundle), "precision": model.manifest.precision, "size_mb": round(size, 1),
                            "text": name, "tokens": s.tokens, "agreement": round(s.agreement, 4),
                            "perplexity": round(s.perplexity, 4), "reference_perplexity": round(
                                s.reference_perplexity, 4), "ratio": round(s.ratio, 4)})
            r = results[-1]
            print(f"{bundle.name:28} {r['size_mb']:7.0f} MB {name:16} agree {r['agreement']:.3f} "
                  f"ppl {r['perplexity']:.3f} / {r['reference_perplexity']:.3f} = ×{r['ratio']:.3f}", flush=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"tokens": args.tokens, "results": results}, indent=2))
    print(f"written: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
