"""rillet's tokenizer: a `tokenizers.Tokenizer` plus the special-token facts a server needs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers

if TYPE_CHECKING:
    from gguf import GGUFReader

# Tokens that end a turn in the chat formats rillet knows. Like llama.cpp, stop on them whether or
# not the file lists them: Gemma's GGUF names only <eos>, yet its chat turns end in <end_of_turn>.
END_OF_TURN_TOKENS = frozenset(
    {
        "<end_of_turn>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<EOT>",
        "<end_of_utterance>",
    }
)


@dataclass(frozen=True)
class TokenizerSettings:
    """What a model's files say about special tokens, beyond the `tokenizers` pipeline itself."""

    bos_token_id: int | None
    eos_token_id: int | None
    extra_eos_token_ids: tuple[int, ...]  # eot/eom ids, generation_config's eos list
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


class Tokenizer:
    """Encode and decode text for one model.

    Attributes: `vocab_size`, `bos_token_id`, `eos_token_ids` (every id that ends generation),
    `chat_template`, `all_special_ids` (ids that `decode(..., skip_special_tokens=True)` drops) and
    `byte_fallback_ids` (SentencePiece `<0xNN>` tokens, empty for byte-level vocabularies).
    """

    def __init__(self, backend: tokenizers.Tokenizer, settings: TokenizerSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = settings.bos_token_id
        self.chat_template = settings.chat_template
        added = backend.get_added_tokens_decoder()
        self._added_ids = frozenset(added)
        self.all_special_ids = frozenset(i for i, token in added.items() if token.special)
        self.eos_token_ids = self._end_ids(settings)
        self.byte_fallback_ids = _byte_fallback_ids(backend)
        self._byte_level = b'"ByteLevel"' in _state(backend.decoder)

    def _end_ids(self, settings: TokenizerSettings) -> frozenset[int]:
        declared = {settings.eos_token_id, *settings.extra_eos_token_ids}
        named = {self.backend.token_to_id(name) for name in END_OF_TURN_TOKENS}
        return frozenset(i for i in declared | (named & self.all_special_ids) if i is not None)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike[str] | GGUFReader) -> Tokenizer:
        """Build from a GGUF file's metadata (cached on disk after the first load)."""
        from rillet.tokenizer import gguf_vocab

        return cls(*gguf_vocab.load(path_or_reader))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face model folder: tokenizer.json, tokenizer_config.json and,
        when present, generation_config.json and chat_template.jinja."""
        directory = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        return cls(backend, hf_settings(backend, directory))

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognized either way.

        With `add_special_tokens`, BOS/EOS are added as the model wants, but not when the text
        already starts with BOS (a rendered chat template often does) or ends with EOS.
        """
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if not add_special_tokens:
            return ids
        bos, eos = self.settings.bos_token_id, self.settings.eos_token_id
        if self.settings.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        if self.settings.add_eos_token and eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) or "" for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for in decoded text (before any leading-space strip)."""
        token = self.backend.id_to_token(token_id)
        if token is None:
            return b""
        if token_id in self._added_ids:
            return token.encode()
        if self._byte_level:
            table = byte_level_decoder()
            return b"".join(bytes([table[c]]) if c in table else c.encode() for c in token)
        if token_id in self.byte_fallback_ids:
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode()


def _state(component: Any) -> bytes:
    return b"" if component is None else bytes(component.__getstate__())


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    if not getattr(backend.model, "byte_fallback", False):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable stand-in character -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in kept}
    moved = [b for b in range(256) if chr(b) not in table]
    table.update({chr(256 + n): b for n, b in enumerate(moved)})
    return table


# -- Hugging Face folders -----------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_id(backend: tokenizers.Tokenizer, entry: Any) -> int | None:
    content = entry.get("content") if isinstance(entry, dict) else entry
    return backend.token_to_id(content) if isinstance(content, str) else None


def _post_processor_adds(backend: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """The ids tokenizer.json's post-processor puts before and after a sequence."""
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    found = _read_json(directory / "chat_template.json").get("chat_template")
    return found if isinstance(found, str) else None


def _generation_eos_ids(directory: Path) -> tuple[int, ...]:
    found = _read_json(directory / "generation_config.json").get("eos_token_id")
    ids = found if isinstance(found, list) else [found]
    return tuple(i for i in ids if isinstance(i, int))


def hf_settings(backend: tokenizers.Tokenizer, directory: Path) -> TokenizerSettings:
    config = _read_json(directory / "tokenizer_config.json")
    before, after = _post_processor_adds(backend)
    bos = _token_id(backend, config.get("bos_token"))
    eos = _token_id(backend, config.get("eos_token"))
    if bos is None and before:
        bos = before[0]
    add_bos = config.get("add_bos_token")
    add_eos = config.get("add_eos_token")
    return TokenizerSettings(
        bos_token_id=bos,
        eos_token_id=eos,
        extra_eos_token_ids=_generation_eos_ids(directory),
        add_bos_token=add_bos if isinstance(add_bos, bool) else bos is not None and bos in before,
        add_eos_token=add_eos if isinstance(add_eos, bool) else eos is not None and eos in after,
        chat_template=_chat_template(directory, config),
    )
