"""The embedded Gemma 3 270M GGUF: rillet's tokenizer against transformers' on the same file."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rillet.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.tokenizer.samples import SAMPLES
from tests.tokenizer.test_detokenizer import TEXT_ALPHABET, cut_lists, stream, texts, to_ids

START_OF_TURN, END_OF_TURN, NEWLINE = 105, 106, 107


@pytest.fixture(scope="module")
def reference(gemma_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name)


def test_special_tokens(gemma_tokenizer: Tokenizer) -> None:
    tok = gemma_tokenizer
    assert tok.vocab_size == 262_144
    assert tok.bos_token_id == 2
    assert tok.eos_token_ids == {1, END_OF_TURN}  # the file names <eos>; <end_of_turn> ends chat turns
    assert {0, 1, 2, 3, 4, START_OF_TURN, END_OF_TURN} <= tok.all_special_ids
    assert NEWLINE not in tok.all_special_ids  # user-defined: matched whole, decoded as text
    assert len(tok.byte_fallback_ids) == 256
    assert tok.chat_template is None  # this GGUF carries none


@pytest.mark.slow  # transformers takes 20-40 s to build its tokenizer from this GGUF
def test_encode_matches_transformers(gemma_tokenizer: Tokenizer, reference: Any) -> None:
    for text in SAMPLES:
        for special in (True, False):
            expected = reference.encode(text, add_special_tokens=special)
            assert gemma_tokenizer.encode(text, special) == expected, text


@pytest.mark.slow
def test_decode_matches_transformers(gemma_tokenizer: Tokenizer, reference: Any) -> None:
    rng = random.Random(0)
    byte_ids = sorted(gemma_tokenizer.byte_fallback_ids)
    id_lists = [reference.encode(text) for text in SAMPLES]
    id_lists += [[rng.randrange(262_144) for _ in range(50)] for _ in range(20)]
    id_lists += [[rng.choice(byte_ids + [START_OF_TURN, 9259]) for _ in range(30)] for _ in range(20)]
    for ids in id_lists:
        assert gemma_tokenizer.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
        for skip in (True, False):
            assert gemma_tokenizer.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip)


def test_chat_markup(gemma_tokenizer: Tokenizer) -> None:
    tok = gemma_tokenizer
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    assert ids[:4] == [2, START_OF_TURN, tok.encode("user", False)[0], NEWLINE]
    assert ids.count(START_OF_TURN) == 2 and END_OF_TURN in ids
    assert tok.encode("<bos>hi") == [2, *tok.encode("hi", False)]  # BOS never doubled
    assert tok.decode(ids) == "user\nhi\nmodel\n"


def test_whitespace_runs(gemma_tokenizer: Tokenizer) -> None:
    tok = gemma_tokenizer
    assert tok.encode("\n" * 3, False) == [109]  # user-defined newline runs are matched whole
    assert tok.encode("  ", False) == [138]  # space runs are reached through the merges
    for text in (" " * 40, "\n" * 40, "\t" * 40, "a" + " " * 33 + "b"):
        ids = tok.encode(text, False)
        assert tok.decode(ids) == text and b"".join(map(tok.token_bytes, ids)).decode() == text


@settings(max_examples=300, deadline=None)
@given(raw_ids=st.binary(max_size=48), text=texts(20, TEXT_ALPHABET + "Z€ 𝔹"), cuts=cut_lists)
def test_detokenizer_streams_gemma_output(
    gemma_tokenizer: Tokenizer, raw_ids: bytes, text: str, cuts: list[int]
) -> None:
    tok = gemma_tokenizer
    for ids in (to_ids(tok, raw_ids), tok.encode(text, add_special_tokens=False)):
        prompt = tok.encode("<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n")
        deltas = stream(IncrementalDetokenizer(tok, prompt), ids, cuts)
        assert "".join(deltas) == tok.decode(ids)
    assert "\ufffd" not in "".join(deltas)
