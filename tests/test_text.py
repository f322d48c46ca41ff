"""Streaming detokenization with a real byte-level BPE tokenizer trained here, and stop matching."""

from __future__ import annotations

import itertools
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgeqwen.errors import GenerationError
from edgeqwen.runtime.text import IncrementalDetokenizer, StopMatcher

ENGLISH = "the model runs on a small board with int4 weights and fast cache".split()
CHINESE = ["你好", "世界", "模型", "运行", "在", "小型", "设备", "上", "量化", "缓存", "速度", "很快"]
EMOJI = ["😀", "🚀", "🎉", "👍🏽", "🇨🇳", "❤️", "🤖", "✨"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus(n: int = 400) -> list[str]:
    rnd = random.Random(0)
    words = ENGLISH + CHINESE + EMOJI
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="session")
def byte_level() -> Tokenizer:
    """A small Qwen-like tokenizer: byte-level BPE, so rare characters split into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


@pytest.fixture(scope="session")
def metaspace() -> Tokenizer:
    """A SentencePiece-style tokenizer, whose decoder drops the leading space of the first token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    return tok


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


TEXTS = {
    "english": "the model runs on a small board with int4 weights and a fast cache.",
    "chinese": "你好，世界！模型在小型设备上运行，量化缓存速度很快。罕见字：龘靐齉",
    "emoji": "launch 🚀🚀 done 🎉 thumbs 👍🏽 flag 🇨🇳 love ❤️ robot🤖✨ and 🦄🧪🪐",
    "mixed": "Qwen 说：你好 😀 world\n\n  indented   spaces\tand tabs 世界🚀end",
}


@pytest.mark.parametrize("name", list(TEXTS))
def test_streamed_pieces_equal_full_decode(byte_level, name):
    ids = byte_level.encode(TEXTS[name]).ids
    pieces = stream(byte_level, ids)
    assert "".join(pieces) == byte_level.decode(ids) == TEXTS[name]
    assert not any("\ufffd" in piece for piece in pieces)


def test_the_test_is_meaningful_single_tokens_break_characters(byte_level):
    ids = byte_level.encode(TEXTS["emoji"] + TEXTS["chinese"]).ids
    assert any("\ufffd" in byte_level.decode([i]) for i in ids)


def test_random_token_sequences_match_decode(byte_level):
    """Arbitrary ids (as a bad sampler might produce) still concatenate to exactly decode()."""
    rnd = random.Random(1)
    vocab = byte_level.get_vocab_size()
    for _ in range(50):
        ids = [rnd.randrange(vocab) for _ in range(rnd.randint(1, 40))]
        for skip in (True, False):
            assert "".join(stream(byte_level, ids, skip)) == byte_level.decode(ids, skip_special_tokens=skip)


def test_incomplete_character_waits_for_the_rest(byte_level):
    ids = byte_level.encode("🦄").ids
    assert len(ids) > 1  # the unicorn is not in the tiny vocabulary: one token per byte group
    detok = IncrementalDetokenizer(byte_level)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🦄"
    assert detok.flush() == ""


def test_flush_returns_unfinished_bytes_like_decode(byte_level):
    ids = byte_level.encode("ok 🦄").ids[:-1]  # cut the emoji short
    pieces = stream(byte_level, ids)
    assert "".join(pieces) == byte_level.decode(ids)
    assert pieces[-1].endswith("\ufffd")  # only flush may carry the replacement character


def test_special_tokens_skipped_or_kept(byte_level):
    im_end = byte_level.token_to_id("<|im_end|>")
    ids = byte_level.encode("你好 world").ids + [im_end]
    assert "".join(stream(byte_level, ids, True)) == "你好 world"
    assert "".join(stream(byte_level, ids, False)) == byte_level.decode(ids, skip_special_tokens=False)
    assert "".join(stream(byte_level, ids, False)).endswith("<|im_end|>")


def test_spaces_kept_with_a_decoder_that_strips_the_first_space(metaspace):
    text = "the model runs on a small board"
    ids = metaspace.encode(text).ids
    assert metaspace.decode(ids[1:2])[:1] != " "  # decoding one token alone loses its space
    pieces = stream(metaspace, ids)
    assert "".join(pieces) == metaspace.decode(ids) == text


# --------------------------------------------------------------------------------------------------
# StopMatcher
# --------------------------------------------------------------------------------------------------


def run_stops(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    m = StopMatcher(stops)
    out, stopped = [], False
    for piece in pieces:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            break
    return out, stopped, m.flush()


def test_stop_spanning_several_pieces():
    out, stopped, rest = run_stops(["<|im_end|>"], ["Hello wor", "ld<|im", "_e", "nd|>ignored", "more"])
    assert stopped and "".join(out) == "Hello world" and rest == ""
    assert out == ["Hello wor", "ld", "", ""]


def test_nothing_after_the_stop_is_emitted_and_feed_after_stop_is_empty():
    m = StopMatcher(["STOP"])
    assert m.feed("abcSTOPdef") == ("abc", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_earliest_stop_wins_among_several():
    assert StopMatcher(["world", "lo w"]).feed("hello world") == ("hel", True)
    assert StopMatcher(["\n\n", "User:"]).feed("a\nUser: b\n\n") == ("a\n", True)


def test_holds_back_only_a_possible_stop_prefix():
    m = StopMatcher(["</answer>"])
    assert m.feed("x < y and </an") == ("x < y and ", False)  # "<" alone is emitted once it cannot start
    assert m.feed("swer") == ("", False)
    assert m.feed("ed") == ("</answered", False)  # it was not the stop after all
    m = StopMatcher(["abc"])
    assert m.feed("xxab") == ("xx", False)
    assert m.feed("ab") == ("ab", False)  # "abab": only the last "ab" can still start "abc"
    assert m.feed("c!") == ("", True)


def test_flush_releases_held_text_when_no_stop_matched():
    out, stopped, rest = run_stops(["###"], ["answer #", "#"])
    assert not stopped and "".join(out) == "answer " and rest == "##"


def test_streaming_equals_one_shot_for_every_split():
    text, stops = "今天天气很好。\n\nUser: bye", ["\n\nUser:", "Assistant:"]
    expected = text[: text.index("\n\nUser:")]
    for cut1, cut2 in itertools.combinations(range(1, len(text)), 2):
        pieces = [text[:cut1], text[cut1:cut2], text[cut2:]]
        out, stopped, rest = run_stops(stops, pieces)
        assert stopped and "".join(out) + rest == expected


def test_no_stops_passes_text_through():
    m = StopMatcher([])
    assert m.feed("anything <|im_end|>") == ("anything <|im_end|>", False)
    assert m.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(GenerationError, match="stop"):
        StopMatcher(["ok", ""])
