"""Streaming detokenization and stop strings: properties over random ids, text and chunking."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rillet.tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer

REPLACEMENT = "\ufffd"
TEXT_ALPHABET = "ab cé日🤖\n\t"  # ASCII, 2-, 3- and 4-byte characters, whitespace


def first_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """The oracle, by brute force: cut before the stop string in the shortest prefix holding one."""
    for end in range(len(text) + 1):
        found = [(end - len(s), s) for s in stops if s and text[:end].endswith(s)]
        if found:
            start, stop = min(found)
            return text[:start], stop
    return text, None


def stream(detok: IncrementalDetokenizer, ids: list[int], cuts: list[int]) -> list[str]:
    """Push `ids` in chunks of the sizes in `cuts` (the rest in one), then flush."""
    deltas, pos = [], 0
    for size in cuts:
        deltas.append(detok.push(ids[pos : pos + size]))
        pos += size
    deltas.append(detok.push(ids[pos:]))
    deltas.append(detok.flush())
    return deltas


# Strategies draw raw bytes and map them: Hypothesis generates bytes several times faster than
# lists of ints or text, which keeps 10,000+ examples to seconds.


@functools.cache
def id_pool(tokenizer: Tokenizer) -> list[int]:
    """Ids to draw from, weighted toward the ones that make decoding hard: bytes, special, added."""
    awkward = sorted(tokenizer.byte_fallback_ids | tokenizer.all_special_ids)[:2000] + list(range(300))
    return awkward + list(range(tokenizer.vocab_size))


def to_ids(tokenizer: Tokenizer, raw: bytes) -> list[int]:
    pool = id_pool(tokenizer)
    width = 2 if len(pool) <= 1 << 16 else 3
    numbers = (int.from_bytes(raw[i : i + width], "little") for i in range(0, len(raw) - width + 1, width))
    return [pool[n % len(pool)] for n in numbers]


def to_text(raw: bytes, alphabet: str = TEXT_ALPHABET) -> str:
    return "".join(alphabet[b % len(alphabet)] for b in raw)


def to_stops(raw: bytes, alphabet: str, source: str = "") -> list[str]:
    """Up to three stop strings of 1-4 characters; with `source`, some are pieces of it."""
    stops: list[str] = []
    i = 0
    while i + 1 < len(raw) and len(stops) < 3:
        size, pick = 1 + raw[i] % 4, raw[i + 1]
        if source and pick % 2:
            start = pick % len(source)
            stops.append(source[start : start + size])
        else:
            stops.append(to_text(raw[i + 1 : i + 1 + size], alphabet))
        i += 1 + size
    return stops


def texts(max_size: int, alphabet: str = TEXT_ALPHABET) -> st.SearchStrategy[str]:
    return st.binary(max_size=max_size).map(lambda raw: to_text(raw, alphabet))


cut_lists = st.binary(max_size=16).map(lambda raw: [1 + b % 4 for b in raw])

STOP_ALPHABET = "ab c\n"


@pytest.fixture(scope="session", params=["byte_level", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    name = "bpe_tokenizer" if request.param == "byte_level" else "sentencepiece_tokenizer"
    found: Tokenizer = request.getfixturevalue(name)
    return found


# -- properties (11,000 examples) -----------------------------------------------------------------


@settings(max_examples=3000, deadline=None)
@given(text=texts(30, STOP_ALPHABET), raw_stops=st.binary(max_size=12), cuts=cut_lists)
def test_stop_matcher_matches_oracle_whatever_the_chunking(text: str, raw_stops: bytes, cuts: list[int]) -> None:
    stops = to_stops(raw_stops, STOP_ALPHABET)
    matcher = StopMatcher(stops)
    shown, pos = [], 0
    for size in [*cuts, len(text)]:
        shown.append(matcher.feed(text[pos : pos + size]))
        pos += size
    if not matcher.stopped:
        shown.append(matcher.flush())
    expected, stop = first_stop(text, stops)
    assert "".join(shown) == expected
    assert matcher.matched == stop
    assert not any(s in "".join(shown) for s in stops)


@settings(max_examples=2000, deadline=None)
@given(raw_ids=st.binary(max_size=48), raw_prompt=st.binary(max_size=12), cuts=cut_lists)
def test_deltas_concatenate_to_full_decode(
    tokenizer: Tokenizer, raw_ids: bytes, raw_prompt: bytes, cuts: list[int]
) -> None:
    ids, prompt = to_ids(tokenizer, raw_ids), to_ids(tokenizer, raw_prompt)
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        deltas = stream(detok, ids, cuts)
        assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=skip)
        assert not detok.stopped


@settings(max_examples=1000, deadline=None)
@given(text=texts(30), prompt_text=texts(6), cuts=cut_lists)
def test_no_replacement_characters_from_split_characters(
    tokenizer: Tokenizer, text: str, prompt_text: str, cuts: list[int]
) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt_text)), ids, cuts)
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert "".join(deltas) == text


@settings(max_examples=1000, deadline=None)
@given(raw_ids=st.binary(max_size=48), raw_stops=st.binary(max_size=15), cuts=cut_lists)
def test_stop_strings_are_never_leaked(
    tokenizer: Tokenizer, raw_ids: bytes, raw_stops: bytes, cuts: list[int]
) -> None:
    ids = to_ids(tokenizer, raw_ids)
    full = tokenizer.decode(ids)
    stops = to_stops(raw_stops, TEXT_ALPHABET, source=full)
    detok = IncrementalDetokenizer(tokenizer, [], stop=stops)
    deltas = stream(detok, ids, cuts)
    expected, stop = first_stop(full, stops)
    assert "".join(deltas) == detok.text == expected
    assert detok.matched_stop == stop and detok.stopped == (stop is not None)
    assert not any(s and s in detok.text for s in stops)


# -- examples -----------------------------------------------------------------------------------


def push_each(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push([i]) for i in ids]


def test_character_split_over_byte_level_tokens_waits_for_its_last_byte(bpe_tokenizer: Tokenizer) -> None:
    single = {bpe_tokenizer.token_bytes(i): i for i in range(bpe_tokenizer.vocab_size)}
    robot = [single[bytes([b])] for b in "🤖".encode()]
    detok = IncrementalDetokenizer(bpe_tokenizer, [])
    assert push_each(detok, [single[b"a"], *robot, single[b"b"]]) == ["a", "", "", "", "🤖", "b"]


def test_sentencepiece_byte_run_is_held_until_it_ends(sentencepiece_tokenizer: Tokenizer) -> None:
    tok = sentencepiece_tokenizer
    robot = tok.encode("🤖", add_special_tokens=False)
    assert len(robot) == 4 and set(robot) <= tok.byte_fallback_ids
    detok = IncrementalDetokenizer(tok, tok.encode("hello"))
    world = tok.encode(" world", add_special_tokens=False)
    assert push_each(detok, [*robot, *world]) == ["", "", "", "", "🤖 world"]
    assert detok.flush() == ""


def test_invalid_byte_run_decodes_as_the_full_decode_does(sentencepiece_tokenizer: Tokenizer) -> None:
    tok = sentencepiece_tokenizer
    robot = tok.encode("🤖", add_special_tokens=False)
    lone = tok.backend.token_to_id("<0xFF>")  # never valid in UTF-8
    assert lone is not None
    ids = [*robot, lone, *tok.encode("a", False)]
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(push_each(detok, ids)) + detok.flush() == tok.decode(ids) == REPLACEMENT * 5 + "a"


def test_leading_spaces_survive_mid_stream(sentencepiece_tokenizer: Tokenizer) -> None:
    tok = sentencepiece_tokenizer
    ids = tok.encode(" the  hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    assert "".join(push_each(detok, ids)) == " the  hello world"


def test_stripping_decoder_keeps_the_space_after_the_prompt(sentencepiece_dir: Path) -> None:
    tok = Tokenizer.from_gguf(sentencepiece_dir / "llama.gguf")
    world = tok.encode("hello world", add_special_tokens=False)[1:]
    assert tok.decode(world) == "world"  # Llama 2's decoder strips a leading space
    detok = IncrementalDetokenizer(tok, tok.encode("hello"))
    assert "".join(push_each(detok, world)) == " world"


def test_stop_string_across_tokens(bpe_tokenizer: Tokenizer) -> None:
    ids = bpe_tokenizer.encode("Hello world, and more", add_special_tokens=False)
    detok = IncrementalDetokenizer(bpe_tokenizer, [], stop=["o w", "zzz"])
    deltas = push_each(detok, ids)
    assert "".join(deltas) == detok.text == "Hell"
    assert detok.stopped and detok.matched_stop == "o w"
    assert detok.push(ids) == "" and detok.flush() == ""


def test_held_back_stop_prefix_is_released_at_the_end(bpe_tokenizer: Tokenizer) -> None:
    ids = bpe_tokenizer.encode("see you lat", add_special_tokens=False)
    detok = IncrementalDetokenizer(bpe_tokenizer, [], stop=["later!"])
    assert "".join(push_each(detok, ids)) == "see you "
    assert detok.flush() == "lat"
    assert not detok.stopped and detok.text == "see you lat"


def test_special_tokens_are_dropped_or_shown(sentencepiece_tokenizer: Tokenizer) -> None:
    tok = sentencepiece_tokenizer
    ids = tok.encode("hi<end_of_turn>", add_special_tokens=False)
    for skip, expected in ((True, "hi"), (False, "hi<end_of_turn>")):
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        assert "".join(push_each(detok, ids)) + detok.flush() == expected


def test_each_step_decodes_a_small_window(bpe_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    decode = bpe_tokenizer.decode

    def recording(ids: list[int], skip_special_tokens: bool = True) -> str:
        sizes.append(len(ids))
        return decode(ids, skip_special_tokens)

    monkeypatch.setattr(bpe_tokenizer, "decode", recording)
    text = "Streaming text, with accents (é), CJK (日本) and emoji (🤖). " * 40
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(bpe_tokenizer, bpe_tokenizer.encode("prompt " * 100))
    assert "".join(push_each(detok, ids)) + detok.flush() == text
    assert len(ids) > 1000 and max(sizes) <= 8
