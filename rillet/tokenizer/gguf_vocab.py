"""Rebuild a Hugging Face `tokenizers` tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no `tokenizer.json`: llama.cpp's converter stores the vocabulary, token types,
scores or merges and the special ids as metadata. This module turns that back into the JSON that
`tokenizers.Tokenizer.from_str` reads, laid out the way the model's own `tokenizer.json` (and
transformers' GGUF loader) lays it out, and caches the result: rebuilding Gemma 3's 262,144-token
vocabulary takes seconds, reading the cached JSON well under one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import tokenizers
from gguf import GGUFReader

from rillet.gguf_reader import open_gguf
from rillet.paths import cache_root
from rillet.tokenizer.tokenizer import TokenizerSettings

# Bump when the produced JSON changes, so stale cache entries are not reused.
CONVERTER_VERSION = 2

# gguf.TokenType, as llama.cpp's converter writes `tokenizer.ggml.token_type`.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

JsonDict = dict[str, Any]


@dataclass(frozen=True)
class GGUFVocab:
    """The `tokenizer.ggml.*` metadata of one file, as plain Python values."""

    architecture: str
    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float]
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    eot_token_id: int | None
    eom_token_id: int | None
    add_bos_token: bool | None
    add_eos_token: bool | None
    add_space_prefix: bool | None
    chat_template: str | None


def read_vocab(reader: GGUFReader) -> GGUFVocab:
    def get(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    tokens = get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{reader.data.filename}: no tokenizer.ggml.tokens in the GGUF metadata")
    return GGUFVocab(
        architecture=get("general.architecture") or "",
        model=get("tokenizer.ggml.model") or "llama",
        pre=get("tokenizer.ggml.pre") or "default",
        tokens=tokens,
        token_types=get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens),
        scores=get("tokenizer.ggml.scores") or [],
        merges=get("tokenizer.ggml.merges") or [],
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        unk_token_id=get("tokenizer.ggml.unknown_token_id"),
        eot_token_id=get("tokenizer.ggml.eot_token_id"),
        eom_token_id=get("tokenizer.ggml.eom_token_id"),
        add_bos_token=get("tokenizer.ggml.add_bos_token"),
        add_eos_token=get("tokenizer.ggml.add_eos_token"),
        add_space_prefix=get("tokenizer.ggml.add_space_prefix"),
        chat_template=get("tokenizer.chat_template"),
    )


# ---------------------------------------------------------------------------------------------
# SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`): BPE with byte fallback.


def _is_gemma(vocab: GGUFVocab) -> bool:
    return vocab.architecture.startswith("gemma")


def _sentencepiece_tokens(vocab: GGUFVocab) -> list[str]:
    # NOTE: Gemma's converter stores its user-defined runs of spaces as real spaces ("  "), but
    # its text reaches the model with spaces already turned into "▁"; spell them that way.
    if not _is_gemma(vocab):
        return list(vocab.tokens)
    return ["\u2581" * len(t) if " " in t and not t.strip() else t for t in vocab.tokens]


def _merge_ranks(vocab: GGUFVocab) -> list[float]:
    # NOTE: Gemma files carry no merges; a merge ranks by where its result sits in the file.
    # Gemma's scores give its user-defined tokens -1000, which would misplace them.
    if _is_gemma(vocab) or len(vocab.scores) != len(vocab.tokens):
        return [-float(i) for i in range(len(vocab.tokens))]
    return [float(s) for s in vocab.scores]


def merges_from_vocab(tokens: list[str], ranks: list[float]) -> list[list[str]]:
    """Every split of a token into two tokens, best-ranked result first.

    Ties are broken as transformers' `generate_merges` does (longer left piece first, then vocabulary
    order), so the same GGUF encodes identically here and there.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    rank_of = dict(zip(tokens, ranks))
    found: list[tuple[float, int, int, str, str]] = []
    for token, rank in rank_of.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))]
        local = sorted(
            ((left, right) for left, right in pairs if left in ids and right in ids),
            key=lambda pair: (ids[pair[0]], ids[pair[1]]),
        )
        found.extend((rank, len(left), len(right), left, right) for left, right in local)
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [[left, right] for _, _, _, left, right in found]


