"""The API key and the waiting-queue limit, on a server that runs one sequence at a time."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.fixtures.tiny_models import TinyModel
from tests.server.conftest import LiveServer, start_server

KEY = "sk-test-123"
MAX_QUEUED = 2
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}[assistant] {% endif %}"


@pytest.fixture(scope="module")
def guarded(qwen3: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log_dir = tmp_path_factory.mktemp("guarded")
    (log_dir / "template.jinja").write_text(TEMPLATE)
    # fcfs: the running stream keeps its slot (qoe would hand it to the waiting requests, whose readers
    # have nothing yet)
    live = start_server(qwen3, log_dir, "--max-num-seqs", "1", "--max-queued-requests", str(MAX_QUEUED),
                        "--scheduling-policy", "fcfs",
                        "--chat-template", str(log_dir / "template.jinja"), api_key=KEY)
    yield live
    assert live.stop() == 0


ROUTES = [("GET", "/v1/models", None), ("GET", "/metrics", None),
          ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
          ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
          ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1, 2]}),
          ("GET", "/no/such/route", None)]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}], ids=["none", "wrong", "no-scheme", "basic"])
def test_every_route_but_health_needs_the_key(guarded: LiveServer, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=guarded.url, headers=headers, timeout=30) as http:
        for method, path, body in ROUTES:
            response = http.request(method, path, json=body)
            assert response.status_code == 401, (path, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200
    with guarded.http() as http:
        for method, path, body in ROUTES[:-1]:
            assert http.request(method, path, json=body).status_code == 200, path


def test_openai_client_with_and_without_the_key(guarded: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").models.list()
    assert guarded.client().completions.create(model=guarded.model, prompt="hi", max_tokens=2).choices


def test_full_queue_is_429_with_retry_after(guarded: LiveServer) -> None:
    client = guarded.client()
    stream = client.completions.create(model=guarded.model, prompt="Hold the slot", max_tokens=3000,
                                       stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))  # the one running sequence
    assert first.choices
    queued: list[int] = []
    threads = [threading.Thread(target=lambda: queued.append(_complete(guarded))) for _ in range(MAX_QUEUED)]
    for t in threads:
        t.start()
    m = guarded.wait_for_metrics(lambda m: m["rillet_num_requests_waiting"] == MAX_QUEUED)
    assert m["rillet_num_requests_waiting"] == MAX_QUEUED
    with guarded.http() as http:
        response = http.post("/v1/completions", json={"model": guarded.model, "prompt": "one too many",
                                                      "max_tokens": 1})
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"
    stream.close()  # frees the slot: the queued requests run
    for t in threads:
        t.join(120)
    assert queued == [200] * MAX_QUEUED
    assert _complete(guarded) == 200


def _complete(server: LiveServer) -> int:
    with server.http() as http:
        return http.post("/v1/completions", json={"model": server.model, "prompt": "queued", "max_tokens": 2}
                         ).status_code


def test_chat_template_file_overrides_the_model_one(guarded: LiveServer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with guarded.http() as http:
        tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
        assert http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "[user] hi\n[assistant] "
