"""Float HF folder -> float ONNX graph.

The ``fast`` backend uses onnxruntime-genai's model builder, which writes the contrib-op graph the CPU/CUDA
kernels are tuned for: GroupQueryAttention with fused rotary embedding and a KV buffer shared between past
and present, SkipSimplifiedLayerNormalization, packed QKV, and (``prune_lm_head``, widened by ``window_logits``) logits
for the last position only. We ask it for a *float* graph and quantize ourselves (``quantize.py``): its int4 path is RTN
and keeps the untied embedding in fp32, which is what we set out to fix. Olive's ModelBuilder pass wraps the
same builder but fails with onnxruntime-genai 0.18 (``No module named ...quantized_model``), so we call the
builder directly — the manifest records that.

The ``portable`` backend (CoreML, NNAPI, XNNPACK: providers without those contrib ops) uses Optimum's
exporter, which writes standard ONNX ops with ``past_key_values.*`` inputs and ``present.*`` outputs.
optimum-onnx 0.1 pins transformers < 4.58 while the rest of the export needs transformers 5, so it runs in
its own interpreter with a pinned tool folder (``OPTIMUM_PINS``, installed once under edgeqwen's cache)
placed first on ``sys.path``. Its graph computes logits for every position; ``window_logits`` cuts both
graphs to the last one, or the last few for short runs.

Both builders run in a subprocess: they load the whole torch model, and its memory should be gone before
we quantize. Their chatty progress output goes to a log file, whose tail is shown if they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError

# The Optimum stack for the portable backend, installed with --no-deps into its own folder: everything
# else it imports (torch, numpy, onnx, safetensors, ...) comes from the main environment.
OPTIMUM_PINS = ("optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "huggingface_hub==0.36.0",
                "tokenizers==0.22.1")

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
    import onnx

    model = onnx.load(str(work / "model.onnx"), load_external_data=False)
    window_logits(model)
    trim_last_layer(model)
    onnx.save_model(model, str(work / "model.onnx"))  # the weights stay in the builder's data file
    return GraphBuild(folder=work, backend="fast", builder=builder_version(), seconds=time.perf_counter() - t0)


GENAI_GRAPH = "model.genai.onnx"


def write_genai_graph(folder: Path) -> None:
    """Write ``model.genai.onnx``: the bundle's graph with logits for the last position only, for
    onnxruntime-genai. Same weights (it reads ``model.onnx.data``), 0.2 MB of graph.

    onnxruntime-genai sizes its logits buffer from the graph's declared output shape: a fixed 1 means one row,
    a symbolic length means one row per input token, which ``window_logits``' graph does not give for a
    512-token prompt (onnxruntime then refuses the run). Setting the window to 0 makes every run return the
    last row, so the output can be declared ``[batch, 1, vocab]`` again.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    limit = next((t for t in model.graph.initializer if t.name == "edgeqwen.logits_window.limit"), None)
    if limit is None:
        raise ExportError("The quantized graph lost its logits window (edgeqwen.logits_window.limit).",
                          "report this: graph.window_logits and quantize.py disagree.")
    limit.CopyFrom(numpy_helper.from_array(np.array([0], np.int64), limit.name))
    _declare_logits_rows(model, 1)
    onnx.save_model(model, str(folder / GENAI_GRAPH))


def adjust_genai_config(path: Path, *, context: int, generation: dict, provider: str, threads: int) -> None:
    """Make the builder's genai_config.json match the bundle: context, sampling defaults, provider, and the
    last-position graph variant (``write_genai_graph``).

    onnxruntime-genai allocates its KV cache for ``search.max_length``: leaving the model's 32,768 there would
    cost ~805 MB for the 0.5B in fp32 before the first token, so it gets the bundle's context instead.
    """
    cfg = json.loads(path.read_text())
    cfg["model"]["context_length"] = context
    cfg["model"]["decoder"]["filename"] = GENAI_GRAPH
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


