"""Prompt lookup: draft the next tokens by finding the recent text earlier in the conversation.

Small models on CPU spend a decode step reading every weight once for one token; reading them once for a
few tokens costs little more (on the 0.5B int4 at 2 threads: 22.4 ms for 1 token, 25.6 for 2, 30.0 for
4). Code answers, edits of a pasted file, JSON and quoted documents repeat what is already in the context,
so the tokens that followed the last occurrence of the current n-gram are good guesses. The decode loop
(``generate.py``) runs the last token plus the guesses in one step and keeps the guesses the model
agrees with; the sampler decides agreement (``Sampler.pick_or_accept``), so greedy text is unchanged and
sampled text keeps its distribution. This is the "prompt lookup decoding" of transformers and llama.cpp's
lookup decoding, with no draft model.

``NgramIndex`` maps each n-gram (n = 1..``max_ngram``) of the token history to the position after its
latest occurrence; appending a token updates it in O(max_ngram), so a 4,000-token conversation costs no
rescans. ``DraftLength`` adapts how many tokens to guess: one more after a run where all were accepted,
one more than were accepted otherwise, so text that does not repeat costs almost nothing.
"""

from __future__ import annotations

from typing import Sequence

DEFAULT_MAX_DRAFT = 4  # guesses per step
MAX_DRAFT = 7  # the exported graphs return logits for up to 8 positions (export/graph.py LOGITS_WINDOW)


class NgramIndex:
    """Where each recent n-gram of ``tokens`` last occurred, for proposing what followed it."""

    def __init__(self, tokens: Sequence[int] = (), *, min_ngram: int = 1, max_ngram: int = 3):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it last
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        """Add a token: the n-grams ending just before it now point at it."""
        toks = self.tokens
        end = len(toks)
        for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
            self._after[tuple(toks[end - n : end])] = end
        toks.append(int(token))

    def propose(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest n-gram matching the end of the history."""
        toks = self.tokens
        if limit <= 0:
            return []
        for n in range(min(self.max_ngram, len(toks)), self.min_ngram - 1, -1):
            at = self._after.get(tuple(toks[len(toks) - n :]))
            if at is not None:
                return toks[at : at + limit]
        return []


class DraftLength:
    """How many tokens to draft next: grows while drafts are accepted, shrinks to what was accepted."""

    def __init__(self, maximum: int = DEFAULT_MAX_DRAFT):
        self.maximum = maximum
        self.current = maximum

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:  # a draft cut short (end of the match, max_new_tokens) says nothing against more
            self.current = min(self.maximum, max(self.current, accepted + 1))
        else:
            self.current = max(1, accepted + 1)
