"""Float HF folder -> float ONNX graph.

The ``fast`` backend uses onnxruntime-genai's model builder, which writes the contrib-op graph the CPU/CUDA
kernels are tuned for: GroupQueryAttention with fused rotary embedding and a KV buffer shared between past
and present, SkipSimplifiedLayerNormalization, packed QKV, and (``prune_lm_head``) logits for the last
position only. We ask it for a *float* graph and quantize ourselves (``quantize.py``): its int4 path is RTN
and keeps the untied embedding in fp32, which is what we set out to fix. Olive's ModelBuilder pass wraps the
same builder but fails with onnxruntime-genai 0.18 (``No module named ...quantized_model``), so we call the
builder directly — the manifest records that.

The builder runs in a subprocess: it loads the whole torch model, and its memory should be gone before we
quantize. Its chatty progress output goes to a log file, whose tail is shown if it fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError

BUILDER_EP = {"cpu": "cpu", "cuda": "cuda", "dml": "dml", "webgpu": "webgpu"}


@dataclass
class GraphBuild:
    folder: Path
    backend: str
    builder: str
    seconds: float


def builder_version() -> str:
    try:
        from importlib.metadata import version

        return f"onnxruntime-genai {version('onnxruntime-genai')} model builder"
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "onnxruntime-genai model builder"


def build_fast_graph(hf_dir: Path, work: Path, *, provider: str, io_dtype: str, shared_embeddings: bool = False,
                     log=None) -> GraphBuild:
    """Run the builder for a float graph of ``hf_dir`` into ``work``."""
    ep = BUILDER_EP.get(provider)
    if ep is None:
        raise ExportError(f"The fast backend has no graph for provider {provider!r}.",
                          "use a profile whose first provider is cpu, cuda, dml or webgpu, or the portable backend.")
    precision = "fp16" if io_dtype == "fp16" else "fp32"
    work.mkdir(parents=True, exist_ok=True)
    cache = work / ".builder-cache"
    logfile = work / "builder.log"
    extra = ["prune_lm_head=true", f"shared_embeddings={'true' if shared_embeddings else 'false'}"]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "edgeqwen-source", "-i", str(hf_dir),
           "-o", str(work), "-p", precision, "-e", ep, "-c", str(cache), "--extra_options", *extra]
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not (work / "model.onnx").is_file():
        tail = logfile.read_text(errors="replace")[-2000:]
        raise ExportError(f"onnxruntime-genai's model builder failed (exit {proc.returncode}). Last output:\n{tail}",
                          "check that onnxruntime-genai is installed (pip install 'edgeqwen[export]') and the "
                          "source folder holds a complete Qwen2/Qwen3 checkpoint.")
    return GraphBuild(folder=work, backend="fast", builder=builder_version(), seconds=time.perf_counter() - t0)


def adjust_genai_config(path: Path, *, context: int, generation: dict, provider: str, threads: int) -> None:
    """Make the builder's genai_config.json match the bundle: context, sampling defaults, provider.

    onnxruntime-genai allocates its KV cache for ``search.max_length``: leaving the model's 32,768 there would
    cost ~805 MB for the 0.5B in fp32 before the first token, so it gets the bundle's context instead.
    """
    cfg = json.loads(path.read_text())
    cfg["model"]["context_length"] = context
    search = cfg.setdefault("search", {})
    search["max_length"] = context
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "do_sample"):
        if key in generation:
            search[key] = generation[key]
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if threads:
        opts["intra_op_num_threads"] = threads
    if provider != "cpu":
        opts["provider_options"] = [{provider: {}}]
    path.write_text(json.dumps(cfg, indent=4))
