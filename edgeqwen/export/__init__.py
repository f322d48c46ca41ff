"""``export(model, device, out)``: source model -> float ONNX graph -> quantized graph -> verified bundle.

Each stage has its own module (sources, graph, quantize, verify); this one sequences them, applies the
device profile, and writes the bundle atomically: everything lands in a temporary folder beside ``out`` and
is renamed into place only after verification passed, so ``out`` never holds half a bundle or one that
failed its check.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .. import __version__
from ..bundle import (FORMAT, FORMAT_VERSION, AtomicFolder, GraphIO, Manifest, ModelSpec, is_count, work_dir,
                      write_manifest)
from ..errors import ExportError, VerificationError
from ..profiles import BLOCK_SIZES, MEASURED, Profile, check_memory_budget, kv_cache_bytes, load_profile
from .sources import config_head_dim

__all__ = ["export", "ExportResult"]

BITS_PER_WEIGHT = {"int4": 5.2, "int8": 9.3, "fp16": 16.0, "fp32": 32.0}
# What blockquant.quantize implements (hqq through onnxruntime's implementation; gptq is our own port).
QUANTIZER_ALGOS = ("rtn", "k_quant", "hqq", "gptq")
# Standard-op graphs: weight-only int8 (DequantizeLinear -> MatMul) or float.
PORTABLE_PRECISIONS = ("int8", "fp32")
# What to try when verification fails, by precision (a float bundle that disagrees is a bug, not a setting)
_VERIFY_FIX = {
    "int4": "try --precision int8, a smaller --block-size, or --quant-algo k_quant.",
    "int8": "try --precision fp32 (fp16 on a GPU profile), or --no-verify if the source itself is unusual.",
    "fp32": "the float graph should match its source: please report this model with the export log.",
}


@dataclass
class ExportResult:
    bundle: Path
    manifest: Manifest
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        size = sum(f["size"] for f in m.files.values())
        return {"bundle": str(self.bundle), "name": m.name, "precision": m.precision, "backend": m.backend,
                "profile": m.profile.get("name"), "context": m.spec.context_length,
                "size_mb": round(size / 2**20, 1), "quantization": m.quantization.get("summary"),
                "verification": m.verification, "timings_s": {k: round(v, 1) for k, v in self.timings.items()}}


class _Stages:
    """Prints one line per stage with its elapsed time (rich when available, plain text otherwise)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.n = enabled, total, 0
        self.timings: dict[str, float] = {}
        try:
            from rich.console import Console

            self.console = Console(stderr=True)
        except ImportError:  # pragma: no cover
            self.console = None

    def _print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.console is not None:
            self.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    @contextmanager
    def stage(self, key: str, title: str) -> Iterator[None]:
        self.n += 1
        self._print(f"[bold cyan][{self.n}/{self.total}][/] {title} …" if self.console else f"[{self.n}] {title}")
        t0 = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t0
        self._print(f"      done in {self.timings[key]:.1f}s")

    def bar(self, iterable, desc: str, unit: str = "it"):
        if not self.enabled:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=f"      {desc}", unit=unit, leave=False)


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgeqwen": __version__}
    for pkg in ("onnxruntime", "onnx", "onnxruntime-genai", "transformers", "torch", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def model_spec(config: dict, context: int, generation: dict) -> ModelSpec:
    heads = config["num_attention_heads"]
    head_dim = config_head_dim(config)
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return ModelSpec(arch=config["model_type"], num_layers=config["num_hidden_layers"], num_heads=heads,
                     kv_heads=config.get("num_key_value_heads", heads), head_dim=head_dim,
                     hidden_size=config["hidden_size"], vocab_size=config["vocab_size"], context_length=context,
                     max_position_embeddings=config.get("max_position_embeddings", context),
                     bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids,
                     pad_token_id=config.get("pad_token_id"))


# Bits per weight of a block-32 MatMulNBits matrix: the codes, an fp32 scale and a packed zero point per block.
_BLOCK_BITS = {4: 4 + (32 + 4) / 32, 8: 8 + (32 + 8) / 32}


def estimate_weight_bytes(config: dict, precision: str, eight_bit: tuple[str, ...] = ()) -> int:
    """Bundle weight bytes before exporting, for the RAM budget check.

    int4 bundles are mixed: a flat bits-per-weight figure was 25% low once attention and the gate projections
    stayed 8-bit, so each decoder matrix is matched against ``eight_bit`` with the quantizer's own substring
    rule. The vocabulary matrices count as 4-bit each, the lm_head as 8-bit when ``eight_bit`` keeps it. GGUF
    sources come out a few % larger (their Q6_K/Q8_0 tensors are copied at 8 bits).
    """
    from .quantize import keeps_8_bits
    from .sources import estimate_parameters

    params = estimate_parameters(config)
    if precision != "int4":
        return int(params * BITS_PER_WEIGHT[precision] / 8)
    hidden, inter, layers = (int(config[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    vocab = int(config["vocab_size"]) * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    attn = (params - vocab - hidden) // layers - 3 * hidden * inter  # q/k/v/o (+ biases, norms: small)
    bits = vocab * _BLOCK_BITS[4]
    if "lm_head" in eight_bit:  # the lm_head (or the shared matrix) at 8 bits
        bits += int(config["vocab_size"]) * hidden * (_BLOCK_BITS[8] - _BLOCK_BITS[4])
    for i in range(layers):
        for kind, n in (("attn.qkv_proj", attn), ("mlp.gate_proj", hidden * inter),
                        ("mlp.up_proj", hidden * inter), ("mlp.down_proj", hidden * inter)):
            name = f"model.layers.{i}.{kind}.MatMul.weight"
            bits += n * _BLOCK_BITS[8 if keeps_8_bits(name, eight_bit) else 4]
    return int(bits / 8)


def _copy_tokenizer_files(hf_dir: Path, dest: Path) -> None:
    for name in ("tokenizer.json", "generation_config.json", "chat_template.jinja"):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, dest / name)
    if not (dest / "tokenizer.json").is_file():
        raise ExportError(f"The source {hf_dir} has no tokenizer.json (a fast tokenizer).",
                          "convert the tokenizer with transformers (AutoTokenizer(...).save_pretrained) first.")
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text()) if (
        hf_dir / "tokenizer_config.json").is_file() else {}
    if "chat_template" not in tok_cfg and (hf_dir / "chat_template.jinja").is_file():
        tok_cfg["chat_template"] = (hf_dir / "chat_template.jinja").read_text()  # older readers look here
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))


