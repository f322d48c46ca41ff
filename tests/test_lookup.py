"""Prompt lookup (runtime/lookup.py and the decode loop's drafted runs): the n-gram index proposes what
followed the latest match, and generating with drafts gives the tokens of a plain run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeqwen import runtime
from edgeqwen.errors import GenerationError
from edgeqwen.runtime.generate import Stats, StopRule, decode_one, generate
from edgeqwen.runtime.lookup import DraftLength, NgramIndex
from edgeqwen.runtime.sampling import Sampler, SamplingParams

KINDS = ["qwen2_tied", "qwen2_untied", "qwen3"]
REPEATING = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(a, b):\n"
# prompts whose greedy continuation by each tiny random model repeats earlier tokens, so guesses get accepted
LOOPING = {"qwen2_tied": REPEATING, "qwen2_untied": REPEATING, "qwen3": "1 2 3 4 1 2 3 4 1 2 3 4 1 2"}


def test_index_proposes_what_followed_the_longest_latest_match():
    index = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 1, 2, 3], max_ngram=3)
    # the 3-gram (1, 2, 3) occurred once before, followed by 4 5 9 ...
    assert index.propose(3) == [4, 5, 9]
    index.append(7)  # now ... 2 3 7: the 3-gram (2, 3, 7) occurred at 6..8, followed by 8 6 1
    assert index.propose(2) == [8, 6]
    index.append(0)  # (3, 7, 0) and (7, 0) never occurred; (0,) neither: nothing to propose
    assert index.propose(4) == []
    assert NgramIndex([5, 6, 5, 6], min_ngram=1).propose(8) == [5, 6]  # (5, 6) -> the tokens after its first use
    assert NgramIndex([5, 6, 5, 6]).propose(0) == []


def test_index_falls_back_to_shorter_ngrams_down_to_min_ngram():
    assert NgramIndex([4, 9, 9, 1, 4], min_ngram=1, max_ngram=3).propose(2) == [9, 9]
    assert NgramIndex([4, 9, 9, 1, 4], min_ngram=2, max_ngram=3).propose(2) == []
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        NgramIndex(min_ngram=3, max_ngram=2)


def test_draft_length_grows_on_full_acceptance_and_shrinks_to_what_was_taken():
    length = DraftLength(4)
    assert length.current == 4
    length.update(drafted=4, accepted=1)
    assert length.current == 2
    length.update(drafted=2, accepted=2)
    assert length.current == 3
    length.update(drafted=3, accepted=0)
    assert length.current == 1
    length.update(drafted=0, accepted=0)  # no draft: nothing learned
    assert length.current == 1
    for _ in range(5):
        length.update(drafted=length.current, accepted=length.current)
    assert length.current == 4  # capped
    length.update(drafted=1, accepted=1)  # a short draft (the match ended) taken whole: no reason to shrink
    assert length.current == 4


def _run(model: runtime.Model, ids: list[int], n: int, lookup: int, params: SamplingParams | None = None):
    model.reset()
    stats = Stats()
    params = params or SamplingParams()
    tokens = list(generate(model.engine, ids, Sampler(params, ids), StopRule(n, frozenset()), stats, lookup=lookup))
    return tokens, stats


@pytest.mark.parametrize("backend", ["fast", "portable"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_with_lookup_gives_the_plain_tokens_and_cache(request, backend: str, kind: str) -> None:
    bundles = request.getfixturevalue("fp32_bundles" if backend == "fast" else "portable_fp32_bundles")
    model = runtime.load(bundles[kind], threads=1)
    ids = model.encode(LOOPING[kind])
    plain, _ = _run(model, ids, 48, lookup=0)
    next_plain = decode_one(model.engine, plain[-1]).copy()
    drafted, stats = _run(model, ids, 48, lookup=4)
    assert drafted == plain
    assert stats.accepted_tokens > 0 and stats.drafted_tokens > stats.accepted_tokens  # both paths ran
    assert stats.new_tokens == 48 and stats.decode_steps == 47
    # rejected guesses were rewound: the cache holds what a plain run's does (all but the last token), and
    # continues exactly as the plain run
    engine = model.engine
    assert engine.tokens == ids + drafted[:-1] and engine.cache.length == len(engine.tokens)
    np.testing.assert_allclose(decode_one(engine, drafted[-1]), next_plain, atol=1e-4, rtol=0)


def test_stop_tokens_and_max_new_tokens_inside_drafted_runs(fp32_bundles) -> None:
    model = runtime.load(fp32_bundles["qwen3"], threads=1)
    ids = model.encode(LOOPING["qwen3"])
    plain, _ = _run(model, ids, 40, lookup=0)
    for n in range(1, 40, 3):  # the cap falls at every position of the drafted runs
        tokens, stats = _run(model, ids, n, lookup=4)
        assert tokens == plain[:n] and stats.new_tokens == n
        assert model.engine.tokens == ids + plain[: n - 1]
    for stop in dict.fromkeys(plain):  # each distinct token as the stop token, guessed ones included
        k = plain.index(stop)
        model.reset()
        tokens = list(generate(model.engine, ids, Sampler(SamplingParams()), StopRule(40, frozenset([stop])),
                               lookup=4))
        assert tokens == plain[:k], stop
        assert model.engine.tokens == (ids + plain)[: len(model.engine.tokens)]
        assert model.engine.cache.length == len(model.engine.tokens) >= len(ids) + k - 1


def test_a_consumer_that_stops_early_leaves_a_reusable_cache(fp32_bundles) -> None:
    model = runtime.load(fp32_bundles["qwen3"], threads=1)
    ids = model.encode(LOOPING["qwen3"])
    plain, _ = _run(model, ids, 30, lookup=0)
    model.reset()
    stream = generate(model.engine, ids, Sampler(SamplingParams()), StopRule(30, frozenset()), lookup=4)
    head = [next(stream) for _ in range(13)]
    stream.close()  # e.g. a stop string matched, or the client went away
    assert head == plain[:13]
    cached = model.engine.tokens
    assert cached == (ids + plain)[: len(cached)] and len(cached) >= len(ids) + 12
    stats = Stats()
    rest = list(generate(model.engine, ids + head, Sampler(SamplingParams()), StopRule(17, frozenset()), stats))
    assert rest == plain[13:] and stats.reused_tokens == len(ids) + 12


def test_penalties_see_accepted_guesses_in_order(fp32_bundles) -> None:
    """Greedy with repetition/presence penalties: each pick's penalties include the guesses accepted before it
    in the same run, so the tokens equal a plain run's."""
    model = runtime.load(fp32_bundles["qwen2_tied"], threads=1)
    ids = model.encode(LOOPING["qwen2_tied"])
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5)
    plain, _ = _run(model, ids, 40, lookup=0, params=params)
    drafted, stats = _run(model, ids, 40, lookup=4, params=params)
    assert drafted == plain and stats.drafted_tokens > 0


