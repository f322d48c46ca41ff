"""Streaming text out of a token stream.

Two problems make "decode each new token and print it" wrong:

* Qwen's byte-level BPE splits a Chinese character or an emoji over several tokens; decoding one of
  those tokens alone gives U+FFFD replacement characters.
* Some decoders strip the leading space of the first token they see, so decoding tokens one by one
  loses the spaces between words.

``IncrementalDetokenizer`` fixes both by decoding a short window of recent tokens and emitting only
the new tail, once it ends on a complete character. ``StopMatcher`` then finds stop strings in the
streamed text, even when one arrives split over several pieces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from edgeqwen.errors import GenerationError

if TYPE_CHECKING:
    import tokenizers

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing token sequence into text pieces that never split a UTF-8 character (a Chinese
    char or emoji spread over several byte-level BPE tokens) and keeps the spaces that decoding
    single tokens loses.

    Two offsets into the token list track the window: text for ``tokens[prefix:read]`` has already
    been emitted and serves as left context; ``tokens[read:]`` is pending. Each ``add`` decodes both
    the context and the whole window and emits the difference, unless the window ends in an
    incomplete character (the decoded text ends with U+FFFD), in which case it waits for more tokens.
    The window stays a few tokens long, so each step costs O(1) regardless of the reply length.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._tokens: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # first token whose text has not been emitted yet

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._tokens[start:stop], skip_special_tokens=self._skip_special)

    def add(self, token: int) -> str:
        """Append a token; return the new text that is now final ("" while a character is incomplete)."""
        self._tokens.append(int(token))
        context = self._decode(self._prefix, self._read)
        window = self._decode(self._prefix)
        if len(window) <= len(context) or window.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return window[len(context) :]

    def flush(self) -> str:
        """Whatever text is still pending at the end (incomplete bytes come out as U+FFFD, as in decode)."""
        context = self._decode(self._prefix, self._read)
        window = self._decode(self._prefix)
        self._prefix = self._read = len(self._tokens)
        return window[len(context) :]

    @property
    def tokens(self) -> list[int]:
        """All tokens added so far (a copy)."""
        return list(self._tokens)


class StopMatcher:
    """Finds stop strings in streamed text, including ones that span several pieces; holds back only
    the tail that could still start a stop string.

    The tail held back is the longest suffix of the unsent text that is a proper prefix of some stop
    string: any earlier character cannot begin a match, so it is safe to emit at once.
    """

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        for i, stop in enumerate(stops):
            if not isinstance(stop, str) or not stop:
                raise GenerationError(
                    f"stop[{i}]={stop!r} is not a usable stop string; allowed: non-empty strings.",
                    "remove empty stop strings or pass non-empty text.",
                )
        self._stops = tuple(dict.fromkeys(stops))
        self._prefixes = {stop[:n] for stop in self._stops for n in range(1, len(stop))}
        self._longest_prefix = max((len(p) for p in self._prefixes), default=0)
        self._pending = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, piece: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped?). Emitted text excludes the stop string and all after it."""
        if self._stopped:
            return "", True
        if not self._stops:
            return piece, False
        text = self._pending + piece
        hits = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self._pending, self._stopped = "", True
            return text[: min(hits)], True
        hold = self._held_tail_length(text)
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def _held_tail_length(self, text: str) -> int:
        for n in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0

    def flush(self) -> str:
        """Release text held back at the end of the stream (nothing once a stop matched)."""
        out, self._pending = self._pending, ""
        return out
