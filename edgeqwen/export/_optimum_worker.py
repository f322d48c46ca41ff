"""Runs Optimum's ONNX exporter in its own interpreter, with the pinned tool folder first on sys.path.

optimum-onnx 0.1 needs transformers < 4.58, while the rest of the export (onnxruntime-genai's builder,
GGUF loading) runs on transformers 5. This script is started as a *file*, not as ``edgeqwen.export...``,
so it imports nothing from the main environment's transformers: only the standard library and the
pinned Optimum stack. Usage: ``python _optimum_worker.py HF_DIR OUT_DIR``.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def staged_source(src: Path) -> Path:
    """A view of ``src`` whose config.json older transformers reads correctly.

    transformers 5 writes RoPE settings as ``rope_parameters``; 4.57 reads ``rope_theta`` and would
    silently fall back to 10,000 (Qwen2.5 uses 1,000,000): every position would be rotated wrongly.
    """
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None)
    if isinstance(rope, dict):
        cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    stage = Path(tempfile.mkdtemp(prefix="edgeqwen-optimum-src-"))
    for p in src.iterdir():
        if p.name != "config.json":
            os.symlink(p.resolve(), stage / p.name)
    (stage / "config.json").write_text(json.dumps(cfg, indent=2))
    return stage


def main() -> int:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    from optimum.exporters.onnx import main_export

    stage = staged_source(src)
    try:
        # No validation here: the bundle is verified against the float model after quantization anyway.
        main_export(str(stage), output=str(out), task="text-generation-with-past", device="cpu",
                    dtype="fp32", do_validation=False, local_files_only=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