def test_lookup_is_on_by_default_for_the_fast_graph_only(fp32_bundles, portable_fp32_bundles) -> None:
    fast = runtime.load(fp32_bundles["qwen3"], threads=1)
    portable = runtime.load(portable_fp32_bundles["qwen3"], threads=1)
    assert fast.max_lookup == portable.max_lookup == 7  # a window of 8 logits rows
    assert fast._lookup(None) == 4 and portable._lookup(None) == 0  # the portable cache rewinds by copying
    result = fast.generate(REPEATING, max_new_tokens=32, stop_token_ids=[])
    assert result.stats["lookup_drafted"] > 0
    off = fast.generate(REPEATING, max_new_tokens=32, stop_token_ids=[], lookup=0)
    assert off.stats["lookup_drafted"] == 0 and off.tokens == result.tokens


def test_lookup_is_off_by_default_where_the_cpu_kernels_compute_with_float_activations(int4_bundle,
                                                                                       int8_bundle) -> None:
    """int8 bundles compute with float activations on CPU (exact_accuracy_level 0), whose MatMulNBits costs
    ~3.5x as much at five rows as at one: drafts would slow decoding. int4 (level 4) keeps lookup on; asked
    for explicitly, it still runs on int8."""
    fast, exact = runtime.load(int4_bundle, threads=1), runtime.load(int8_bundle, threads=1)
    assert exact.manifest.quantization["plan"]["accuracy_level"] == 0
    assert fast._lookup(None) == 4 and exact._lookup(None) == 0
    assert exact.generate(REPEATING, max_new_tokens=24, stop_token_ids=[]).stats["lookup_drafted"] == 0
    asked = exact.generate(REPEATING, max_new_tokens=24, stop_token_ids=[], lookup=4)
    assert asked.stats["lookup_drafted"] > 0


def test_sampling_with_lookup_is_reproducible(fp32_bundles) -> None:
    model = runtime.load(fp32_bundles["qwen2_untied"], threads=1)
    ids = model.encode(REPEATING)
    params = SamplingParams(temperature=0.7, top_k=20, seed=11)
    a, stats = _run(model, ids, 40, lookup=4, params=params)
    b, _ = _run(model, ids, 40, lookup=4, params=params)
    c, _ = _run(model, ids, 40, lookup=4, params=SamplingParams(temperature=0.7, top_k=20, seed=12))
    assert a == b and stats.drafted_tokens > 0
    assert a != c


@pytest.mark.parametrize(("lookup", "pattern"), [
    (-1, r"lookup must be an integer >= 0 \(drafted tokens per step\), got -1"),
    (True, r"lookup must be an integer >= 0 .*got True"),
    (2.0, r"lookup must be an integer >= 0 .*got 2.0"),
    (8, r"lookup=8 is above this bundle's limit of 7 drafted tokens per step"),
])
def test_bad_lookup_values_name_the_option(fp32_bundles, lookup, pattern) -> None:
    model = runtime.load(fp32_bundles["qwen3"], threads=1)
    with pytest.raises(GenerationError, match=pattern):
        model.generate("hello", lookup=lookup)


def test_bundles_without_a_logits_window_refuse_lookup_but_generate(fp32_bundles, bundle_copy) -> None:
    """Bundles exported before the window returned one row per run: lookup is off, and asking for it says why."""
    folder = bundle_copy(fp32_bundles["qwen3"])
    manifest = json.loads((folder / "edgeqwen.json").read_text())
    del manifest["io"]["logits_window"]
    (folder / "edgeqwen.json").write_text(json.dumps(manifest))
    model = runtime.load(folder, threads=1, verify=False)
    assert model.max_lookup == 0 and model._lookup(None) == 0
    assert len(model.generate(REPEATING, max_new_tokens=8, stop_token_ids=[]).tokens) == 8
    with pytest.raises(GenerationError, match="returns logits for one position only.*re-export"):
        model.generate(REPEATING, lookup=2)
