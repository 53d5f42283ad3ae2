"""KV pressure: 32 long requests over a KV pool sized for 4 all complete, with preemptions, and
their greedy outputs equal an unpressured run's; a request that can never fit is a 400 at
admission and holds nobody up."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures.tiny_models import TinyModel
from tests.reliability.conftest import assert_error_body, kv_idle
from tests.server.conftest import LiveServer, start_server

NUM_REQUESTS = 32
MAX_TOKENS = 200
# Each request peaks at ~215 tokens = 14 blocks of 16; the pool holds 4 such requests.
POOL_TOKENS = 4 * 14 * 16
FLAGS = ("--max-model-len", "2048", "--max-num-seqs", "32", "--max-num-batched-tokens", "128",
         "--quantization", "none")  # exact: outputs are compared across batch compositions
PREEMPTIONS = "rillet_num_preemptions_total"


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, TinyModel],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, LiveServer]]:
    log_dir = tmp_path_factory.mktemp("kv-pressure")
    roomy = start_server(tiny_models["qwen3"], log_dir, *FLAGS, "--num-kv-tokens", str(16 * POOL_TOKENS))
    tight = start_server(tiny_models["qwen3"], log_dir, *FLAGS, "--num-kv-tokens", str(POOL_TOKENS))
    yield roomy, tight
    assert roomy.stop() == 0 and tight.stop() == 0


def bodies(model: str) -> list[dict[str, Any]]:
    return [{"model": model, "prompt": f"Request number {i} tells a long story about", "max_tokens": MAX_TOKENS,
             "temperature": 0, "ignore_eos": True} for i in range(NUM_REQUESTS)]


async def run_all(server: LiveServer, also: list[dict[str, Any]] | None = None) -> tuple[list[str], list[Any]]:
    """The 32 requests at once (and `also`, sent once they are all in); their texts, and `also`'s responses."""
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        tasks = [asyncio.ensure_future(client.post("/v1/completions", json=b)) for b in bodies(server.model)]
        extra: list[Any] = []
        if also:
            while (await client.get("/metrics")).text.count("rillet_num_requests_running 0.0"):
                await asyncio.sleep(0.01)
            extra = [await client.post("/v1/completions", json=b) for b in also]
            extra.append(all(not t.done() for t in tasks))  # the 400s came while the 32 still ran
        responses = await asyncio.gather(*tasks)
    texts = []
    for r in responses:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == MAX_TOKENS and body["choices"][0]["finish_reason"] == "length"
        texts.append(body["choices"][0]["text"])
    return texts, extra


def test_32_long_requests_over_a_pool_for_4(servers: tuple[LiveServer, LiveServer]) -> None:
    roomy, tight = servers
    expected, _ = asyncio.run(run_all(roomy))
    assert roomy.metrics()[PREEMPTIONS] == 0
    never_fits = [{"model": tight.model, "prompt": "too long for the pool", "max_tokens": 2 * POOL_TOKENS},
                  {"model": tight.model, "prompt": [1 + i % 500 for i in range(POOL_TOKENS + 100)],
                   "max_tokens": 1}]
    got, extra = asyncio.run(run_all(tight, also=never_fits))
    for response in extra[:-1]:
        error = assert_error_body(response, 400)
        assert "can never fit in the KV cache" in str(error["message"])
    assert extra[-1] is True
    assert got == expected
    m = tight.wait_for_metrics(kv_idle)
    assert m[PREEMPTIONS] > 0 and kv_idle(m)
