"""`edgeqwen bench`: the metric code (windows of runs, percentiles) and the verb on a tiny bundle."""

from __future__ import annotations

import json

import pytest

from edgeqwen import cli
from edgeqwen.bench import bench, real_prompt_tokens, summarize
from edgeqwen.errors import GenerationError


def test_summarize_is_median_min_max():
    assert summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    assert summarize([4.0]) == {"median": 4.0, "min": 4.0, "max": 4.0}
    with pytest.raises(ValueError):
        summarize([])


def test_prompt_is_real_text_of_exact_length(fp32_bundles):
    from edgeqwen import runtime

    model = runtime.load(fp32_bundles["qwen3"], threads=1)
    ids = real_prompt_tokens(model, 300)
    assert len(ids) == 300
    assert len(set(ids)) > 40  # prose and code, not one token repeated
    assert model.decode(ids[:20]) in model.decode(real_prompt_tokens(model, 40))


def test_bench_measures_every_run(fp32_bundles):
    r = bench(fp32_bundles["qwen2_tied"], prompt_tokens=64, new_tokens=16, runs=3, threads=1)
    assert r.runs == 3 and r.prompt_tokens == 64 and r.new_tokens == 16 and r.provider == "cpu"
    for d in (r.ttft_s, r.prefill_tps, r.decode_tps):
        assert 0 < d["min"] <= d["median"] <= d["max"]
    assert r.load_s > 0 and r.size_mb > 0 and r.peak_rss_mb > 50


def test_bench_refuses_runs_beyond_the_context(fp32_bundles):
    with pytest.raises(GenerationError, match=r"500 prompt \+ 100 new tokens exceed the bundle's context \(512\)"):
        bench(fp32_bundles["qwen3"], prompt_tokens=500, new_tokens=100, runs=1)
    with pytest.raises(GenerationError, match="must be >= 1"):
        bench(fp32_bundles["qwen3"], runs=0)


def test_cli_bench_json(fp32_bundles, capsys):
    assert cli.main(["bench", str(fp32_bundles["qwen3"]), "--prompt-tokens", "32", "--new-tokens", "8",
                     "--runs", "2", "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"] == 2 and set(out["decode_tps"]) == {"median", "min", "max"}
