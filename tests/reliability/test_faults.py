"""Faults injected into the model's forward (`RILLET_INJECT_FAULT`): the requests of the failed step
get a clean error, none hangs, the server goes on serving; an engine that cannot recover turns
/health to 503, and so does one that stops making progress."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from rillet.engine.engine import FAULT_ENV
from tests.fixtures.tiny_models import TinyModel
from tests.reliability.conftest import assert_error_body, canary, kv_idle
from tests.server.conftest import LiveServer, start_server

POISON = 300  # a prompt holding this token id makes its prefill step raise
NUM_STREAMS = 4


@pytest.fixture(scope="module")
def faulty(tiny_models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tiny_models["qwen3"], tmp_path_factory.mktemp("faulty"), env={FAULT_ENV: f"token={POISON}"})
    yield live
    assert live.stop() == 0


def stream_events(server: LiveServer, body: dict[str, Any]) -> list[Any]:
    """Every `data:` payload of a streamed completion (the client times out rather than hang)."""
    events: list[Any] = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"model": server.model, "stream": True, **body},
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def poisoned(text: str) -> list[int]:
    return [509, 17, 42, POISON, 99, *(ord(c) % 250 for c in text)]


def test_a_fault_fails_its_requests_cleanly_and_the_server_goes_on(faulty: LiveServer) -> None:
    with faulty.http() as http:
        before = canary(http, faulty)
        response = http.post("/v1/completions", json={"model": faulty.model, "prompt": poisoned("a"),
                                                      "max_tokens": 4})
        error = assert_error_body(response, 500)
        assert error["type"] == "server_error" and error["code"] == "internal_error"
        assert "InjectedFault" in str(error["message"])
        assert canary(http, faulty) == before

    events = stream_events(faulty, {"prompt": poisoned("b"), "max_tokens": 4})
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "internal_error"  # the stream says why it ended

    # Innocent streams batched with a poisoned prefill: each ends, with its output or a clean error.
    innocent = {"max_tokens": 300, "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(NUM_STREAMS + 1) as pool:
        streams = [pool.submit(stream_events, faulty, {"prompt": f"Stream {i}", **innocent})
                   for i in range(NUM_STREAMS)]
        faulty.wait_for_metrics(lambda m: m["rillet_num_requests_running"] >= 1)
        bad = pool.submit(stream_events, faulty, {"prompt": poisoned("c"), "max_tokens": 4}).result(120)
        ended = [s.result(120) for s in streams]
    assert "error" in bad[-2] and bad[-1] == "[DONE]"
    for events in ended:
        assert events[-1] == "[DONE]"
        last = events[-2]
        assert "error" in last or last["choices"][0]["finish_reason"] == "length", last
    assert kv_idle(faulty.wait_for_metrics(kv_idle))
    assert httpx.get(f"{faulty.url}/health").status_code == 200
    with faulty.http() as http:
        assert canary(http, faulty) == before
    assert "InjectedFault" in faulty.log()


def test_an_engine_that_cannot_recover_turns_health_503(tiny_models: dict[str, TinyModel],
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(tiny_models["qwen3"], tmp_path_factory.mktemp("broken"), env={FAULT_ENV: "after=0"})
    body = {"model": server.model, "prompt": "hello", "max_tokens": 4}
    with server.http(timeout=120) as http:
        statuses = []
        for _ in range(6):  # every forward fails: a few failed steps in a row and the engine is declared dead
            response = http.post("/v1/completions", json=body)
            assert_error_body(response)
            statuses.append(response.status_code)
        assert statuses[0] == 500 and statuses[-1] == 503, statuses
        assert set(statuses) == {500, 503}
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and "engine failed" in str(assert_error_body(health)["message"])
        assert http.get("/metrics").status_code == 200
    assert server.stop() == 0


def test_a_wedged_step_turns_health_503_until_it_moves(tiny_models: dict[str, TinyModel],
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(tiny_models["qwen3"], tmp_path_factory.mktemp("wedged"), "--stall-timeout", "1",
                          env={FAULT_ENV: f"stall={POISON}"})
    health: list[httpx.Response] = []
    with ThreadPoolExecutor(1) as pool:
        wedged = pool.submit(httpx.post, f"{server.url}/v1/completions", timeout=120,
                             json={"model": server.model, "prompt": poisoned("d"), "max_tokens": 2})
        while not wedged.done():  # the step sleeps STALL_S seconds, past the stall timeout
            health.append(httpx.get(f"{server.url}/health", timeout=30))
            time.sleep(0.1)
        assert wedged.result().status_code == 200  # the step was slow, not broken
    unhealthy = [h for h in health if h.status_code == 503]
    assert unhealthy and "no progress" in str(assert_error_body(unhealthy[-1])["message"])
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.stop() == 0
