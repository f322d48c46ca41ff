"""Sampling filters against hand-built rows and brute-force references; the Sampler's contract."""

from __future__ import annotations

import numpy as np
import pytest

from edgeqwen.errors import GenerationError
from edgeqwen.runtime.sampling import (
    Sampler,
    SamplingParams,
    apply_presence_frequency,
    apply_repetition_penalty,
    min_p_filter,
    softmax,
    top_k_filter,
    top_p_filter,
)


def kept(row: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(row)).tolist())


def log_probs(*probs: float) -> np.ndarray:
    return np.log(np.array(probs, dtype=np.float64)).astype(np.float32)


def random_row(rng: np.random.Generator, v: int) -> np.ndarray:
    """Random logits, sometimes with many exact ties and some -inf entries (already-filtered tokens)."""
    row = rng.normal(0, rng.uniform(0.5, 4), v).astype(np.float32)
    if rng.random() < 0.3:
        row = np.round(row).astype(np.float32)  # lots of ties
    if rng.random() < 0.3:
        row[rng.choice(v, v // 4, replace=False)] = -np.inf
    return row


# --------------------------------------------------------------------------------------------------
# softmax and top-k
# --------------------------------------------------------------------------------------------------


def test_softmax_sums_to_one_and_gives_minus_inf_zero():
    p = softmax(np.array([1.0, -np.inf, 3.0, 1000.0], dtype=np.float32))
    assert p.dtype == np.float32
    assert p[1] == 0.0
    assert abs(float(p.sum()) - 1.0) < 1e-6


@pytest.mark.parametrize(
    "k, expected",
    [(1, {1, 3}), (2, {1, 3}), (3, {1, 2, 3}), (5, set(range(5))), (9, set(range(5))), (0, set(range(5)))],
)
def test_top_k_keeps_the_k_best_and_boundary_ties(k, expected):
    row = np.array([1.0, 5.0, 3.0, 5.0, 2.0], dtype=np.float32)
    out = top_k_filter(row, k)
    assert kept(out) == expected
    assert np.array_equal(out[list(expected)], row[list(expected)])  # survivors untouched
    assert np.array_equal(row, [1.0, 5.0, 3.0, 5.0, 2.0])  # input not modified


def full_partition_top_k(row: np.ndarray, k: int) -> set[int]:
    """The plain definition: entries >= the k-th largest as np.partition ranks them (NaN above every number)."""
    kth = np.partition(row, row.size - k)[row.size - k]
    return set(np.flatnonzero(row >= kth).tolist())


@pytest.mark.parametrize("seed", range(7))
def test_top_k_on_a_vocabulary_sized_row_equals_a_full_sort(seed):
    """Rows as wide as Qwen's vocabulary take the chunked bound; the set must be a full sort's, ties included."""
    rng = np.random.default_rng(seed)
    row = random_row(rng, 151_936)
    if seed == 5:  # the best entries packed into one chunk: the bound is far below the k-th largest
        row[1000:1100] = 50.0 + np.arange(100, dtype=np.float32) % 7
    if seed == 6:  # the best entries in the 384-entry tail past the last whole 512-wide chunk
        row[-300:] = 60.0 + np.arange(300, dtype=np.float32) % 11
    for k in (1, 20, 50, 74):  # 74: the largest k the bound serves (296 chunks >= 4k)
        kth = np.sort(row)[::-1][k - 1]
        assert kept(top_k_filter(row, k)) == set(np.flatnonzero(row >= kth).tolist()), k


@pytest.mark.parametrize("where", [7, 151_935, None])
def test_top_k_with_nan_in_the_row_ranks_it_as_the_full_partition_does(where):
    row = np.random.default_rng(0).normal(size=151_936).astype(np.float32)
    if where is None:
        row[::512] = np.nan  # a NaN in every chunk
    else:
        row[where] = np.nan  # one, in a chunk or in the tail
    for k in (1, 20):
        out = top_k_filter(row, k)  # NaN takes one of the k places and is itself dropped, as in a full partition
        assert set(np.flatnonzero(~np.isneginf(out)).tolist()) == full_partition_top_k(row, k)
    if where is not None:  # the case the chunk bound got wrong: it skipped the NaN and kept 20
        assert len(full_partition_top_k(row, 20)) == 19


# --------------------------------------------------------------------------------------------------
# top-p
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, expected",
    [(0.01, {0}), (0.49, {0}), (0.6, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (0.97, {0, 1, 2, 3}),
     (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_set_reaching_p(p, expected):
    row = log_probs(0.15, 0.05, 0.5, 0.3)[[2, 3, 0, 1]]  # probs 0.5, 0.3, 0.15, 0.05 by index
    assert kept(top_p_filter(row, p)) == expected


def test_top_p_always_keeps_at_least_the_top_token():
    row = np.array([0.0, 10.0, 0.0], dtype=np.float32)
    assert kept(top_p_filter(row, 1e-9)) == {1}


def test_top_p_keeps_tokens_tied_with_the_last_one_kept():
    row = np.array([2.0, 0.0, 2.0, -1.0], dtype=np.float32)  # two tied tops, ~0.44 each
    assert kept(top_p_filter(row, 0.3)) == {0, 2}


def reference_top_p(row: np.ndarray, p: float) -> set[int]:
    """Definition by full sort: smallest prefix reaching p; ties with its last token kept too."""
    probs = softmax(row)
    ordered = np.sort(probs)[::-1]
    cum = np.cumsum(ordered, dtype=np.float64)
    reach = np.flatnonzero(cum >= p)
    if len(reach) == 0:
        return set(np.flatnonzero(probs > 0).tolist())
    return set(np.flatnonzero(probs >= ordered[reach[0]]).tolist())


def test_top_p_matches_full_sort_reference_on_random_rows():
    rng = np.random.default_rng(1234)
    for _ in range(300):
        v = int(rng.choice([2, 7, 300, 3000]))
        row = random_row(rng, v)
        p = float(rng.choice([rng.uniform(0.01, 1.0), 0.8, 0.95, 0.999]))
        assert kept(top_p_filter(row, p)) == reference_top_p(row, p), (v, p)


def test_top_p_grows_the_candidate_set_for_flat_distributions():
    rng = np.random.default_rng(7)
    row = rng.normal(0, 0.01, 20_000).astype(np.float32)  # nearly uniform: needs ~18k candidates
    out = top_p_filter(row, 0.9)
    assert kept(out) == reference_top_p(row, 0.9)
    assert len(kept(out)) > 10_000


# --------------------------------------------------------------------------------------------------
# min-p
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p, expected", [(0.0, set(range(5))), (0.15, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0})])
def test_min_p_keeps_tokens_above_fraction_of_top_prob(p, expected):
    row = log_probs(0.5, 0.3, 0.1, 0.06, 0.04)  # threshold 0.5 * p
    assert kept(min_p_filter(row, p)) == expected


def test_min_p_matches_probability_reference_on_random_rows():
    rng = np.random.default_rng(99)
    for _ in range(200):
        row = random_row(rng, 500)
        p = float(rng.uniform(0.001, 0.999))
        probs = softmax(row).astype(np.float64)
        expected = set(np.flatnonzero(probs >= p * probs.max()).tolist())
        assert kept(min_p_filter(row, p)) == expected


# --------------------------------------------------------------------------------------------------
# penalties
# --------------------------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits_only():
    row = np.array([2.0, -2.0, 4.0, -1.0, 0.0], dtype=np.float32)
    out = apply_repetition_penalty(row, np.array([0, 1, 4]), 2.0)
    assert np.array_equal(out, [1.0, -4.0, 4.0, -1.0, 0.0])
    assert np.array_equal(row, [2.0, -2.0, 4.0, -1.0, 0.0])  # input not modified


def test_presence_and_frequency_subtract_per_generated_token():
    row = np.zeros(5, dtype=np.float32)
    out = apply_presence_frequency(row, np.array([1, 3]), np.array([1, 3]), presence=0.5, frequency=0.25)
    assert np.allclose(out, [0.0, -0.75, 0.0, -1.25, 0.0])


def test_sampler_penalties_cover_prompt_and_generated_ids():
    logits = np.array([5.0, 4.0, 3.0, -1.0], dtype=np.float32)
    # repetition: prompt token 0 drops 5 -> 2.5, so token 1 wins greedy
    s = Sampler(SamplingParams(repetition_penalty=2.0), prompt_tokens=[0, 0, 3])
    assert s.pick(logits) == 1
    s.observe(1)  # 4 -> 2: now token 2 (3.0) wins
    assert s.pick(logits) == 2


def test_sampler_frequency_penalty_counts_generated_tokens_not_prompt():
    logits = np.array([3.0, 2.0, 0.0], dtype=np.float32)
    s = Sampler(SamplingParams(frequency_penalty=0.6), prompt_tokens=[0, 0, 0])
    assert s.pick(logits) == 0  # prompt does not count
    s.observe(0)
    assert s.pick(logits) == 0  # 3 - 0.6 = 2.4 > 2
    s.observe(0)
    assert s.pick(logits) == 1  # 3 - 1.2 = 1.8 < 2


def test_sampler_presence_penalty_applies_once_per_token():
    logits = np.array([3.0, 2.5, 0.0], dtype=np.float32)
    s = Sampler(SamplingParams(presence_penalty=0.4))
    s.observe(0)
    assert s.pick(logits) == 0  # 2.6 > 2.5
    s.observe(0)
    assert s.pick(logits) == 0  # still 2.6: presence does not grow with count


def test_sampler_history_grows_past_initial_capacity():
    s = Sampler(SamplingParams(repetition_penalty=1.5), prompt_tokens=range(1000))
    for t in range(1000, 1600):
        s.observe(t)
    logits = np.full(2000, 1.0, dtype=np.float32)
    logits[1999] = 0.9
    logits[1599] = 1.2  # seen: 1.2 / 1.5 = 0.8
    assert s.pick(logits) == 1600  # first unseen 1.0


# --------------------------------------------------------------------------------------------------
# Sampler: greedy, seeds, filters
# --------------------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_returns_python_int():
    row = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    token = Sampler(SamplingParams()).pick(row)
    assert type(token) is int and token == int(np.argmax(row))


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-45])
def test_temperature_to_zero_equals_argmax(temperature):
    rng = np.random.default_rng(5)
    s = Sampler(SamplingParams(temperature=temperature, seed=1))
    for _ in range(20):
        row = rng.normal(size=5000).astype(np.float32)
        assert s.pick(row) == int(np.argmax(row))


def draws(params: SamplingParams, n: int = 200, v: int = 2000) -> list[int]:
    rows = np.random.default_rng(42).normal(0, 2, (n, v)).astype(np.float32)
    s = Sampler(params)
    return [s.pick(row) for row in rows]


def test_same_seed_same_samples_different_seed_different():
    a = draws(SamplingParams(temperature=1.0, seed=3))
    assert a == draws(SamplingParams(temperature=1.0, seed=3))
    assert a != draws(SamplingParams(temperature=1.0, seed=4))
    filtered = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.01, seed=11)
    assert draws(filtered) == draws(filtered)


def test_samples_come_only_from_tokens_all_filters_keep():
    rng = np.random.default_rng(8)
    row = rng.normal(0, 3, 3000).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.7, min_p=0.05, seed=0)
    scaled = (row - row.max()) / np.float32(0.8)
    allowed = kept(min_p_filter(top_p_filter(top_k_filter(scaled, 40), 0.7), 0.05))
    s = Sampler(params)
    seen = {s.pick(row) for _ in range(2000)}
    assert seen <= allowed
    assert len(seen) > 1


def test_sample_frequencies_follow_probabilities():
    row = log_probs(0.6, 0.3, 0.1)
    s = Sampler(SamplingParams(temperature=1.0, seed=123))
    counts = np.bincount([s.pick(row) for _ in range(20_000)], minlength=3) / 20_000
    assert np.allclose(counts, [0.6, 0.3, 0.1], atol=0.015)


def test_pick_rejects_a_batch_of_rows():
    with pytest.raises(GenerationError, match="shape"):
        Sampler(SamplingParams(temperature=1.0)).pick(np.zeros((2, 10), dtype=np.float32))


# --------------------------------------------------------------------------------------------------
# Validation and generation_config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -3),
        ("frequency_penalty", 2.01),
        ("seed", -1),
        ("seed", 1.5),
    ],
)
def test_bad_parameters_raise_generation_error_naming_field(field, value):
    with pytest.raises(GenerationError, match=field) as info:
        SamplingParams(**{field: value}).validate()
    assert repr(value) in str(info.value) or str(value) in str(info.value)
    with pytest.raises(GenerationError, match=field):
        Sampler(SamplingParams(**{field: value}))


