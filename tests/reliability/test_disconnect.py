"""Clients that go away at any point: no request is left running, and every KV block is free,
each within one engine step of the disconnect."""
from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from rillet.config import EngineConfig
from rillet.engine.engine import Engine
from rillet.request import RequestStatus
from rillet.sampling_params import SamplingParams
from rillet.server.async_engine import AsyncEngine, EngineState, RequestStream
from tests.fixtures.tiny_models import TinyModel
from tests.reliability.conftest import canary, kv_idle
from tests.server.conftest import LiveServer, start_server

NUM_CLIENTS = 500
CONCURRENCY = 48
LONG_PROMPT = 1200  # tokens: prefilled over many steps of 64
ABORTED = "rillet_requests_total{finish_reason=abort}"
MODES = ("before-response", "mid-prefill", "mid-stream", "non-streaming")


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tiny_models["qwen3"], tmp_path_factory.mktemp("disconnect"), "--max-model-len", "2048",
                        "--max-num-batched-tokens", "64", "--max-num-seqs", "64", "--num-kv-tokens", "32768",
                        "--max-queued-requests", "1024")
    yield live
    assert live.stop() == 0


async def one_client(client: httpx.AsyncClient, model: str, i: int, rng: random.Random) -> tuple[str, bool]:
    """Send a request and drop it at a random point; returns the mode and whether the server accepted it."""
    mode = MODES[i % len(MODES)]
    long = mode == "mid-prefill"
    prompt: Any = [rng.randrange(1, 500) for _ in range(LONG_PROMPT)] if long else f"Client {i} says"
    body = {"model": model, "prompt": prompt, "max_tokens": 600, "ignore_eos": True, "seed": i,
            "stream": mode != "non-streaming"}
    if mode in ("before-response", "non-streaming"):
        task = asyncio.ensure_future(client.post("/v1/completions", json=body))
        await asyncio.sleep(rng.uniform(0.0, 0.05 if mode == "before-response" else 0.3))
        task.cancel()
        try:
            response = await task
            return mode, response.status_code == 200  # it finished before we left: rare
        except asyncio.CancelledError:
            return mode, False
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        if mode == "mid-stream":
            seen, wanted = 0, rng.randint(1, 8)
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= wanted:
                    break
    return mode, True


async def all_clients(server: LiveServer) -> list[tuple[str, bool]]:
    rng = random.Random(0)
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120.0) as client:
        async def guarded(i: int) -> tuple[str, bool]:
            async with gate:
                return await one_client(client, server.model, i, rng)
        return await asyncio.gather(*(guarded(i) for i in range(NUM_CLIENTS)))


def test_500_clients_drop_at_random_points(server: LiveServer) -> None:
    with server.http() as http:
        before = canary(http, server)
    aborted_before = server.metrics().get(ABORTED, 0.0)
    results = asyncio.run(all_clients(server))
    assert Counter(mode for mode, _ in results) == {mode: NUM_CLIENTS // len(MODES) for mode in MODES}
    num_accepted_streams = sum(1 for mode, accepted in results if accepted and mode != "non-streaming")
    m = server.wait_for_metrics(lambda m: kv_idle(m) and m.get(ABORTED, 0.0) - aborted_before
                                >= num_accepted_streams)
    assert m["rillet_num_requests_running"] == 0 and m["rillet_num_requests_waiting"] == 0
    for key in [k for k in m if k.startswith("rillet_kv_cache_blocks{")]:
        assert m[key.replace("kv_cache_blocks", "kv_cache_free_blocks")] == m[key], key
    assert m[ABORTED] - aborted_before >= num_accepted_streams >= NUM_CLIENTS // 2
    with server.http() as http:
        assert canary(http, server) == before


# -- within one engine step: the engine thread applies every abort before its next step ------------

class StepLog:
    """Wraps a real engine: which requests each step ran, and at which step each abort landed."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.steps: list[set[str]] = []
        self.aborted_at: dict[str, int] = {}
        self.phases: Counter[str] = Counter()
        self.leaks: list[str] = []
        step, abort = engine.step, engine.abort

        def logged_step() -> Any:
            outputs = step()
            schedule = engine.last_schedule
            self.steps.append({s.request_id for s in schedule.seqs} if schedule else set())
            return outputs

        def logged_abort(request_id: str) -> None:
            req = engine.scheduler.requests.get(request_id)
            if req is not None:
                prefilling = req.num_computed_tokens < req.num_prompt_tokens
                self.phases["waiting" if req.status is RequestStatus.WAITING else
                            "prefill" if prefilling else "decode"] += 1
            self.aborted_at[request_id] = len(self.steps)
            abort(request_id)
            if request_id in engine.scheduler.requests or request_id in engine.children:
                self.leaks.append(request_id)

        engine.step, engine.abort = logged_step, logged_abort  # type: ignore[method-assign]


def test_every_abort_lands_before_the_next_step(tiny_models: dict[str, TinyModel]) -> None:
    config = EngineConfig(num_kv_tokens=32768, max_num_batched_tokens=64, max_num_seqs=16, num_threads=1)
    engine = Engine(str(tiny_models["qwen3"].hf_dir), config)
    log = StepLog(engine)
    rng = random.Random(1)

    async def client(e: AsyncEngine, i: int) -> None:
        prompt = [rng.randrange(1, 500) for _ in range(rng.choice([5, 40, 300, 700]))]
        stream = await e.add(f"r{i}", prompt, SamplingParams(max_tokens=400, ignore_eos=True, seed=i))
        wanted = rng.choice([0, 0, 1, 3, 10])
        try:
            if wanted:
                await read(stream, wanted)
            elif len(prompt) > 64 and rng.random() < 0.5:  # leave once its prefill has begun
                await prefill_started(engine, f"r{i}")
            else:  # leave at once, or a moment later
                await asyncio.sleep(rng.choice([0.0, rng.uniform(0, 0.05)]))
        finally:
            stream.close()

    async def main() -> None:
        e = AsyncEngine(lambda: engine, 1024, 60.0)
        e.start(asyncio.get_running_loop())
        while e.state is EngineState.LOADING:
            await asyncio.sleep(0.01)
        try:
            gate = asyncio.Semaphore(20)  # a few more than max_num_seqs: some wait, most run at once

            async def gated(i: int) -> None:
                async with gate:
                    await client(e, i)
            await asyncio.gather(*(gated(i) for i in range(120)))
            for _ in range(200):  # the last aborts reach the engine thread
                if not engine.has_unfinished() and len(log.aborted_at) == 120:
                    break
                await asyncio.sleep(0.02)
        finally:
            e.stop(10)

    asyncio.run(main())
    assert len(log.aborted_at) == 120 and log.leaks == []
    for request_id, at in log.aborted_at.items():
        assert all(request_id not in ran for ran in log.steps[at:]), request_id
    assert set(log.phases) == {"waiting", "prefill", "decode"}, log.phases
    assert not engine.has_unfinished() and engine.children == {}
    assert all(pool.num_free == pool.num_usable for pool in engine.kv.pools)


async def prefill_started(engine: Engine, request_id: str) -> None:
    """Wait until the engine has computed part of the prompt (a racy read of an int: enough for a test)."""
    for _ in range(2000):
        req = engine.scheduler.requests.get(request_id)
        if req is None or req.num_computed_tokens > 0:
            return
        await asyncio.sleep(0.001)


async def read(stream: RequestStream, num_outputs: int) -> None:
    seen = 0
    async for _ in stream:
        seen += 1
        if seen >= num_outputs:
            return
