"""The benchmark scripts run end to end on the tiny model (``--quick``) so they cannot rot between releases.

Their figures are meaningless here; what is checked is that each script runs, measures every system it
names, and writes the JSON report the README and benchmarks/README.md are built from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], capture_output=True,
                         text=True, env=env, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    written = [line for line in out.stderr.splitlines() if line.startswith("written: ")]
    assert written, out.stderr[-2000:]
    path = Path(written[-1].removeprefix("written: "))
    report = json.loads(path.read_text())
    path.unlink()  # a smoke run's figures are not results
    path.with_suffix(".png").unlink(missing_ok=True)
    return report


def test_export_bench_quick(tiny_models):
    report = run_script("export_bench.py", "--quick")
    systems = {r["system"]: r for r in report["results"]}
    assert set(systems) == {"edgeqwen int4 (default)", "edgeqwen int8", "genai builder int4 (default)"}
    for r in systems.values():
        assert r["exit"] == 0 and r["wall_s"] > 0 and r["size_mb"] > 0
    # int8 holds twice the bits of int4 in the body: its bundle must be the larger one
    assert systems["edgeqwen int8"]["size_bytes"] > systems["edgeqwen int4 (default)"]["size_bytes"]


def test_compare_quick(tiny_models):
    report = run_script("compare.py", "--quick", "--threads", "1", "--sampled")
    rows = {r["system"]: r for r in report["results"]}
    assert report["machine"]["read_bandwidth_gbs"] > 0.1
    measured = [r for r in rows.values() if "error" not in r]
    names = set(rows)
    assert {"genai default int4", "genai default int4, default max_length", "optimum ORTModelForCausalLM fp32"} <= names
    assert "error" not in rows["genai default int4, default max_length"]
    assert any(n.startswith("edgeqwen ") for n in names) and any(n.startswith("genai on ") for n in names)
    assert "llama.cpp Q4_K_M (source GGUF)" in names  # measured, or a row saying why not: never dropped
    genai_on_ours = next(r for n, r in rows.items() if n.startswith("genai on "))
    assert "error" not in genai_on_ours  # the bundle's model.genai.onnx runs in onnxruntime-genai
    for r in measured:
        assert r["decode_tps"] > 0 and r["ttft_s"] > 0 and r["peak_rss_mb"] > 0
        if r["system"].endswith("+ lookup"):  # several tokens per read of the weights: no bandwidth figure
            assert 0 <= r["lookup_accepted"] <= 1 and "fraction_of_bandwidth" not in r
        else:
            assert 0 < r["fraction_of_bandwidth"] and r["weight_mb_per_token"] > 0
    assert sum(r["system"].endswith("+ lookup") for r in measured) == 1
    sampled = [r for r in measured if r["system"].endswith(", sampled")]  # ours and genai's, both measured
    assert len(sampled) == 2 and {r["system"].split()[0] for r in sampled} == {"edgeqwen", "genai"}
    assert report["settings"]["sampling"] == {"temperature": 0.7, "top_k": 20, "top_p": 0.8,
                                              "repetition_penalty": 1.05}
    assert "optimum ORTModelForCausalLM fp32" in {r["system"] for r in measured}


def test_bandwidth_counts_a_cast_initializer_at_the_size_it_is_folded_into(tmp_path):
    """int4 bundles store block offsets in fp16 behind a Cast that onnxruntime folds to fp32 at load: a decode
    step reads the fp32 copy, so that is what the bandwidth ceiling must count."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bandwidth import weight_bytes_per_token

    offsets = numpy_helper.from_array(np.zeros((10, 4), np.float16), "offsets")
    nodes = [helper.make_node("Cast", ["offsets"], ["offsets/float"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "offsets/float"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[offsets])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert weight_bytes_per_token(tmp_path) == 10 * 4 * 4


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_compare_names_a_peer_that_died_of_an_illegal_instruction(monkeypatch):
    """llama.cpp built for an ISA extension this CPU lacks dies of SIGILL with an empty stderr: the row must
    say why and how to fix it, not just "failed"."""
    import signal

    sys.path.insert(0, str(REPO / "benchmarks"))
    import compare

    crash = subprocess.CompletedProcess([], -signal.SIGILL, stdout="", stderr="")
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: crash)
    args = type("A", (), {"threads": 1, "prompt_tokens": 8, "new_tokens": 2})()
    with pytest.raises(RuntimeError, match=r"llama\.cpp on x failed: killed by SIGILL \(illegal instruction.*make bench"):
        compare.run_once("llama.cpp", Path("x"), args, Path("t"))
    assert compare.exit_reason(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert compare.exit_reason(3) == "exit status 3"


def test_quality_scores_bundles_and_peers_against_the_float_model(fp32_bundles, int4_bundle, monkeypatch):
    """quality.py on the tiny model: our fp32 bundle is the float model (agreement 1, ratio 1), and so is
    onnxruntime-genai running that same bundle (which checks the peer's token-by-token rows line up with the
    targets); the int4 bundle is scored on the same tokens; the llama.cpp peers (no GGUF for this source)
    keep rows saying why."""
    monkeypatch.setenv("EDGEQWEN_ALLOW_ANY_SIZE", "1")  # the tiny source is far below the 0.3B floor
    fp32_bundle = fp32_bundles["qwen2_untied"]
    report = run_script("quality.py", str(fp32_bundle), str(int4_bundle), "--tokens", "24", "--threads", "1",
                        "--genai", str(fp32_bundle))
    by = {(r["system"], r["text"]): r for r in report["results"]}
    systems = {s for s, _ in by}
    texts = {t for _, t in by}
    assert {"en", "code", "py-textwrap"} <= texts
    fp32 = next(s for s in systems if s.endswith("(fp32)"))
    int4 = next(s for s in systems if s.endswith("(int4)"))
    genai = f"onnxruntime-genai on {fp32_bundle.name}"
    assert genai in systems
    for t in texts:
        for s in (fp32, genai):
            assert by[(s, t)]["agreement"] == 1.0 and abs(by[(s, t)]["ratio"] - 1) < 1e-3, (s, t)
        r = by[(int4, t)]
        assert r["tokens"] == 23 and r["perplexity"] > 0 and 0 <= r["agreement"] <= 1
        assert r["reference_perplexity"] == by[(fp32, t)]["reference_perplexity"]  # one reference, same ids
    assert set(report["missing"]) == {"llama.cpp source GGUF", "llama.cpp Q4_0 re-quantized",
                                      "llama.cpp IQ4_NL re-quantized"}


def test_score_rows_refuses_a_row_count_that_does_not_match_the_text():
    import numpy as np

    from edgeqwen.export.verify import score_rows

    with pytest.raises(ValueError, match="3 logits rows for 4 targets"):
        score_rows(None, "t", [1, 2, 3, 4, 5], [np.zeros(8)] * 3)


def test_bandwidth_bytes_per_token_counts_each_weight_once(int4_tied_bundle):
    import onnx

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bandwidth import read_bandwidth_gbs, weight_bytes_per_token

    graph = onnx.load(str(int4_tied_bundle / "model.onnx"), load_external_data=False).graph
    sizes = {t.name: t for t in graph.initializer}
    per_token = weight_bytes_per_token(int4_tied_bundle)
    data = (int4_tied_bundle / "model.onnx.data").stat().st_size
    assert 0.5 * data < per_token <= data  # nearly every stored byte is read per token, nothing twice
    assert {n.op_type for n in graph.node} >= {"MatMulNBits"} and sizes
    assert read_bandwidth_gbs(mb=64, threads=1, repeats=2) > 0.1


def test_soak_quick(int4_tied_bundle):
    """The server soak on the tiny int4 bundle: every good request answered, every bad one refused,
    the server exits 0 on SIGTERM. (Its RSS figures only mean something on the real model.)"""
    report = run_script("soak.py", str(int4_tied_bundle), "--requests", "50", "--concurrency", "4",
                        "--warmup", "5", "--time-limit", "120")
    assert report["unexpected_count"] == 0, report["unexpected"]
    assert report["requests_ok"] == 48  # 50 minus the two deliberately bad ones (1 in 25)
    assert report["p95_s"] >= report["p50_s"] > 0 and report["rss_end_mb"] > 0
    assert report["server_exit_code_on_sigterm"] == 0


def test_step_profile_runs_on_a_bundle(int4_tied_bundle):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_profile.py"), str(int4_tied_bundle),
                          "--context", "4", "32", "--steps", "3", "--threads", "1", "--profile"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout[out.stdout.index("\n[") + 1:])
    assert [r["context"] for r in rows] == [4, 32] and all(r["step_ms"] > 0 for r in rows)
    assert "MatMulNBits" in rows[0]["ms_per_step_by_op"] and rows[0]["slowest_matmuls_ms"]


def test_sensitivity_harness_reproduces_the_bundle(int4_tied_bundle, qwen2_tied):
    """sensitivity.py's harness (float model + the bundle's dequantized weights + accuracy level 4's input
    rounding + the split vocabulary's coarse/refine scoring) gives the bundle's own logits: what it says
    about a group of weights is about the bundle, not about a model that only looks like it."""
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from sensitivity import Harness, bundle_norms, bundle_weights

    from edgeqwen import runtime
    from edgeqwen.export.verify import bundle_logits

    model = runtime.load(int4_tied_bundle, threads=1)
    tokens = model.encode("def add(a, b):\n    return a + b\n\nclass Box:\n    pass\n")[:24]
    ours = np.stack(list(bundle_logits(model, tokens)))

    weights = bundle_weights(int4_tied_bundle)
    head = weights["lm_head.MatMul"]
    assert head.coarse is not None and head.refine_k > 0  # the tiny tied int4 bundle splits its vocabulary
    assert np.abs(head.value - head.coarse).max() > 0  # the residual is read back, not dropped
    harness = Harness(qwen2_tied, {"t": tokens}, threads=1)
    float_logits = harness.model(input_ids=harness.texts["t"]).logits[0, :-1].detach().numpy()
    for base, w in weights.items():
        harness.set(base, w)
    harness.act_round = True
    source_norms = harness.model(input_ids=harness.texts["t"]).logits[0, :-1].detach().numpy()
    harness.act_round = False
    norms = bundle_norms(int4_tied_bundle)
    assert norms and all(name in harness.params for name in norms)
    harness.smooth_norms(norms)  # smoothing divided them by what it multiplied the q/k/v input columns by
    assert harness.input_scales  # ... so the harness keeps those factors for float q/k/v rows
    weights_only = harness.model(input_ids=harness.texts["t"]).logits[0, :-1].detach().numpy()
    harness.act_round = True
    rounded = harness.model(input_ids=harness.texts["t"]).logits[0, :-1].detach().numpy()

    def err(a):
        return float(np.abs(a - ours).max() / np.abs(ours).max())

    assert err(rounded) < 1e-3, (err(rounded), err(weights_only))
    assert (rounded.argmax(-1) == ours.argmax(-1)).all()
    # each part of the emulation matters: without it the harness is measurably off the bundle
    assert min(err(weights_only), err(float_logits), err(source_norms)) > 1e-2
    refine, harness.refine = harness.refine, None  # every logit from the whole matrix: the tail is wrong
    whole_matrix = harness.model(input_ids=harness.texts["t"]).logits[0, :-1].detach().numpy()
    assert err(whole_matrix) > 1e-2
    harness.refine = refine
    harness.float_kinds = {"qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    no_rounding = harness.model(input_ids=harness.texts["t"]).logits[0, :-1].detach().numpy()
    np.testing.assert_allclose(no_rounding, weights_only, rtol=0, atol=1e-5)
    # every weight put back float, beside the bundle's smoothed norms: the float model again (a "float" row
    # measures the quantization, not a mismatch between the norm and its q/k/v)
    harness.act_round = False
    for base in weights:
        harness.set(base, None)
    back = harness.model(input_ids=harness.texts["t"]).logits[0, :-1].detach().numpy()
    np.testing.assert_allclose(back, float_logits, rtol=0, atol=1e-4 * float(np.abs(float_logits).max()))