def test_filter_functions_validate_their_argument():
    row = np.zeros(4, dtype=np.float32)
    with pytest.raises(GenerationError, match="top_k"):
        top_k_filter(row, -1)
    with pytest.raises(GenerationError, match="top_p"):
        top_p_filter(row, 0.0)
    with pytest.raises(GenerationError, match="min_p"):
        min_p_filter(row, 1.0)


def test_valid_edges_are_accepted():
    SamplingParams(temperature=0, top_p=1.0, min_p=0.0, presence_penalty=-2, frequency_penalty=2).validate()
    SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), seed=np.int64(7)).validate()


def test_from_generation_config_reads_qwen_config():
    cfg = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    p = SamplingParams.from_generation_config(cfg)
    assert p == SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    assert not p.greedy


def test_from_generation_config_greedy_defaults_and_overrides():
    p = SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.7, "top_k": 20})
    assert p.greedy and p.top_k == 20
    assert SamplingParams.from_generation_config({}).greedy  # HF: do_sample defaults to False
    assert SamplingParams.from_generation_config({"do_sample": True}).top_k == 50  # HF default
    assert SamplingParams.from_generation_config({"do_sample": True, "top_k": None}).top_k == 0
    cfg = {"do_sample": True, "temperature": 0.7, "top_p": 0.8}
    p = SamplingParams.from_generation_config(cfg, temperature=None, top_p=0.5, seed=9)
    assert (p.temperature, p.top_p, p.seed) == (0.7, 0.5, 9)
    assert SamplingParams.from_generation_config(cfg, temperature=0).greedy
    with pytest.raises(GenerationError, match="top_q"):
        SamplingParams.from_generation_config(cfg, top_q=0.5)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams.from_generation_config({"do_sample": True, "top_p": 0})