def optimum_tool_dir(progress: bool = True) -> Path:
    """The folder holding ``OPTIMUM_PINS``; installed on first use (a few seconds from PyPI).

    ``EDGEQWEN_OPTIMUM_DIR`` points at a folder prepared by hand (e.g. on a machine without PyPI access:
    ``pip install --no-deps --target DIR <the pins>``).
    """
    configured = os.environ.get("EDGEQWEN_OPTIMUM_DIR", "").strip()
    if configured:
        folder = Path(configured).expanduser()
        if not (folder / "optimum").is_dir():
            raise ExportError(f"EDGEQWEN_OPTIMUM_DIR={folder} does not contain the optimum package.",
                              "pip install --no-deps --target DIR " + " ".join(OPTIMUM_PINS))
        return folder
    from ..catalog import edgeqwen_home

    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    folder = edgeqwen_home() / "tools" / f"{OPTIMUM_PINS[0].replace('==', '-')}-{tag}"
    if (folder / ".complete").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"      installing the portable exporter's tools into {folder} (once)", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(tmp), *OPTIMUM_PINS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError("Could not install Optimum's exporter for the portable backend: "
                          f"{(proc.stderr or proc.stdout).strip()[-800:]}",
                          "check access to PyPI, or prepare a folder with `pip install --no-deps --target DIR "
                          + " ".join(OPTIMUM_PINS) + "` and set EDGEQWEN_OPTIMUM_DIR=DIR.")
    (tmp / ".complete").write_text("\n".join(OPTIMUM_PINS) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def build_portable_graph(hf_dir: Path, work: Path, *, progress: bool = True) -> GraphBuild:
    """Optimum's standard-op export of ``hf_dir`` into ``work/model.onnx``, logits cut to ``window_logits``."""
    import onnx

    tools = optimum_tool_dir(progress)
    raw = work / "optimum"
    raw.mkdir(parents=True, exist_ok=True)
    logfile = work / "optimum.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    worker = Path(__file__).with_name("_optimum_worker.py")
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.run([sys.executable, str(worker), str(hf_dir), str(raw)], stdout=f,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not (raw / "model.onnx").is_file():
        tail = logfile.read_text(errors="replace")[-2000:]
        raise ExportError(f"Optimum's ONNX exporter failed (exit {proc.returncode}). Last output:\n{tail}",
                          "check that the source folder holds a complete Qwen2/Qwen3 checkpoint; delete "
                          f"{tools} to reinstall the exporter's tools.")
    model = onnx.load(str(raw / "model.onnx"), load_external_data=False)
    window_logits(model)
    # Keep the weights where Optimum wrote them: the quantizer reads them from there with np.memmap.
    onnx.save_model(model, str(raw / "model.onnx"))
    builder = f"{OPTIMUM_PINS[0]} exporter (standard ops), in a pinned tool folder"
    return GraphBuild(folder=raw, backend="portable", builder=builder, seconds=time.perf_counter() - t0)


# Runs of up to this many tokens get logits for every position; longer ones (prefill chunks) only for the
# last. The decode loop's prompt lookup (runtime/lookup.py) verifies a few drafted tokens in one run and needs
# a row for each; a prefill chunk needs one row, not 128 x 151,936 logits.
LOGITS_WINDOW = 8


def window_logits(model, window: int = LOGITS_WINDOW) -> None:
    """Make ``logits`` cover the last ``n`` positions of a run of ``n`` tokens when ``n <= window``, else
    the last position only (``[batch, n or 1, vocab]``).

    Both builders' graphs arrive computing more than that: Optimum's applies lm_head to every position (a
    512-token prompt would cost 311 MB of fp32 logits the loop throws away), and onnxruntime-genai's
    ``prune_lm_head`` keeps exactly one (a Gather of position -1), which leaves nothing to check drafted
    tokens against. A Slice of the hidden states before the lm_head MatMul, whose start is computed from
    the run's length, serves both: ``-n`` when ``n <= window``, else ``-1``.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    head = producers.get("logits")
    while head is not None and head.op_type == "Cast":  # fp16 graphs may cast the logits
        head = producers.get(head.input[0])
    if head is None or head.op_type != "MatMul":
        raise ExportError("The exported graph has no MatMul producing 'logits'; the graph builder's output changed.",
                          "report this with the onnxruntime-genai / optimum-onnx versions; pin the documented ones.")
    hidden, dropped = head.input[0], []
    unsqueeze = producers.get(hidden)
    if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" and "prune" in unsqueeze.name:
        gather = producers.get(unsqueeze.input[0])  # the builder's prune_lm_head: Gather(hidden, -1) + Unsqueeze
        if gather is None or gather.op_type != "Gather":
            raise ExportError(f"Unexpected lm_head pruning in the builder's graph ({unsqueeze.name}).",
                              "report this with the onnxruntime-genai version; pin the documented one.")
        hidden, dropped = gather.input[0], [gather, unsqueeze]
    p = "edgeqwen.logits_window"
    consts = {f"{p}.{k}": np.array([v], np.int64) for k, v in (
        ("limit", window), ("one", 1), ("ends", np.iinfo(np.int64).max), ("axes", 1))}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    nodes = [
        helper.make_node("Shape", [_input_ids(graph)], [f"{p}/shape"], name=f"{p}/Shape", start=1, end=2),
        helper.make_node("LessOrEqual", [f"{p}/shape", f"{p}.limit"], [f"{p}/all"], name=f"{p}/LessOrEqual"),
        helper.make_node("Where", [f"{p}/all", f"{p}/shape", f"{p}.one"], [f"{p}/count"], name=f"{p}/Where"),
        helper.make_node("Neg", [f"{p}/count"], [f"{p}/starts"], name=f"{p}/Neg"),
        helper.make_node("Slice", [hidden, f"{p}/starts", f"{p}.ends", f"{p}.axes"], [f"{p}/hidden"],
                         name=f"{p}/Slice"),
    ]
    head.input[0] = f"{p}/hidden"
    gone = {o for n in dropped for o in n.output}  # their shapes said "one position"
    infos = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    kept = [n for n in graph.node if n not in dropped]
    at = kept.index(head)
    del graph.node[:]
    graph.node.extend(kept[:at] + nodes + kept[at:])
    _declare_logits_rows(model, "logits_length")


def _input_ids(graph) -> str:
    """The run's token input: its length is the run's, so the window's start does not wait for the hidden states."""
    if not any(i.name == "input_ids" for i in graph.input):
        raise ExportError("The exported graph has no 'input_ids' input; the graph builder's output changed.",
                          "report this with the onnxruntime-genai / optimum-onnx versions; pin the documented ones.")
    return "input_ids"


def trim_last_layer(model) -> bool:
    """Run the last layer's o_proj and MLP on the logits window's rows only, not on every prompt position.

    The last layer must still attend over the whole run (its keys and values go into the cache), but what
    follows its attention feeds only the logits, and ``window_logits`` keeps one row of a prefill chunk. So the
    attention output and the residual stream are sliced right after GroupQueryAttention with the window's
    own start, and ``window_logits``' later Slice sees rows it already has. This is 1/24 of a prefill's
    matmul work on the 0.5B (TTFT 1.34 -> 1.29 s at ~500 tokens); decode runs are one row either way.

    Matches the builder's layout (GroupQueryAttention -> o_proj -> SkipSimplifiedLayerNormalization ->
    MLP -> final SkipSimplifiedLayerNormalization -> window Slice); returns False and leaves the graph
    as it is for any other (Optimum's portable graph).
    """
    from onnx import helper

    graph = model.graph
    p = "edgeqwen.logits_window"
    producers = {o: n for n in graph.node for o in n.output}
    window = next((n for n in graph.node if n.name == f"{p}/Slice"), None)
    final = producers.get(window.input[0]) if window is not None else None
    post = producers.get(final.input[0]) if final is not None else None
    if final is None or post is None or "SkipSimplifiedLayerNormalization" not in (final.op_type, post.op_type) \
            or final.op_type != post.op_type or final.input[0] not in post.output[3:4]:
        return False
    o_proj = producers.get(post.input[1])
    attention = producers.get(o_proj.input[0]) if o_proj is not None else None
    if attention is None or attention.op_type != "GroupQueryAttention":
        return False
    attn_out, residual = o_proj.input[0], post.input[0]
    rows = [f"{p}/starts", f"{p}.ends", f"{p}.axes"]
    slices = [helper.make_node("Slice", [attn_out, *rows], [f"{p}/attention"], name=f"{p}/SliceAttention"),
              helper.make_node("Slice", [residual, *rows], [f"{p}/residual"], name=f"{p}/SliceResidual")]
    for node in graph.node:
        if node.name != attention.name:
            node.input[:] = [f"{p}/attention" if x == attn_out else x for x in node.input]
    post.input[0] = f"{p}/residual"
    nodes = list(graph.node)
    starts = {n.name for n in nodes if n.name.startswith(f"{p}/") and n.name != window.name}  # from input_ids
    rest = [n for n in nodes if n.name not in starts]
    at = next(i for i, n in enumerate(rest) if n.name == attention.name) + 1
    del graph.node[:]
    graph.node.extend([n for n in nodes if n.name in starts] + rest[:at] + slices + rest[at:])
    downstream = {f"{p}/attention", f"{p}/residual"}  # their declared shapes said "every position"
    for node in rest[at:]:
        if any(x in downstream for x in node.input):
            downstream.update(node.output)
    infos = [v for v in graph.value_info if v.name not in downstream]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return True


ROTARY_CACHES = ("cos_cache", "sin_cache")


def fit_rotary_cache(model, weights, context: int) -> None:
    """Keep the rotary tables' first ``context`` rows.

    The builder writes cos/sin for the model's whole range (32,768 positions: 8 MiB on the 0.5B, 16 MiB on
    the 1.5B) while a bundle never runs past its own context (``load`` refuses a larger one, and
    onnxruntime-genai's ``max_length`` is set to it). GroupQueryAttention reads the row of each position.
    """
    import numpy as np
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name in ROTARY_CACHES and len(t.dims) == 2 and t.dims[0] > context:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weights.array(t.name)[:context]), t.name))


def _declare_logits_rows(model, rows: int | str) -> None:
    """Set the declared length of the ``logits`` output: a number, or a symbolic name."""
    for out in model.graph.output:
        if out.name == "logits":
            dim = out.type.tensor_type.shape.dim[1]
            if isinstance(rows, str):
                dim.ClearField("dim_value")
                dim.dim_param = rows
            else:
                dim.ClearField("dim_param")
                dim.dim_value = rows
