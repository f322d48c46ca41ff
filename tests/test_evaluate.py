"""`edgeqwen eval`: sliding-window perplexity and agreement, checked against a direct transformers computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeqwen import cli, runtime
from edgeqwen.errors import GenerationError
from edgeqwen.evaluate import agreement, perplexity, windows
from edgeqwen.export.verify import Reference

TEXT = ("the quick model runs on a small board with int4 weights and a fast cache. " * 6
        + "def add(a, b):\n    return a + b\n" * 4 + "你好世界，今天天气很好。" * 3)


@pytest.mark.parametrize("n,context,stride", [(2, 2, 1), (10, 4, 2), (100, 16, 16), (100, 16, 5), (7, 64, 32)])
def test_windows_score_every_token_once_within_the_context(n, context, stride):
    spans = windows(n, context, stride)
    scored = [t for w in spans for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    for w in spans:
        assert w.end - w.start <= context and w.start < w.score_from <= w.end


def test_windows_use_all_the_context_they_may():
    """Pinned by hand: each window reaches back a full context (so the reference, which reuses windows(),
    cannot share a bug that shortens them), and scores ``stride`` new tokens after the first."""
    W = [(w.start, w.score_from, w.end) for w in windows(10, 4, 2)]
    assert W == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    assert [(w.start, w.score_from, w.end) for w in windows(7, 64, 32)] == [(0, 1, 7)]
    # stride = context: the step is context - 1, so every window keeps one token of context
    assert [(w.start, w.score_from, w.end) for w in windows(6, 3, 3)] == [(0, 1, 3), (2, 3, 5), (3, 5, 6)]
    for n, context, stride in [(100, 16, 5), (100, 16, 16)]:
        assert all(w.start == max(0, w.end - context) for w in windows(n, context, stride))


@pytest.mark.parametrize("context,stride,pattern", [(1, 1, "context=1 is too small"),
                                                    (8, 0, "stride=0 must be between 1 and the context"),
                                                    (8, 9, "stride=9 must be between 1 and the context")])
def test_bad_windows_are_named(context, stride, pattern):
    with pytest.raises(GenerationError, match=pattern):
        windows(50, context, stride)


def direct_nll(hf_model, tokens: list[int], context: int, stride: int) -> np.ndarray:
    """Independent reference: transformers forward per window, log-softmax in torch."""
    import torch

    nll = []
    for w in windows(len(tokens), context, stride):
        with torch.inference_mode():
            logits = hf_model(input_ids=torch.tensor([tokens[w.start : w.end]])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(w.score_from, w.end):
            nll.append(-float(logp[t - w.start - 1, tokens[t]]))
    return np.array(nll)


@pytest.mark.parametrize("context,stride", [(512, 256), (32, 16), (24, 24)])
def test_bundle_perplexity_equals_transformers_on_the_same_windows(fp32_bundles, qwen3, context, stride):
    model = runtime.load(fp32_bundles["qwen3"], threads=1)
    reference = Reference(qwen3, threads=1)
    tokens = model.encode(TEXT)
    assert len(tokens) > 3 * context or context == 512
    expected = math.exp(direct_nll(reference.model, tokens, context, stride).mean())
    result = perplexity(model, TEXT, context=context, stride=stride, reference=reference)
    assert result.tokens == len(tokens) - 1
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.reference_perplexity == pytest.approx(expected, rel=1e-6)
    assert result.ratio == pytest.approx(1.0, abs=1e-4) and result.agreement == 1.0
    d = result.to_dict()
    assert {"perplexity", "reference_perplexity", "ratio", "tokens"} <= set(d)


def test_shorter_context_changes_perplexity(fp32_bundles):
    """The window really limits what the model sees (a random tiny model still uses its context)."""
    model = runtime.load(fp32_bundles["qwen2_untied"], threads=1)
    long = perplexity(model, TEXT, context=256).perplexity
    short = perplexity(model, TEXT, context=4, stride=3).perplexity
    assert short != pytest.approx(long, rel=1e-3)


def test_agreement_of_a_quantized_bundle_is_below_one(int4_bundle, qwen2_untied):
    model = runtime.load(int4_bundle, threads=1)
    out = agreement(model, Reference(qwen2_untied, threads=1), {"a": TEXT}, max_tokens=120)
    # measured 56.3% / ratio 1.035 (a random tiny model: many near-ties); a broken int4 path scores far lower
    assert 0.45 < out["agreement"] < 1.0 and out["tokens"] == 119
    assert 1.0 < out["texts"]["a"]["ratio"] < 1.15


def test_cli_eval_perplexity_json(fp32_bundles, qwen3, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEQWEN_ALLOW_ANY_SIZE", "1")
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    code = cli.main(["eval", "perplexity", str(fp32_bundles["qwen3"]), "--text", str(text), "--context", "32",
                     "--reference", str(qwen3), "--threads", "1", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ratio"] == pytest.approx(1.0, abs=1e-3) and out["context"] == 32 and out["stride"] == 16
    assert out["tokens"] > 100


def test_cli_eval_errors(fp32_bundles, tmp_path, capsys):
    bundle = str(fp32_bundles["qwen3"])
    assert cli.main(["eval", "perplexity", bundle]) == 2
    assert "needs --text FILE" in capsys.readouterr().err
    assert cli.main(["eval", "perplexity", bundle, "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert cli.main(["eval", "agreement", bundle]) == 2
    assert "pass --reference MODEL" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("a", encoding="utf-8")
    assert cli.main(["eval", "perplexity", bundle, "--text", str(one)]) == 2
    assert "perplexity needs at least 2" in capsys.readouterr().err
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    for n in ("0", "-5", "1"):
        assert cli.main(["eval", "perplexity", bundle, "--text", str(text), "--max-tokens", n]) == 2
        assert f"max_tokens must be an integer of at least 2 (tokens to score), got {n}" in capsys.readouterr().err
    assert cli.main(["eval", "perplexity", bundle, "--text", str(text), "--stride", "0"]) == 2
    assert "stride=0 must be between 1 and the context" in capsys.readouterr().err
    assert cli.main(["eval", "agreement", bundle, "--reference", "x", "--context", "64"]) == 2
    assert "--context and --stride apply to `eval perplexity`" in capsys.readouterr().err
