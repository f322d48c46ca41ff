"""Choosing the next token from one row of logits.

The filters are small pure functions over a 1-D float32 row (vocabulary size V, 151,936 for Qwen), so
each can be tested against a brute-force reference. ``Sampler`` strings them together in the order HF
transformers uses (penalties, temperature, top-k, top-p, min-p) and owns the random generator, so the
same seed replays the same text.

Speed matters because ``Sampler.pick`` runs once per generated token on a small CPU:

* greedy decoding without penalties is a single ``argmax``;
* penalties touch only the ids already seen, kept in arrays that ``observe`` grows (no history rescans);
* top-p never sorts the vocabulary: it partitions out a candidate set and doubles it until the set
  holds mass ``p``, which gives exactly the result of a full sort;
* after each filter ``pick`` carries on with the survivors only, so later steps work on a few hundred
  entries instead of V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any, Mapping, Sequence

import numpy as np

from edgeqwen.errors import GenerationError

_NEG_INF = np.float32(-np.inf)
_TOP_P_FIRST_CANDIDATES = 256  # enough to hold p=0.8..0.95 of a chat model's distribution almost always

# HF GenerationConfig defaults, used for keys a generation_config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def _out_of_range(name: str, value: object, allowed: str) -> GenerationError:
    return GenerationError(
        f"Sampling parameter {name}={value!r} is out of range; allowed: {allowed}.",
        f"pass {name} within {allowed}.",
    )


def _real(name: str, value: object, allowed: str) -> float:
    """Accept ints and floats (numpy ones too) but not bools, NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise _out_of_range(name, value, allowed)
    return float(value)