def _compact_merges(merges: list[list[str]]) -> list[str] | list[list[str]]:
    # NOTE: "left right" strings load ~40% faster than pairs; usable when no piece has a space.
    if any(" " in piece for pair in merges for piece in pair):
        return merges
    return [" ".join(pair) for pair in merges]


def _added_token(token_id: int, content: str, special: bool) -> JsonDict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _sentencepiece_added(vocab: GGUFVocab, model_vocab: dict[str, int]) -> list[JsonDict]:
    # Control tokens (<bos>, <start_of_turn>) are matched whole and are special; user-defined ones
    # ("\n\n", "<div>") are matched whole but decoded like text. A user-defined run of spaces was
    # respelled above and is reached through the merges instead, as transformers does.
    added = []
    for token_id, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind == CONTROL or (kind == USER_DEFINED and model_vocab.get(token) == token_id):
            added.append(_added_token(token_id, token, special=kind == CONTROL))
    return added


def _unk_token(vocab: GGUFVocab, tokens: list[str]) -> str | None:
    if vocab.unk_token_id is not None and vocab.unk_token_id < len(tokens):
        return tokens[vocab.unk_token_id]
    return "<unk>" if "<unk>" in tokens else None


def _sentencepiece_layout(vocab: GGUFVocab) -> JsonDict:
    """Normalizer, pre-tokenizer and decoder: Gemma's, or Llama's Metaspace one."""
    to_space: JsonDict = {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}
    steps = [to_space, {"type": "ByteFallback"}, {"type": "Fuse"}]
    if _is_gemma(vocab):
        return {
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            "pre_tokenizer": {
                "type": "Split",
                "pattern": {"String": " "},
                "behavior": "MergedWithPrevious",
                "invert": False,
            },
            "decoder": {"type": "Sequence", "decoders": steps},
        }
    prefix = True if vocab.add_space_prefix is None else vocab.add_space_prefix
    if prefix:
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Metaspace",
            "replacement": "\u2581",
            "prepend_scheme": "first" if prefix else "never",
            "split": False,
        },
        "decoder": {"type": "Sequence", "decoders": steps},
    }


def sentencepiece_json(vocab: GGUFVocab) -> JsonDict:
    tokens = _sentencepiece_tokens(vocab)
    model_vocab = {t: i for i, t in enumerate(tokens)}
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": _unk_token(vocab, tokens),
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": model_vocab,
        "merges": _compact_merges(merges_from_vocab(tokens, _merge_ranks(vocab))),
    }
    return _tokenizer_json(_sentencepiece_added(vocab, model_vocab), _sentencepiece_layout(vocab), model)


# ---------------------------------------------------------------------------------------------
# Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`).

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class ByteLevelPre(NamedTuple):
    """How one `tokenizer.ggml.pre` value splits and normalizes text before the merges."""

    split: str | None  # None: GPT-2's own regex inside the ByteLevel pre-tokenizer
    nfc: bool = False
    ignore_merges: bool = False  # a whole pre-token found in the vocabulary is kept as is
    add_bos_default: bool = False  # llama.cpp's default when the file has no add_bos_token


_LLAMA3 = ByteLevelPre(LLAMA3_SPLIT, ignore_merges=True, add_bos_default=True)
_QWEN2 = ByteLevelPre(QWEN2_SPLIT, nfc=True)
_GPT2 = ByteLevelPre(None)

BYTE_LEVEL_PRE: dict[str, ByteLevelPre] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "gpt-4o": ByteLevelPre(GPT4O_SPLIT),
    "llama4": ByteLevelPre(GPT4O_SPLIT),
}


def _byte_level_pre(vocab: GGUFVocab) -> ByteLevelPre:
    pre = BYTE_LEVEL_PRE.get(vocab.pre)
    if pre is None:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre={vocab.pre!r} is not supported; known: {sorted(BYTE_LEVEL_PRE)}"
        )
    return pre


def _byte_level_layout(pre: ByteLevelPre) -> JsonDict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    if pre.split is None:
        pre_tokenizer: JsonDict = dict(byte_level, use_regex=True)
    else:
        split = {"type": "Split", "pattern": {"Regex": pre.split}, "behavior": "Isolated", "invert": False}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, dict(byte_level, use_regex=False)]}
    return {
        "normalizer": {"type": "NFC"} if pre.nfc else None,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    }


