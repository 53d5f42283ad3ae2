"""Tokenizers for the tokenizer tests: tiny ones built here, and the embedded Gemma 3 one."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import pytest

from rillet.tokenizer import Tokenizer
from tests.fixtures.gguf_tokenizer import BOS_TOKEN, EOS_TOKEN, add_tokenizer_metadata, build_tiny_bpe_tokenizer

USER_CACHE_DIR = os.environ.get("RILLET_CACHE_DIR")

# Control tokens by architecture, with (bos, eos, unk, pad) ids; Llama's are named as its own are.
SP_SPECIAL = {
    "gemma3": (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"], (2, 1, 3, 0)),
    "llama": (["<unk>", "<s>", "</s>", "<pad>", "<mask>", "<start_of_turn>", "<end_of_turn>"], (1, 2, 0, 3)),
}
SP_USER_DEFINED = ["\n", "\n\n", "  ", "   ", "\t", "<div>"]
SP_NORMAL = [
    "\u2581", "\u2581t", "in", "\u2581a", "er", "on", "\u2581th", "\u2581the", "he", "ll", "llo", "\u2581he",
    "\u2581hello", "or", "\u2581w", "\u2581wor", "ld", "\u2581world", "\u2581\u2581", "é", "日本", "\u2581日",
    *"abcdefghijklmnopqrstuvwxyzéüñ日本語",
    *("\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"),
]  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Tiny tokenizers live in temporary files; keep their cache entries out of the user's cache.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RILLET_CACHE_DIR", str(tmp_path_factory.mktemp("rillet_cache")))
        yield


def write_gguf(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch=arch)
    add_metadata(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_bpe_gguf(path: Path, tokenizer_json: str, pre: str) -> Path:
    hf = Tokenizer.from_hf_dir(Path(tokenizer_json).parent)
    bos, eos = hf.backend.token_to_id(BOS_TOKEN), hf.backend.token_to_id(EOS_TOKEN)
    return write_gguf(path, "llama", lambda w: add_tokenizer_metadata(w, tokenizer_json, pre, bos, eos))


def write_sentencepiece_gguf(path: Path, arch: str, add_space_prefix: bool) -> Path:
    """A small SentencePiece-style vocabulary laid out like Gemma 3's (control, user-defined,
    256 byte tokens, then normal pieces best-first)."""
    special, (bos, eos, unk, pad) = SP_SPECIAL[arch]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = special + SP_USER_DEFINED + byte_tokens + SP_NORMAL
    types = [3] * len(special) + [4] * len(SP_USER_DEFINED) + [6] * 256 + [1] * len(SP_NORMAL)
    scores = [-1000.0] * (len(special) + len(SP_USER_DEFINED)) + [0.0] * 256
    scores += [-float(i) for i in range(len(SP_NORMAL))]

    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(bos)
        writer.add_eos_token_id(eos)
        writer.add_unk_token_id(unk)
        writer.add_pad_token_id(pad)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(add_space_prefix)

    return write_gguf(path, arch, add)


@pytest.fixture(scope="session")
def bpe_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """pre -> folder with a tiny trained tokenizer.json, tokenizer_config.json and tokenizer.gguf."""
    root = tmp_path_factory.mktemp("bpe")
    dirs = {}
    for pre in ("llama-bpe", "qwen2", "default"):
        tokenizer_json = build_tiny_bpe_tokenizer(root / pre, pre=pre, user_defined_tokens=["<think>", "  indent"])
        write_bpe_gguf(root / pre / "tokenizer.gguf", tokenizer_json, pre)
        dirs[pre] = root / pre
    return dirs


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_dirs: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_gguf(bpe_dirs["llama-bpe"] / "tokenizer.gguf")


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sentencepiece")
    write_sentencepiece_gguf(root / "gemma.gguf", "gemma3", add_space_prefix=False)
    write_sentencepiece_gguf(root / "llama.gguf", "llama", add_space_prefix=True)
    return root


@pytest.fixture(scope="session")
def sentencepiece_tokenizer(sentencepiece_dir: Path) -> Tokenizer:
    return Tokenizer.from_gguf(sentencepiece_dir / "gemma.gguf")


@pytest.fixture(scope="session")
def gemma_path(default_model_path: Path) -> Path:
    return default_model_path


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_path: Path) -> Tokenizer:
    # The user's cache, as in real use: converted once, then loaded from there on reruns.
    with pytest.MonkeyPatch.context() as patch:
        if USER_CACHE_DIR is None:
            patch.delenv("RILLET_CACHE_DIR")
        else:
            patch.setenv("RILLET_CACHE_DIR", USER_CACHE_DIR)
        return Tokenizer.from_gguf(gemma_path)