def _integer(name: str, value: object, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _out_of_range(name, value, allowed)
    return int(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into a token. Defaults mean plain greedy decoding.

    The penalty semantics follow the two conventions users already know: ``repetition_penalty`` is HF's
    (divide positive logits, multiply negative ones, for every token in prompt and reply), while
    ``presence_penalty`` and ``frequency_penalty`` are OpenAI's (subtract from generated tokens only).
    """

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off; (0, 1]
    min_p: float = 0.0  # 0 = off; [0, 1)
    repetition_penalty: float = 1.0  # > 0; 1 = off
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    seed: int | None = None

    def validate(self) -> SamplingParams:
        """Raise GenerationError naming the first bad field; return self so calls can chain."""
        t = _real("temperature", self.temperature, ">= 0 (0 = greedy)")
        if t < 0:
            raise _out_of_range("temperature", self.temperature, ">= 0 (0 = greedy)")
        if _integer("top_k", self.top_k, "an integer >= 0 (0 = off)") < 0:
            raise _out_of_range("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not 0.0 < _real("top_p", self.top_p, "(0, 1] (1 = off)") <= 1.0:
            raise _out_of_range("top_p", self.top_p, "(0, 1] (1 = off)")
        if not 0.0 <= _real("min_p", self.min_p, "[0, 1) (0 = off)") < 1.0:
            raise _out_of_range("min_p", self.min_p, "[0, 1) (0 = off)")
        if _real("repetition_penalty", self.repetition_penalty, "> 0 (1 = off)") <= 0:
            raise _out_of_range("repetition_penalty", self.repetition_penalty, "> 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= _real(name, value, "[-2, 2] (0 = off)") <= 2.0:
                raise _out_of_range(name, value, "[-2, 2] (0 = off)")
        if self.seed is not None and _integer("seed", self.seed, "None or an integer >= 0") < 0:
            raise _out_of_range("seed", self.seed, "None or an integer >= 0")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> SamplingParams:
        """Read a HF ``generation_config.json`` dict, then apply the caller's overrides.

        Keys the file leaves out take HF's defaults (notably ``top_k=50``), and an explicit ``null``
        turns a filter off, so a bundle samples the way ``transformers`` would. ``do_sample`` false (or
        absent, HF's default) means greedy unless the caller overrides ``temperature``. Overrides whose
        value is None are ignored, so a CLI can pass every flag through unconditionally.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise GenerationError(
                f"Unknown sampling parameter(s): {', '.join(unknown)}.",
                f"use only {', '.join(sorted(names))}.",
            )
        values: dict[str, Any] = {}
        for key, default in _HF_DEFAULTS.items():
            value = cfg.get(key, default)
            values[key] = cls.__dataclass_fields__[key].default if value is None else value
        if not cfg.get("do_sample", False):
            values["temperature"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()


# --------------------------------------------------------------------------------------------------
# Pure functions over one row
# --------------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities (float32) of a row; -inf entries get exactly 0."""
    e = np.asarray(logits, dtype=np.float32) - np.max(logits)
    np.exp(e, out=e)
    e /= e.sum()
    return e


def apply_repetition_penalty(logits: np.ndarray, token_ids: np.ndarray, penalty: float) -> np.ndarray:
    """HF repetition penalty: for each seen id, divide a positive logit by ``penalty``, multiply a
    negative one, so that ``penalty > 1`` always makes the token less likely."""
    out = np.array(logits, dtype=np.float32)
    if penalty == 1.0 or len(token_ids) == 0:
        return out
    seen = out[token_ids]
    out[token_ids] = np.where(seen < 0, seen * np.float32(penalty), seen / np.float32(penalty))
    return out


def apply_presence_frequency(
    logits: np.ndarray, token_ids: np.ndarray, counts: np.ndarray, presence: float, frequency: float
) -> np.ndarray:
    """OpenAI penalties: ``logit -= count * frequency + presence`` for each distinct generated id.

    ``token_ids`` must be distinct and ``counts`` (how often each was generated) at least 1.
    """
    out = np.array(logits, dtype=np.float32)
    if len(token_ids) == 0 or (presence == 0 and frequency == 0):
        return out
    out[token_ids] -= np.asarray(counts, dtype=np.float32) * np.float32(frequency) + np.float32(presence)
    return out


_TOP_K_CHUNK = 512  # _keep_top_k: the vocabulary is cut into chunks this wide for a first, cheap bound


def _keep_top_k(row: np.ndarray, k: int) -> np.ndarray | None:
    """Indices whose logit is >= the k-th largest (ties at the boundary all kept, as in HF); None = all.

    A partition of the whole 151,936-entry row took ~1 ms a token, 5-7% of a decode step on the 0.5B. The
    k-th largest of the chunks' maxima is a lower bound of the row's k-th largest (those k maxima are k
    entries at least that large), so every entry of the answer is among the few that reach the bound, and
    the k-th largest is found there (~0.07 ms). Same set, same order.
    """
    n = row.shape[0]
    if k <= 0 or k >= n:
        return None
    chunks = n // _TOP_K_CHUNK
    if chunks >= 4 * k:
        maxima = row[: chunks * _TOP_K_CHUNK].reshape(chunks, _TOP_K_CHUNK).max(axis=1)  # NaN if a chunk has one
        if not (np.isnan(maxima).any() or np.isnan(row[chunks * _TOP_K_CHUNK :]).any()):
            bound = np.partition(maxima, chunks - k)[chunks - k]
            near = np.flatnonzero(row >= bound)  # the tail past the last whole chunk is compared too
            values = row[near]
            kth = np.partition(values, len(near) - k)[len(near) - k]
            return near[values >= kth]
    # small rows, large k, or NaN (which np.partition ranks above every number, so each NaN takes a place)
    kth = np.partition(row, n - k)[n - k]
    return np.flatnonzero(row >= kth)


def _keep_top_p(row: np.ndarray, p: float) -> np.ndarray | None:
    """Indices of the smallest most-probable set with cumulative probability >= p; None = all.

    The set is found among the ``m`` largest probabilities, ``m`` doubling from 256 until those
    candidates reach mass p. A prefix of the sorted candidates is a prefix of the fully sorted row,
    so the answer is exact. Tokens tied with the last one kept are kept too, which makes the result
    independent of how ties happen to be ordered.
    """
    n = row.shape[0]
    if p >= 1.0 or n <= 1:
        return None
    probs = softmax(row)
    m = min(_TOP_P_FIRST_CANDIDATES, n)
    while True:
        top = np.partition(probs, n - m)[n - m :] if m < n else probs.copy()
        top[::-1].sort()  # descending, in place
        cum = np.cumsum(top, dtype=np.float64)
        i = int(np.searchsorted(cum, p))  # first position where the running mass reaches p
        if i < m:
            return np.flatnonzero(probs >= top[i])
        if m == n:  # float rounding left the total just under p: keep everything possible
            return np.flatnonzero(probs > 0)
        m = min(2 * m, n)


def _keep_min_p(row: np.ndarray, p: float) -> np.ndarray | None:
    """Indices with prob >= p * max prob; None = all.

    Compared in log space (``logit >= max_logit + log p``), which is the same set without a softmax.
    """
    if p <= 0.0:
        return None
    return np.flatnonzero(row >= np.max(row) + np.float32(math.log(p)))


def _masked(logits: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """A float32 copy of ``logits`` with every index not in ``keep`` set to -inf."""
    if keep is None:
        return np.array(logits, dtype=np.float32)
    out = np.full(logits.shape, _NEG_INF, dtype=np.float32)
    out[keep] = logits[keep]
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k highest logits (and any tied with the k-th); k = 0 keeps all."""
    if _integer("top_k", k, "an integer >= 0 (0 = off)") < 0:
        raise _out_of_range("top_k", k, "an integer >= 0 (0 = off)")
    return _masked(logits, _keep_top_k(logits, int(k)))


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest most-probable set whose mass is >= p (at least one token)."""
    if not 0.0 < _real("top_p", p, "(0, 1] (1 = off)") <= 1.0:
        raise _out_of_range("top_p", p, "(0, 1] (1 = off)")
    return _masked(logits, _keep_top_p(logits, float(p)))


def min_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep tokens whose probability is at least ``p`` times the top token's; p = 0 keeps all."""
    if not 0.0 <= _real("min_p", p, "[0, 1) (0 = off)") < 1.0:
        raise _out_of_range("min_p", p, "[0, 1) (0 = off)")
    return _masked(logits, _keep_min_p(logits, float(p)))


def _draw(row: np.ndarray, rng: np.random.Generator) -> int:
    """Sample an index of ``row`` in proportion to softmax(row) by inverting the CDF."""
    probs = softmax(row)
    cdf = np.cumsum(probs, dtype=np.float64)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if i >= len(cdf):  # u rounded up onto the total: take the last token that has any mass
        i = int(np.flatnonzero(probs)[-1])
    return i


# --------------------------------------------------------------------------------------------------
# Stateful sampler
# --------------------------------------------------------------------------------------------------


class _TokenCounts:
    """Distinct token ids with how often each occurred, in arrays that penalties index directly.

    Adding a token is O(1) (a dict lookup and one array write), so penalties never rescan history.
    """

    def __init__(self, capacity: int = 256):
        self._slot: dict[int, int] = {}
        self._ids = np.empty(capacity, dtype=np.int64)
        self._counts = np.zeros(capacity, dtype=np.float32)

    def add(self, token: int) -> None:
        slot = self._slot.get(token)
        if slot is None:
            slot = len(self._slot)
            if slot == len(self._ids):
                self._ids = np.concatenate([self._ids, np.empty_like(self._ids)])
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            self._slot[token] = slot
            self._ids[slot] = token
        self._counts[slot] += 1

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: len(self._slot)]

    @property
    def counts(self) -> np.ndarray:
        return self._counts[: len(self._slot)]


class Sampler:
    """Picks tokens for one generation: holds the penalty history and the seeded random generator.

    Call ``pick`` with each step's logits, then ``observe`` with the token actually appended (the
    decode loop may override a pick, e.g. to force an end token), so penalties see the real text.
    """

    def __init__(self, params: SamplingParams, prompt_tokens: Sequence[int] = ()):
        self.params = params.validate()
        self._rng = np.random.Generator(np.random.PCG64(params.seed))
        self._use_repetition = params.repetition_penalty != 1.0
        self._use_presence_frequency = params.presence_penalty != 0 or params.frequency_penalty != 0
        self._argmax_only = params.greedy and not (self._use_repetition or self._use_presence_frequency)
        self._seen = _TokenCounts()  # prompt + generated: repetition_penalty
        self._generated = _TokenCounts()  # generated only: presence/frequency penalties
        if self._use_repetition:
            for token in np.unique(np.asarray(prompt_tokens, dtype=np.int64)):
                self._seen.add(int(token))

    def observe(self, token: int) -> None:
        """Record a generated token for the penalties."""
        token = int(token)
        if self._use_repetition:
            self._seen.add(token)
        if self._use_presence_frequency:
            self._generated.add(token)

    def pick(self, logits: np.ndarray) -> int:
        """The next token id for one row of logits (shape [V])."""
        if self._argmax_only:
            return int(np.argmax(logits))
        row, ids = self._candidates(logits)
        if ids is _GREEDY:
            return int(np.argmax(row))
        j = _draw(row, self._rng)
        return j if ids is None else int(ids[j])

    def pick_or_accept(self, logits: np.ndarray, draft: int) -> int:
        """The next token, given a drafted guess for it (prompt lookup): the draft when it is accepted.

        Greedy: the draft is accepted exactly when it is the argmax, so the text is the one ``pick`` gives.
        Sampling: accepted with probability p(draft), else a token drawn from p with the draft removed and
        the rest renormalised. P(token = x) is then p(x) for every x: speculative sampling with a
        deterministic draft, so the output follows the same distribution as ``pick`` (another random
        stream, so a seed replays lookup runs and plain runs each, not one as the other).
        """
        if self._argmax_only:
            return int(np.argmax(logits))
        row, ids = self._candidates(logits)
        if ids is _GREEDY:
            return int(np.argmax(row))
        at = np.flatnonzero(ids == draft) if ids is not None else [draft] if 0 <= draft < len(row) else []
        if len(at):
            p_draft = float(softmax(row)[at[0]])
            if p_draft > 0 and self._rng.random() < p_draft:
                return int(draft)
            row = row.copy()
            row[at[0]] = _NEG_INF
            if not np.isfinite(row).any():  # the draft held all the mass yet was rejected: float rounding only
                return int(draft)
        j = _draw(row, self._rng)
        return j if ids is None else int(ids[j])

    def _candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Penalised, tempered and filtered logits, with the vocabulary ids of their entries (None: all V;
        ``_GREEDY``: temperature 0, so only the argmax of the penalised row matters)."""
        if logits.ndim != 1:
            raise GenerationError(
                f"Sampler.pick expects one row of logits (shape [V]); got shape {logits.shape}.",
                "pass logits[0, -1] for a [batch, seq, V] output.",
            )
        p = self.params
        row = logits
        if self._use_repetition:
            row = apply_repetition_penalty(row, self._seen.ids, p.repetition_penalty)
        if self._use_presence_frequency:
            row = apply_presence_frequency(
                row, self._generated.ids, self._generated.counts, p.presence_penalty, p.frequency_penalty
            )
        if p.greedy:
            return row, _GREEDY

        # Shift so the maximum is 0 before dividing: no filter cares about the shift, and a tiny
        # temperature then sends the rest to -inf instead of overflowing. The clamp keeps float32
        # from rounding the temperature itself to 0.
        row = np.asarray(row, dtype=np.float32) - np.max(row)
        with np.errstate(over="ignore"):  # overflowing to -inf is the intended outcome
            row /= np.float32(max(p.temperature, float(np.finfo(np.float32).tiny)))

        # Each filter returns the survivors' positions; later steps see only those entries, and
        # `ids` maps positions back to vocabulary ids (None while nothing has been dropped).
        ids: np.ndarray | None = None
        for keep_fn, arg in ((_keep_top_k, p.top_k), (_keep_top_p, p.top_p), (_keep_min_p, p.min_p)):
            keep = keep_fn(row, arg)
            if keep is not None:
                row = row[keep]
                ids = keep if ids is None else ids[keep]
        return row, ids


_GREEDY = np.empty(0, dtype=np.int64)  # marker returned by Sampler._candidates for temperature 0