# ----------------------------------------------------------------------------------- drafted tokens


def _frequencies(params: SamplingParams, logits: np.ndarray, draft: int, n: int = 20000) -> np.ndarray:
    sampler = Sampler(params)
    picks = np.array([sampler.pick_or_accept(logits, draft) for _ in range(n)])
    return np.bincount(picks, minlength=len(logits)) / n


@pytest.mark.parametrize("draft", [0, 1, 3, 5])
def test_accepting_a_draft_keeps_the_sampling_distribution(draft):
    """Speculative sampling with a fixed guess: every token keeps its probability, whatever the guess."""
    p = np.array([0.45, 0.3, 0.15, 0.07, 0.03, 0.0])
    logits = np.log(np.maximum(p, 1e-30)).astype(np.float32)
    freq = _frequencies(SamplingParams(temperature=1.0, top_k=0, seed=7), logits, draft)
    np.testing.assert_allclose(freq, p, atol=0.012)  # 20,000 draws: 4 standard deviations at p = 0.45
    assert freq[5] == 0  # a token without mass is never returned, even when it is the guess


def test_a_draft_outside_the_filters_is_never_accepted():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p).astype(np.float32)
    freq = _frequencies(SamplingParams(temperature=1.0, top_k=2, seed=3), logits, draft=2)
    assert freq[2] == 0 and freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.625, 0.375], atol=0.012)  # top-2, renormalised


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_p=0.7, seed=5),
    SamplingParams(temperature=1.3, min_p=0.1, seed=6),
    SamplingParams(temperature=0.9, top_k=4, top_p=0.9, repetition_penalty=1.4, presence_penalty=0.3, seed=8),
], ids=["top_p", "min_p", "penalties+filters"])
@pytest.mark.parametrize("draft", [1, 4, -1, 99])
def test_accepting_a_draft_matches_pick_under_every_filter(params, draft):
    """pick_or_accept's frequencies equal pick's for the same row and history (drafts off the vocabulary too)."""
    logits = np.array([2.0, 1.6, 1.5, 0.9, 0.4, -0.3, -1.0, 0.0], np.float32)
    seen = [1, 3]

    def frequencies(fn) -> np.ndarray:
        sampler = Sampler(params, prompt_tokens=seen)
        for t in seen:
            sampler.observe(t)
        return np.bincount([fn(sampler) for _ in range(20000)], minlength=len(logits)) / 20000

    expected = frequencies(lambda s: s.pick(logits))
    got = frequencies(lambda s: s.pick_or_accept(logits, draft))
    np.testing.assert_allclose(got, expected, atol=0.015)
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(expected))  # filtered tokens stay out


def test_greedy_accepts_exactly_the_argmax_and_penalties_apply():
    logits = np.array([0.1, 2.0, 1.9, -1.0], np.float32)
    sampler = Sampler(SamplingParams())
    assert [sampler.pick_or_accept(logits, d) for d in range(4)] == [1, 1, 1, 1]
    penalised = Sampler(SamplingParams(repetition_penalty=1.5), prompt_tokens=[1])
    assert penalised.pick_or_accept(logits, 1) == 2  # 2.0 / 1.5 < 1.9: the guess loses to the penalty
