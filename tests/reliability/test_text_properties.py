"""The detokenizer and the stop-string matcher over 10,000 cases: no U+FFFD from a character split
across tokens, and no stop string (nor anything after it) ever reaches a client, however the
tokens are chunked into steps."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rillet.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.tokenizer.test_detokenizer import REPLACEMENT, cut_lists, first_stop, stream, texts, to_stops

NUM_CASES_PER_TOKENIZER = 5000  # two tokenizers: 10,000 cases
# Characters of every UTF-8 length; stop strings are drawn from the text or from this alphabet.
ALPHABET = "ab cé日🤖\nüñ語"


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    name = "bpe_tokenizer" if request.param == "byte_level" else "sentencepiece_tokenizer"
    found: Tokenizer = request.getfixturevalue(name)
    return found


@settings(max_examples=NUM_CASES_PER_TOKENIZER, deadline=None)
@given(text=texts(40, ALPHABET), prompt_text=texts(6, ALPHABET), raw_stops=st.binary(max_size=15), cuts=cut_lists)
def test_no_split_characters_and_no_stop_string_leaks(
    tokenizer: Tokenizer, text: str, prompt_text: str, raw_stops: bytes, cuts: list[int]
) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    stops = to_stops(raw_stops, ALPHABET, source=text)  # none in about one case in five
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt_text), stop=stops)
    deltas = stream(detok, ids, cuts)
    shown = "".join(deltas)
    assert not any(REPLACEMENT in delta for delta in deltas)
    expected, stop = first_stop(text, stops)
    assert shown == detok.text == expected  # the text before the first stop string, nothing after it
    assert detok.matched_stop == stop
    assert not any(s in shown for s in stops)