def resolve_profile(device: str | Profile, **overrides: Any) -> Profile:
    if isinstance(device, Profile):
        from ..profiles import with_overrides

        return with_overrides(device, **overrides)
    return load_profile(device, **overrides)


def export(model: str, device: str | Profile = "host", out: str | Path = "bundle", *, precision: str | None = None,
           quant_algo: str | None = None, block_size: int | None = None, context: int | None = None,
           gguf_mode: str | None = None, force: bool = False, verify: bool = True, progress: bool = True,
           threads: int | None = None, eight_bit: list[str] | str | None = None,
           vocab_refine: int | None = None, vocab_bits: int | None = None,
           smooth_alpha: float | None = None, accuracy_level: int | None = None,
           accuracy_levels: dict[str, int] | str | None = None) -> ExportResult:
    """Export ``model`` (alias, hub id, HF folder or .gguf) into a bundle folder ``out`` for ``device``.

    ``eight_bit`` replaces the profile's list of int4 weights kept at 8 bits (``[]``: none, the smallest and
    fastest bundle; the profiles' default is attention, gate projections, ``"lm_head"`` and ``"measured"``).
    ``vocab_refine`` overrides the profile's number of lm_head candidates rescored at full precision (0: none),
    ``vocab_bits`` the bits of that refined vocabulary matrix (6 or 8), ``smooth_alpha`` the SmoothQuant
    strength for the attention input (0: off; ``smooth.py``), ``accuracy_level`` the MatMulNBits compute
    precision (4: int8 activations, fast; 0: float activations, exact arithmetic, slower; ``halves.py``),
    ``accuracy_levels`` that level per layer type (``{"down_proj": 0}`` or ``"down_proj=0"``; profiles.LAYER_TYPES)."""
    from .graph import LOGITS_WINDOW, adjust_genai_config, build_fast_graph, build_portable_graph, write_genai_graph
    from .sources import resolve_source

    profile = resolve_profile(device, precision=precision, quant_algo=quant_algo, block_size=block_size,
                              context=context, gguf_mode=gguf_mode, eight_bit=eight_bit, vocab_refine=vocab_refine,
                              vocab_bits=vocab_bits, smooth_alpha=smooth_alpha, accuracy_level=accuracy_level,
                              exact_accuracy_level=accuracy_level,  # one flag: the level of whatever is exported
                              accuracy_levels=accuracy_levels)
    if threads is not None and not is_count(threads):
        raise ExportError(f"threads must be a positive integer, got {threads!r}.",
                          "pass e.g. --threads 4, or leave it out to use every core.")
    if smooth_alpha and profile.quant_algo not in ("k_quant", "gptq"):
        raise ExportError(f"smooth_alpha={smooth_alpha} needs calibration statistics, which only the k_quant and "
                          f"gptq algorithms gather; with {profile.quant_algo!r} it would be ignored.",
                          "drop --smooth-alpha, or pass --quant-algo gptq (or k_quant).")
    target = AtomicFolder(out, force=force)
    target.check_target()  # fail on a bad -o before any heavy work
    if profile.backend == "portable":
        if profile.precision not in PORTABLE_PRECISIONS:
            raise ExportError(f"The portable backend builds {', '.join(PORTABLE_PRECISIONS)} bundles, not "
                              f"{profile.precision!r} (profile {profile.name!r}).",
                              "pass --precision int8 (weight-only, the portable default) or fp32.")
        if profile.precision == "int8" and profile.quant_algo != "rtn":
            raise ExportError(f"The portable int8 quantizer is per-channel round-to-nearest; the algorithm "
                              f"{profile.quant_algo!r} (profile {profile.name!r}) applies to the fast backend.",
                              "pass --quant-algo rtn, or use a fast-backend profile for k_quant.")
    elif profile.precision in ("int4", "int8") and profile.quant_algo not in QUANTIZER_ALGOS:
        raise ExportError(f"The quantization algorithm {profile.quant_algo!r} (profile {profile.name!r}) is not "
                          f"implemented by this version's quantizer, which knows {', '.join(QUANTIZER_ALGOS)}.",
                          f"pass --quant-algo {' or '.join(QUANTIZER_ALGOS)} (the profiles' default is gptq).")
    stages = _Stages(progress, total=5 if verify else 4)

    with stages.stage("source", f"Resolving model source {model!r}"):
        src = resolve_source(model, progress=progress)
        ctx = min(profile.context, src.config.get("max_position_embeddings", profile.context))
        spec_kv = kv_cache_bytes(src.config["num_hidden_layers"], src.config.get("num_key_value_heads", 1),
                                 config_head_dim(src.config), ctx, 2 if profile.io_dtype == "fp16" else 4)
        weights = estimate_weight_bytes(src.config, profile.precision, _eight_bit(profile, src))
        check_memory_budget(profile, weights, spec_kv, context=ctx)
        if profile.backend == "fast":
            check_head_dim(src.config)
        if profile.backend == "fast" and profile.precision in ("int4", "int8"):
            check_block_size(profile.block_size, src.config)

    work = work_dir(None, "edgeqwen-graph-")
    try:
        portable = profile.backend == "portable"
        if portable:
            with stages.stage("graph", "Building the ONNX graph (Optimum exporter, standard ops, float)"):
                build = build_portable_graph(src.hf_dir, work, progress=progress)
        else:
            with stages.stage("graph", "Building the ONNX graph (onnxruntime-genai model builder, float)"):
                build = build_fast_graph(src.hf_dir, work, provider=profile.providers[0],
                                         io_dtype=profile.io_dtype)
        with target as tmp:
            how = "weight-only, per channel" if portable else f"{profile.quant_algo}, block {profile.block_size}"
            with stages.stage("quantize", f"Quantizing to {profile.precision} ({how})"):
                quant = (_quantize_portable(build.folder, tmp, profile, src, stages) if portable else
                         _quantize(build.folder, tmp, profile, src, stages, threads=threads, context=ctx))
            _copy_tokenizer_files(src.hf_dir, tmp)
            generation = json.loads((tmp / "generation_config.json").read_text()) if (
                tmp / "generation_config.json").is_file() else {}
            if portable:  # onnxruntime-genai needs its contrib-op graph; the portable bundle has no config for it
                io = GraphIO(position_ids="position_ids", shared_kv_buffer=False, logits_window=LOGITS_WINDOW)
            else:
                write_genai_graph(tmp)
                shutil.copy2(work / "genai_config.json", tmp / "genai_config.json")
                adjust_genai_config(tmp / "genai_config.json", context=ctx, generation=generation,
                                    provider=profile.providers[0], threads=profile.threads)
                io = _fast_graph_io(tmp / "genai_config.json", profile)
            manifest = Manifest(
                format=FORMAT, format_version=FORMAT_VERSION,
                name=(src.entry.alias if src.entry else Path(src.spec).name) + f"-{profile.precision}",
                backend=profile.backend, precision=profile.precision, spec=model_spec(src.config, ctx, generation),
                io=io, profile=profile.to_dict(),
                source={"spec": src.spec, "kind": src.kind, "sha256": src.sha256,
                        "hub_id": src.entry.hub_id if src.entry else None, "graph_builder": build.builder},
                quantization=quant, tools=_tool_versions(),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            write_manifest(tmp, manifest)
            if verify:
                with stages.stage("verify", "Verifying against the float source (transformers)"):
                    from .verify import verify_bundle

                    result = verify_bundle(tmp, src.hf_dir, profile.precision, threads=threads,
                                           progress=lambda it: stages.bar(it, "teacher-forced", "tok"))
                    manifest.verification = result.to_dict()
                    write_manifest(tmp, manifest)
                    if progress:
                        _print_verification(result)
                    if not result.passed:
                        raise VerificationError(
                            f"The {profile.precision} bundle disagrees with its source: agreement "
                            f"{result.agreement:.1%} (min {result.min_agreement:.0%}), worst perplexity ratio "
                            f"{result.worst_ratio:.3f} (max {result.max_ratio}). Nothing was written to {out}.",
                            _VERIFY_FIX.get(profile.precision, _VERIFY_FIX["fp32"]))
            with stages.stage("write", f"Writing bundle {target.target}"):
                pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(bundle=target.target, manifest=manifest, timings=stages.timings)


def _fast_graph_io(genai_config: Path, profile: Profile) -> GraphIO:
    """The builder's graph I/O, read from its genai_config.json: the DirectML graph takes explicit
    position_ids (separate RotaryEmbedding nodes), the CPU/CUDA ones derive positions from the mask."""
    from .graph import LOGITS_WINDOW

    cfg = json.loads(genai_config.read_text())
    return GraphIO(position_ids=cfg["model"]["decoder"].get("inputs", {}).get("position_ids"),
                   shared_kv_buffer=bool(cfg.get("search", {}).get("past_present_share_buffer", True)),
                   io_dtype="float16" if profile.io_dtype == "fp16" else "float32", logits_window=LOGITS_WINDOW)


def _eight_bit(profile: Profile, src) -> tuple[str, ...]:
    """Weights an int4 export keeps at 8 bits: the profile's patterns, its "measured" entry expanded to the
    layers benchmarks/sensitivity.py found most sensitive for this catalog model (none for other sources)."""
    if profile.precision != "int4":
        return ()
    out: list[str] = []
    for pattern in profile.eight_bit:
        if pattern == MEASURED:
            out += src.entry.sensitive if getattr(src, "entry", None) is not None else ()
        else:
            out.append(pattern)
    return tuple(dict.fromkeys(out))


def _accuracy_level(profile: Profile) -> int:
    """The MatMulNBits compute precision of this export: the profile's ``exact_accuracy_level`` (float
    activations by default) for bundles that promise exact values, its ``accuracy_level`` for int4."""
    from .quantize import promises_exact

    exact = promises_exact(profile.precision, profile.gguf_mode)
    return profile.exact_accuracy_level if exact else profile.accuracy_level


def _float_activations_on_cpu(profile: Profile) -> bool:
    """Whether 8-bit weights at level 0 or 1 must become 4-bit halves: onnxruntime's CPU kernels for 8-bit
    MatMulNBits round the activations to int8 (accuracy level 4); at level 0 or 1 they dequantize the whole
    matrix per call. Which weights are split is each one's own level (``halves.split_eight_bit``)."""
    levels = (_accuracy_level(profile), *profile.accuracy_levels.values())
    return profile.backend == "fast" and profile.providers[0] == "cpu" and any(v in (0, 1) for v in levels)


def check_head_dim(config: dict) -> None:
    """The fast graph's GroupQueryAttention needs a head size that is a multiple of 16 (every released Qwen has
    64 or 128); onnxruntime would only say so at the first generation, after a finished export."""
    head_dim = config_head_dim(config)
    if head_dim % 16:
        raise ExportError(f"The model's attention head size is {head_dim}; the fast backend's GroupQueryAttention "
                          "kernel needs a multiple of 16.",
                          "use a portable-backend profile (--device apple-silicon, or a profile .toml with "
                          "backend = \"portable\").")


def check_block_size(block: int, config: dict) -> None:
    """Every weight's input width must be whole blocks: the quantizer leaves a weight that is not in float.

    The 0.5B's hidden size is 896 = 7 x 128, so ``--block-size 256`` would keep q/k/v, gate/up and the
    vocabulary matrix float (a 2 GB "int4" bundle) while the down projections (4864 = 19 x 256) quantize.
    """
    heads = config["num_attention_heads"]
    widths = {"hidden size": config["hidden_size"], "intermediate size": config["intermediate_size"],
              "attention width": heads * config_head_dim(config)}
    bad = {k: v for k, v in widths.items() if v % block}
    if bad:
        fits = [b for b in BLOCK_SIZES if all(v % b == 0 for v in widths.values())]
        raise ExportError(f"Block size {block} does not divide the model's {', '.join(f'{k} {v}' for k, v in bad.items())}, "
                          "so the weights of that input width would stay float.",
                          f"pass --block-size {max(fits)} or smaller (or leave it out for the profile's)."
                          if fits else "use the portable backend (per-channel int8) for this model.")


def _quantize(work: Path, dest: Path, profile: Profile, src, stages: _Stages, *, threads: int | None = None,
              context: int | None = None) -> dict:
    import onnx

    from .quantize import (
        ExternalWeights,
        QuantPlan,
        float_coder,
        keeps_8_bits,
        quantize_graph,
        save_with_external_data,
    )

    model = onnx.load(str(work / "model.onnx"), load_external_data=False)
    weights = ExternalWeights(model, work)
    if context:
        from .graph import fit_rotary_cache

        fit_rotary_cache(model, weights, context)
    if profile.precision in ("fp32", "fp16"):
        weights.materialize_rest(model)
        save_with_external_data(model, dest)
        return {"precision": profile.precision, "summary": {"tensors": 0}}
    eight_bit = _eight_bit(profile, src)  # the weights whose int4 error costs the most (sensitivity.py)
    head_bits = 8 if profile.precision != "int4" or "lm_head" in eight_bit else 4
    plan = QuantPlan(precision=profile.precision, algo=profile.quant_algo, block_size=profile.block_size,
                     accuracy_level=_accuracy_level(profile), gguf_mode=profile.gguf_mode,
                     accuracy_levels=tuple(profile.accuracy_levels.items()),
                     embed_bits=4 if profile.precision == "int4" else 8,
                     lm_head_bits=head_bits, shared_bits=head_bits, eight_bit=eight_bit,
                     vocab_refine=profile.vocab_refine, vocab_bits=profile.vocab_bits,
                     block_size_8bit=profile.block_size_8bit, smooth_alpha=profile.smooth_alpha,
                     eight_bit_halves=_float_activations_on_cpu(profile))
    importance = hessians = None
    smoothed: dict = {}
    if plan.algo in ("k_quant", "gptq"):
        from .calibrate import input_statistics
        from .smooth import follow_statistics, smooth_attention_inputs

        gptq_layers = ("mlp.", "attn.") if plan.algo == "gptq" else ()
        maxima: dict = {}
        importance, hessians = input_statistics(src.hf_dir, hessian_for=gptq_layers, maxima=maxima,
                                                threads=threads)
        if _smooths(plan, src):
            # only q/k/v weights refit at 8 bits: exact GGUF copies and 4-bit fits are left as they were
            exact: set[str] = set()
            if src.gguf_path is not None:
                from .gguf_repack import four_bit_copies

                exact = four_bit_copies(src.gguf_path, list(maxima))
            smoothed = smooth_attention_inputs(
                model, weights, maxima, plan.smooth_alpha,
                wanted=lambda name: keeps_8_bits(name, plan.eight_bit) and name not in exact)
            follow_statistics(smoothed, importance, hessians)
    coder = float_coder(plan, importance, hessians)
    method = "float"
    if src.gguf_path is not None:
        from .gguf_repack import gguf_coder

        coder, method = gguf_coder(src.gguf_path, plan, fallback=coder), "gguf"
    report = quantize_graph(model, weights, plan, coder, progress=lambda it: stages.bar(it, "nodes", "node"))
    save_with_external_data(model, dest)
    return {"plan": plan.to_dict(), "source_weights": method, "calibrated": importance is not None, "summary": report.summary(),
            "smoothed": sorted(smoothed), "tensors": report.tensors}


def _smooths(plan, src) -> bool:
    """Smoothing re-codes the q/k/v weights, so not where the bundle promises the source's exact codes."""
    if plan.smooth_alpha <= 0 or plan.precision != "int4":
        return False
    if src.gguf_path is None:
        return True
    # a GGUF import refits its 8-bit weights only at a wider block (gguf_repack.gguf_coder); faithful never
    return plan.gguf_mode in ("fast", "balanced") and plan.refit_block_8bit is not None


def _quantize_portable(work: Path, dest: Path, profile: Profile, src, stages: _Stages) -> dict:
    import onnx

    from .qdq import quantize_graph_qdq
    from .quantize import ExternalWeights, save_with_external_data

    model = onnx.load(str(work / "model.onnx"), load_external_data=False)
    weights = ExternalWeights(model, work)
    if profile.precision == "fp32":
        weights.materialize_rest(model)
        save_with_external_data(model, dest)
        return {"precision": "fp32", "summary": {"tensors": 0}}
    report = quantize_graph_qdq(model, weights, progress=lambda it: stages.bar(it, "nodes", "node"))
    save_with_external_data(model, dest)
    return {"plan": {"precision": "int8", "algo": "rtn", "granularity": "per-channel", "format": "QDQ"},
            "source_weights": "dequantized gguf" if src.gguf_path else "float", "calibrated": False, "summary": report.summary(), "tensors": report.tensors}


def _print_verification(result) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title=f"Verification ({result.precision})")
    for col in ("text", "tokens", "top-1 agreement", "perplexity", "reference", "ratio"):
        table.add_column(col, justify="right")
    for t in result.texts:
        table.add_row(t.name, str(t.tokens), f"{t.agreement:.1%}", f"{t.perplexity:.3f}",
                      f"{t.reference_perplexity:.3f}", f"{t.ratio:.3f}")
    verdict = "[green]passed[/]" if result.passed else "[red]FAILED[/]"
    Console(stderr=True).print(table, f"      {verdict}: agreement over all texts {result.agreement:.1%} "
                                      f"(min {result.min_agreement:.0%}), worst ratio {result.worst_ratio:.3f} "
                                      f"(max {result.max_ratio})")
