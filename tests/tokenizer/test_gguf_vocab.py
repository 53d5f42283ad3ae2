"""GGUF tokenizer metadata -> `tokenizers` tokenizer, checked against the source tokenizer.json
(byte-level BPE) and against transformers' GGUF loader (SentencePiece)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gguf import GGUFReader

from rillet.tokenizer import Tokenizer, gguf_vocab
from tests.fixtures.gguf_tokenizer import BOS_TOKEN, EOS_TOKEN, EOT_TOKEN
from tests.tokenizer.conftest import write_bpe_gguf
from tests.tokenizer.samples import SAMPLES

BPE_EXTRA = ["<think>x</think>  indent here", "  indent", "<think><think>", "résumé straße"]


def _reference(tokenizer_json: Path):  # type: ignore[no-untyped-def]
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "default"])
def test_byte_level_gguf_encodes_like_tokenizer_json(bpe_dirs: dict[str, Path], pre: str) -> None:
    directory = bpe_dirs[pre]
    from_gguf = Tokenizer.from_gguf(directory / "tokenizer.gguf")
    from_hf = Tokenizer.from_hf_dir(directory)
    reference = _reference(directory / "tokenizer.json")
    for text in SAMPLES + BPE_EXTRA:
        bare = reference.encode(text, add_special_tokens=False)
        assert from_gguf.encode(text, add_special_tokens=False) == bare, text
        assert from_hf.encode(text, add_special_tokens=False) == bare, text
        full = reference.encode(text)
        if full[:2] == [from_hf.bos_token_id] * 2:
            full = full[1:]  # transformers adds a second BOS; rillet does not
        assert from_gguf.encode(text) == full, text
        assert from_hf.encode(text) == full, text
        for skip in (True, False):
            assert from_gguf.decode(full, skip) == reference.decode(full, skip_special_tokens=skip)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "default"])
def test_byte_level_gguf_special_tokens(bpe_dirs: dict[str, Path], pre: str) -> None:
    from_gguf = Tokenizer.from_gguf(bpe_dirs[pre] / "tokenizer.gguf")
    from_hf = Tokenizer.from_hf_dir(bpe_dirs[pre])
    ids = {name: from_gguf.backend.token_to_id(name) for name in (BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, "<think>")}
    assert from_gguf.vocab_size == from_hf.vocab_size == 514
    assert from_gguf.bos_token_id == from_hf.bos_token_id == ids[BOS_TOKEN]
    assert from_gguf.eos_token_ids == from_hf.eos_token_ids == {ids[EOS_TOKEN], ids[EOT_TOKEN]}
    assert from_gguf.all_special_ids == {ids[BOS_TOKEN], ids[EOS_TOKEN], ids[EOT_TOKEN]}
    assert ids["<think>"] not in from_gguf.all_special_ids
    assert from_gguf.settings.add_bos_token == from_hf.settings.add_bos_token == (pre != "qwen2")


def test_bos_is_added_once(bpe_tokenizer: Tokenizer) -> None:
    bos = bpe_tokenizer.bos_token_id
    assert bpe_tokenizer.encode("") == [bos]
    assert bpe_tokenizer.encode(f"{BOS_TOKEN}hi")[:2] != [bos, bos]
    assert bpe_tokenizer.encode(f"{BOS_TOKEN}hi") == [bos, *bpe_tokenizer.encode("hi", add_special_tokens=False)]


def test_token_bytes_concatenate_to_text(bpe_tokenizer: Tokenizer, sentencepiece_tokenizer: Tokenizer) -> None:
    text = "Hello wörld 日本語 🤖\n\tend"
    for tokenizer in (bpe_tokenizer, sentencepiece_tokenizer):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(tokenizer.token_bytes(i) for i in ids).decode() == text


@pytest.mark.parametrize("name", ["gemma.gguf", "llama.gguf"])
def test_sentencepiece_gguf_matches_transformers(sentencepiece_dir: Path, name: str) -> None:
    from transformers import AutoTokenizer

    ours = Tokenizer.from_gguf(sentencepiece_dir / name)
    reference = AutoTokenizer.from_pretrained(str(sentencepiece_dir), gguf_file=name)
    texts = [*SAMPLES, "hello world", " hello  world", "the\n\nworld\t<div>", "日本語 ü", "<start_of_turn>user\nhi"]
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, special) == reference.encode(text, add_special_tokens=special), text
        ids = reference.encode(text)
        assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)


def test_sentencepiece_special_tokens(sentencepiece_tokenizer: Tokenizer) -> None:
    tok = sentencepiece_tokenizer
    assert tok.bos_token_id == 2
    assert tok.eos_token_ids == {1, 6}  # <eos>, and <end_of_turn> found by name
    assert tok.all_special_ids == set(range(7))
    assert len(tok.byte_fallback_ids) == 256
    ids = tok.encode("<start_of_turn>hello<end_of_turn>\n", add_special_tokens=False)
    assert ids[0] == 5 and ids[-2:] == [6, 7]
    assert tok.decode(ids) == "hello\n"
    assert tok.decode(ids, skip_special_tokens=False) == "<start_of_turn>hello<end_of_turn>\n"


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path, bpe_dirs: dict[str, Path]) -> None:
    path = write_bpe_gguf(tmp_path / "odd.gguf", str(bpe_dirs["llama-bpe"] / "tokenizer.json"), "no-such-pre")
    with pytest.raises(ValueError, match="no-such-pre"):
        Tokenizer.from_gguf(path)


def test_cache_hit_skips_the_gguf_reader(
    tmp_path: Path, bpe_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RILLET_CACHE_DIR", str(tmp_path / "cache"))
    path = bpe_dirs["llama-bpe"] / "tokenizer.gguf"
    first = Tokenizer.from_gguf(GGUFReader(str(path)))
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 2

    class Refused(GGUFReader):
        def __init__(self, *args: object) -> None:
            raise AssertionError("expected a cache hit, without reading the GGUF")

    monkeypatch.setattr(gguf_vocab, "GGUFReader", Refused)
    second = Tokenizer.from_gguf(path)
    assert second.settings == first.settings
    assert second.encode(SAMPLES[5]) == first.encode(SAMPLES[5])


def test_cache_is_keyed_by_file_state(tmp_path: Path, bpe_dirs: dict[str, Path]) -> None:
    path = tmp_path / "t.gguf"
    path.write_bytes((bpe_dirs["llama-bpe"] / "tokenizer.gguf").read_bytes())
    key = gguf_vocab.cache_key(path)
    os.utime(path, ns=(0, 10**9))
    assert gguf_vocab.cache_key(path) != key


def test_corrupt_cache_entry_is_rebuilt(
    tmp_path: Path, bpe_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RILLET_CACHE_DIR", str(tmp_path))
    path = bpe_dirs["qwen2"] / "tokenizer.gguf"
    expected = Tokenizer.from_gguf(path).encode("hello")
    key = gguf_vocab.cache_key(path)
    (tmp_path / "tokenizers" / f"{key}.json").write_text("{not json", encoding="utf-8")
    assert Tokenizer.from_gguf(path).encode("hello") == expected
