"""Clients that go away: their requests are aborted and every KV block comes back."""
from __future__ import annotations

import asyncio

import httpx

from tests.server.conftest import LiveServer

NUM_CLIENTS = 50
ABORTED = "rillet_requests_total{finish_reason=abort}"


def idle(m: dict[str, float]) -> bool:
    groups = [k for k in m if k.startswith("rillet_kv_cache_blocks{")]
    all_free = all(m[g] == m[g.replace("kv_cache_blocks", "kv_cache_free_blocks")] for g in groups)
    return bool(groups) and all_free and m["rillet_num_requests_running"] == 0 \
        and m["rillet_num_requests_waiting"] == 0


async def stream_then_leave(client: httpx.AsyncClient, body: dict[str, object], num_events: int) -> int:
    """Read `num_events` SSE events, then drop the connection mid-stream."""
    seen = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= num_events:
                break
    return seen


async def fifty_clients(server: LiveServer) -> list[int]:
    limits = httpx.Limits(max_connections=NUM_CLIENTS + 5)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, limits=limits,
                                 timeout=120.0) as client:
        bodies = [{"model": server.model, "prompt": f"Client {i} says", "max_tokens": 3000, "ignore_eos": True,
                   "stream": True, "seed": i} for i in range(NUM_CLIENTS)]
        return await asyncio.gather(*(stream_then_leave(client, b, 2 + i % 4) for i, b in enumerate(bodies)))


def test_fifty_streaming_clients_disconnect(server: LiveServer) -> None:
    before = server.metrics().get(ABORTED, 0.0)
    seen = asyncio.run(fifty_clients(server))
    assert all(n >= 2 for n in seen)
    m = server.wait_for_metrics(lambda m: idle(m) and m.get(ABORTED, 0.0) >= before + NUM_CLIENTS)
    assert m["rillet_num_requests_running"] == 0
    assert m["rillet_num_requests_waiting"] == 0
    for key in [k for k in m if k.startswith("rillet_kv_cache_blocks{")]:
        assert m[key.replace("kv_cache_blocks", "kv_cache_free_blocks")] == m[key], key
    assert m[ABORTED] - before == NUM_CLIENTS
    with server.http() as http:  # and it still serves
        assert http.post("/v1/completions", json={"model": server.model, "prompt": "hi", "max_tokens": 2}
                         ).status_code == 200


def test_non_streaming_client_disconnects(server: LiveServer) -> None:
    before = server.metrics().get(ABORTED, 0.0)
    body = {"model": server.model, "prompt": "A long story:", "max_tokens": 4000, "ignore_eos": True}
    timeout = httpx.Timeout(30.0, read=1.0)
    try:
        httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=timeout)
        raise AssertionError("the request finished before the client gave up")
    except httpx.ReadTimeout:
        pass
    m = server.wait_for_metrics(lambda m: idle(m) and m.get(ABORTED, 0.0) >= before + 1)
    assert idle(m)
    assert m[ABORTED] - before == 1
