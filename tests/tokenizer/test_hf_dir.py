"""Tokenizer.from_hf_dir: what it reads from tokenizer_config.json and its neighbours."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from rillet.tokenizer import Tokenizer
from tests.fixtures.gguf_tokenizer import BOS_TOKEN, EOS_TOKEN, EOT_TOKEN

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture
def hf_dir(tmp_path: Path, bpe_dirs: dict[str, Path]) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bpe_dirs["llama-bpe"] / name, directory / name)
    return directory


def update_config(directory: Path, **changes: Any) -> None:
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_reads_special_tokens(hf_dir: Path) -> None:
    tok = Tokenizer.from_hf_dir(hf_dir)
    ids = {name: tok.backend.token_to_id(name) for name in (BOS_TOKEN, EOS_TOKEN, EOT_TOKEN)}
    assert tok.bos_token_id == ids[BOS_TOKEN]
    assert tok.eos_token_ids == {ids[EOS_TOKEN], ids[EOT_TOKEN]}
    assert tok.encode("hi")[0] == ids[BOS_TOKEN]
    assert tok.chat_template is None


def test_token_entries_may_be_objects(hf_dir: Path) -> None:
    update_config(hf_dir, bos_token={"content": BOS_TOKEN, "special": True}, eos_token={"content": EOT_TOKEN})
    tok = Tokenizer.from_hf_dir(hf_dir)
    assert tok.bos_token_id == tok.backend.token_to_id(BOS_TOKEN)
    assert tok.settings.eos_token_id == tok.backend.token_to_id(EOT_TOKEN)


def test_add_bos_token_false_wins_over_the_post_processor(hf_dir: Path) -> None:
    update_config(hf_dir, add_bos_token=False)
    tok = Tokenizer.from_hf_dir(hf_dir)
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


def test_post_processor_decides_when_the_config_is_silent(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    del config["add_bos_token"], config["bos_token"]
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_dir(hf_dir)
    assert tok.bos_token_id == tok.backend.token_to_id(BOS_TOKEN)
    assert tok.encode("hi")[0] == tok.bos_token_id


def test_generation_config_adds_end_ids(hf_dir: Path) -> None:
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    assert {7, 8} <= Tokenizer.from_hf_dir(hf_dir).eos_token_ids
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert 9 in Tokenizer.from_hf_dir(hf_dir).eos_token_ids


@pytest.mark.parametrize("where", ["string", "named list", "jinja file"])
def test_chat_template_sources(hf_dir: Path, where: str) -> None:
    if where == "string":
        update_config(hf_dir, chat_template=TEMPLATE)
    elif where == "named list":
        named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]
        update_config(hf_dir, chat_template=named)
    else:
        (hf_dir / "chat_template.jinja").write_text(TEMPLATE)
    assert Tokenizer.from_hf_dir(hf_dir).chat_template == TEMPLATE


def test_gguf_carries_the_chat_template(tmp_path: Path, bpe_dirs: dict[str, Path]) -> None:
    from tests.fixtures.gguf_tokenizer import add_tokenizer_metadata
    from tests.tokenizer.conftest import write_gguf

    hf = Tokenizer.from_hf_dir(bpe_dirs["llama-bpe"])
    bos, eot = hf.backend.token_to_id(BOS_TOKEN), hf.backend.token_to_id(EOT_TOKEN)
    tokenizer_json = str(bpe_dirs["llama-bpe"] / "tokenizer.json")
    path = write_gguf(
        tmp_path / "t.gguf",
        "llama",
        lambda writer: add_tokenizer_metadata(writer, tokenizer_json, "llama-bpe", bos, eot, TEMPLATE),
    )
    tok = Tokenizer.from_gguf(path)
    assert tok.chat_template == TEMPLATE
    assert tok.settings.eos_token_id == eot
    assert tok.eos_token_ids == hf.eos_token_ids