def byte_level_json(vocab: GGUFVocab) -> JsonDict:
    # Control and user-defined tokens are stored as their raw text and live only among the added
    # tokens, as in the model's tokenizer.json; everything else is in the byte alphabet already.
    pre = _byte_level_pre(vocab)
    added, model_vocab = [], {}
    for token_id, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind in (CONTROL, USER_DEFINED):
            added.append(_added_token(token_id, token, special=kind == CONTROL))
        else:
            model_vocab[token] = token_id
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": pre.ignore_merges,
        "vocab": model_vocab,
        "merges": vocab.merges,
    }
    return _tokenizer_json(added, _byte_level_layout(pre), model)


def _tokenizer_json(added: list[JsonDict], layout: JsonDict, model: JsonDict) -> JsonDict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        **layout,
        "post_processor": None,  # BOS/EOS are added by rillet's Tokenizer from TokenizerSettings
        "model": model,
    }


BUILDERS: dict[str, Callable[[GGUFVocab], JsonDict]] = {
    "llama": sentencepiece_json,
    "gpt2": byte_level_json,
}


def tokenizer_json(vocab: GGUFVocab) -> str:
    builder = BUILDERS.get(vocab.model)
    if builder is None:
        raise ValueError(f"GGUF tokenizer.ggml.model={vocab.model!r} is not supported; known: {sorted(BUILDERS)}")
    return json.dumps(builder(vocab), ensure_ascii=False)


def settings(vocab: GGUFVocab) -> TokenizerSettings:
    if vocab.model == "gpt2":
        add_bos_default = _byte_level_pre(vocab).add_bos_default
    else:
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary by default
    extra = tuple(i for i in (vocab.eot_token_id, vocab.eom_token_id) if i is not None)
    return TokenizerSettings(
        bos_token_id=vocab.bos_token_id,
        eos_token_id=vocab.eos_token_id,
        extra_eos_token_ids=extra,
        add_bos_token=add_bos_default if vocab.add_bos_token is None else vocab.add_bos_token,
        add_eos_token=bool(vocab.add_eos_token),
        chat_template=vocab.chat_template,
    )


# ---------------------------------------------------------------------------------------------
# Cache: <cache dir>/<key>.json (tokenizer JSON) and <key>.settings.json.


def cache_dir() -> Path:
    return cache_root() / "tokenizers"


def cache_key(path: str | os.PathLike[str]) -> str:
    stat = os.stat(path)
    source = f"{CONVERTER_VERSION}|{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(source.encode()).hexdigest()[:32]


def _read_cached(key: str) -> tuple[tokenizers.Tokenizer, TokenizerSettings] | None:
    directory = cache_dir()
    try:
        raw = json.loads((directory / f"{key}.settings.json").read_text(encoding="utf-8"))
        backend = tokenizers.Tokenizer.from_file(str(directory / f"{key}.json"))
    except Exception:  # missing, partial or unreadable: rebuild it
        return None
    raw["extra_eos_token_ids"] = tuple(raw["extra_eos_token_ids"])
    return backend, TokenizerSettings(**raw)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_cached(key: str, text: str, found: TokenizerSettings) -> None:
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / f"{key}.json", text)
        # Written last: its presence marks a complete entry.
        _write_atomic(directory / f"{key}.settings.json", json.dumps(asdict(found)))
    except OSError:
        pass  # a read-only home only costs the next load its conversion time


def load(path_or_reader: str | os.PathLike[str] | GGUFReader) -> tuple[tokenizers.Tokenizer, TokenizerSettings]:
    """The tokenizer and settings of a GGUF file, from the cache when it has them.

    Given a path, a cache hit never opens the file with GGUFReader (which alone takes seconds on
    Gemma 3's metadata).
    """
    if isinstance(path_or_reader, GGUFReader):
        reader: GGUFReader | None = path_or_reader
        path = getattr(path_or_reader, "source_path", None) or str(path_or_reader.data.filename)
    else:
        reader, path = None, os.fspath(path_or_reader)
    key = cache_key(path)
    cached = _read_cached(key)
    if cached is not None:
        return cached
    vocab = read_vocab(reader if reader is not None else open_gguf(path))
    text, found = tokenizer_json(vocab), settings(vocab)
    _write_cached(key, text, found)
    return tokenizers.Tokenizer.from_str(text), found
