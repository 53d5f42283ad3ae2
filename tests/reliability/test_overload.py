"""Overload: past `--max-queued-requests` a client gets a 429 with `Retry-After` at once, and every
request the server accepted completes."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures.tiny_models import TinyModel
from tests.reliability.conftest import assert_error_body, kv_idle
from tests.server.conftest import LiveServer, start_server

MAX_QUEUED = 4
NUM_CLIENTS = 48
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def small(tiny_models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tiny_models["qwen3"], tmp_path_factory.mktemp("overload"), "--max-num-seqs", "2",
                        "--max-queued-requests", str(MAX_QUEUED))
    yield live
    assert live.stop() == 0


async def attempt(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, float, httpx.Response]:
    start = time.monotonic()
    if not body["stream"]:
        response = await client.post("/v1/completions", json=body)
        return response.status_code, time.monotonic() - start, response
    async with client.stream("POST", "/v1/completions", json=body) as response:
        await response.aread()
    return response.status_code, time.monotonic() - start, response


def check_complete(response: httpx.Response, stream: bool) -> None:
    if stream:
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(lines), lines[-2:]
    else:
        body = response.json()
        assert body["usage"]["completion_tokens"] == MAX_TOKENS and body["choices"][0]["finish_reason"] == "length"


async def burst(server: LiveServer) -> list[tuple[int, float, httpx.Response]]:
    limits = httpx.Limits(max_connections=NUM_CLIENTS + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        bodies = [{"model": server.model, "prompt": f"Client {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                   "stream": i % 2 == 1} for i in range(NUM_CLIENTS)]
        return await asyncio.gather(*(attempt(client, b) for b in bodies))


async def until_accepted(server: LiveServer, body: dict[str, Any]) -> int:
    """Retry after each 429 (a tenth of `Retry-After`, to keep the test short); returns the number of 429s."""
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        for num_refusals in range(1000):
            response = await client.post("/v1/completions", json=body)
            if response.status_code != 429:
                check_complete(response, stream=False)
                return num_refusals
            await asyncio.sleep(float(response.headers["retry-after"]) / 10)
    raise AssertionError("never accepted")


def test_beyond_the_queue_429_with_retry_after_and_every_accepted_request_completes(small: LiveServer) -> None:
    results = asyncio.run(burst(small))
    statuses = [status for status, _, _ in results]
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= MAX_QUEUED  # the queue fills before the first step admits anyone
    slowest_accepted = max(t for status, t, _ in results if status == 200)
    for i, (status, elapsed, response) in enumerate(results):
        if status == 429:
            error = assert_error_body(response, 429)
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert int(response.headers["retry-after"]) >= 1
            assert elapsed < slowest_accepted  # refused at once, not after waiting for a slot
        else:
            check_complete(response, stream=i % 2 == 1)
    body = {"model": small.model, "prompt": "Patient client", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    refusals = asyncio.run(asyncio.wait_for(_patient_clients(small, body), 300))
    assert sum(refusals) >= 1  # some waited their turn, and all got through
    assert kv_idle(small.wait_for_metrics(kv_idle))


async def _patient_clients(server: LiveServer, body: dict[str, Any]) -> list[int]:
    return await asyncio.gather(*(until_accepted(server, body) for _ in range(24)))
