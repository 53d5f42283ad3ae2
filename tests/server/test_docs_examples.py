"""README.md's and docs/SERVER.md's curl and `openai` examples, run as written against `rillet serve` on the
embedded model."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import LiveServer, start_server

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "SERVER.md"]
DOC_URL = "http://localhost:8000"

pytestmark = pytest.mark.slow


def code_blocks(doc: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", doc.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[LiveServer]:
    live = start_server(None, tmp_path_factory.mktemp("embedded"))
    yield live
    assert live.stop() == 0


def as_written(example: str, server: LiveServer) -> str:
    assert DOC_URL in example
    return example.replace(DOC_URL, server.url)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_curl_example(embedded: LiveServer, doc: Path) -> None:
    example = next(b for b in code_blocks(doc, "bash") if b.startswith("curl "))
    out = subprocess.run(["bash", "-c", as_written(example, embedded)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    body = json.loads(out)
    assert body["model"] == "gemma-3-270m" and body["choices"][0]["text"].strip()
    assert body["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_openai_client_example(embedded: LiveServer, doc: Path) -> None:
    example = next(b for b in code_blocks(doc, "python") if "from openai import OpenAI" in b)
    out = subprocess.run([sys.executable, "-c", as_written(example, embedded)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    text, _, usage = out.rpartition("\n[")
    assert text.strip()
    assert re.fullmatch(r"\d+ prompt \+ \d+ generated tokens\]\n", usage), out
