"""Servers for the reliability suite, and the greedy canary each test checks the server against."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures.tiny_models import TinyModel
from tests.server.conftest import LiveServer, start_server
from tests.tokenizer.conftest import (_private_cache, bpe_dirs, bpe_tokenizer,  # noqa: F401 (fixtures)
                                      sentencepiece_dir, sentencepiece_tokenizer)

API_KEY = "sk-reliability"
MAX_MODEL_LEN = 256
CANARY = {"prompt": "The canary sings of", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="session")
def guarded(tiny_models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server with an API key and a short context, shared by the bad-input, fuzz and disconnect tests."""
    live = start_server(tiny_models["qwen3"], tmp_path_factory.mktemp("guarded"), "--max-model-len",
                        str(MAX_MODEL_LEN), "--num-kv-tokens", "8192", "--max-request-bytes", str(1 << 20),
                        api_key=API_KEY)
    yield live
    assert live.stop() == 0


def canary(http: httpx.Client, server: LiveServer) -> str:
    """The greedy text of one fixed request (it must not change, whatever the server went through)."""
    response = http.post("/v1/completions", json={"model": server.model, **CANARY})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == CANARY["max_tokens"]
    text: str = body["choices"][0]["text"]
    return text


def assert_error_body(response: httpx.Response, status: int | None = None) -> dict[str, object]:
    """An OpenAI error body, `{"error": {"message", "type", "param", "code"}}`, with `status` if given."""
    if status is not None:
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return dict(error)


def kv_idle(m: dict[str, float]) -> bool:
    """No sequence running or waiting, and every KV block of every group free."""
    groups = [k for k in m if k.startswith("rillet_kv_cache_blocks{")]
    all_free = all(m[g] == m[g.replace("kv_cache_blocks", "kv_cache_free_blocks")] for g in groups)
    return bool(groups) and all_free and m["rillet_num_requests_running"] == 0 \
        and m["rillet_num_requests_waiting"] == 0
