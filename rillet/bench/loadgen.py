"""Load generation: when requests arrive, and a streaming client that times every token on its own clock.

Open loop: request i is sent at offset i of an arrival process (Poisson, or Gamma whose shape is the
burstiness), whether or not earlier requests have finished. Closed loop: N users, each sending its next
request as soon as its previous one has finished. Every request asks for `ignore_eos` and a fixed
`max_tokens`, so every server produces the same number of tokens for the same schedule.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from rillet.bench.datasets import RequestSpec

if TYPE_CHECKING:
    import httpx


@dataclass(frozen=True)
class Arrivals:
    """An open-loop arrival process. Gamma with burstiness 1 is Poisson; below 1 is burstier."""

    kind: str = "poisson"
    rate: float = math.inf          # requests per second; inf sends everything at once
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("poisson", "gamma"):
            raise ValueError(f"the arrival process is poisson or gamma, got {self.kind!r}")
        if not self.rate > 0:
            raise ValueError(f"the request rate must be > 0 (or inf), got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"the burstiness must be a positive number, got {self.burstiness}")


def arrival_offsets(num_requests: int, arrivals: Arrivals, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent; the first at 0.

    The gaps of one seed scale exactly with 1/rate, so a sweep over rates replays the same pattern faster.
    """
    if math.isinf(arrivals.rate):
        return [0.0] * num_requests
    rng = random.Random(f"rillet-bench-arrivals-{seed}")
    offsets, t = [], 0.0
    for _ in range(num_requests):
        offsets.append(t)
        if arrivals.kind == "poisson":
            t += rng.expovariate(arrivals.rate)
        else:
            # shape k = burstiness and mean k*theta = 1/rate: squared coefficient of variation 1/k
            t += rng.gammavariate(arrivals.burstiness, 1.0 / (arrivals.rate * arrivals.burstiness))
    return offsets


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server: base URL (with or without /v1), model name, and which API to stream."""

    url: str
    model: str | None = None
    api: str = "completions"        # completions | chat
    temperature: float = 0.0
    api_key: str | None = None
    timeout_s: float = 600.0
    send_qoe_ttft_s: float | None = None  # set: each request carries its QoE target as rillet's "qoe" field

    def __post_init__(self) -> None:
        if self.api not in ("completions", "chat"):
            raise ValueError(f"the API is completions or chat, got {self.api!r}")

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url

    @property
    def path(self) -> str:
        return "/v1/completions" if self.api == "completions" else "/v1/chat/completions"

    def body(self, spec: RequestSpec, model: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": spec.max_tokens, "stream": True, "ignore_eos": True,
                                "temperature": self.temperature, "stream_options": {"include_usage": True}}
        if model is not None:
            body["model"] = model
        if self.send_qoe_ttft_s is not None:
            body["qoe"] = {"ttft_s": self.send_qoe_ttft_s, "tokens_per_s": spec.reading_speed}
        if self.api == "completions":
            body["prompt"] = spec.prompt
        else:
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        return body


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds on the client's monotonic clock."""

    index: int
    sent_at: float                                          # since the run started
    token_times: list[float] = field(default_factory=list)  # each content chunk's arrival, since sent_at
    done_at: float | None = None                            # end of the stream, since sent_at
    num_prompt_tokens: int | None = None                    # as the server's usage reports them
    num_output_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def num_tokens(self) -> int:
        """Generated tokens: the server's count when it reports one, else the number of content chunks."""
        return self.num_output_tokens if self.num_output_tokens is not None else len(self.token_times)


@dataclass
class RunResult:
    """One pass of a schedule against one server."""

    url: str
    model: str | None
    results: list[RequestResult]
    duration_s: float                # from the first send to the last stream's end


def _chunk_text(payload: dict[str, Any], api: str) -> str:
    choices = payload.get("choices") or []
    if not choices:
        return ""
    if api == "completions":
        return choices[0].get("text") or ""
    return (choices[0].get("delta") or {}).get("content") or ""


async def stream_one(client: httpx.AsyncClient, endpoint: Endpoint, model: str | None, spec: RequestSpec,
                     run_start: float) -> RequestResult:
    """Send one streamed request and time each content chunk as it arrives."""
    sent = time.perf_counter()
    result = RequestResult(spec.index, sent - run_start)
    try:
        async with client.stream("POST", endpoint.base + endpoint.path, json=endpoint.body(spec, model)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:200]}"
                return result
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if "error" in payload:
                    result.error = f"stream error: {str(payload['error'])[:200]}"
                    break
                if _chunk_text(payload, endpoint.api):
                    result.token_times.append(now - sent)
                usage = payload.get("usage")
                if usage:
                    result.num_prompt_tokens = usage.get("prompt_tokens")
                    result.num_output_tokens = usage.get("completion_tokens")
    except Exception as e:  # noqa: BLE001 - any failure of one request is recorded, the run goes on
        result.error = f"{type(e).__name__}: {e}"
    result.done_at = time.perf_counter() - sent
    if result.error is None and not result.token_times:
        result.error = "no tokens streamed"
    return result


def _client(endpoint: Endpoint) -> httpx.AsyncClient:
    import httpx

    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    # NOTE: no connection limit: a queue inside the client would add to the TTFT it measures. Idle
    # connections are dropped before a server's keep-alive (uvicorn: 5 s) closes them: reusing one
    # the server is closing at that moment fails the request (httpx.ReadError).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=2.0)
    return httpx.AsyncClient(timeout=httpx.Timeout(endpoint.timeout_s), limits=limits, headers=headers)


async def resolve_model(client: httpx.AsyncClient, endpoint: Endpoint) -> str | None:
    """The model to name in requests: the one given, else the first that /v1/models lists, else none."""
    if endpoint.model is not None:
        return endpoint.model
    try:
        resp = await client.get(endpoint.base + "/v1/models")
        models = resp.json().get("data") or []
        return str(models[0]["id"]) if resp.status_code == 200 and models else None
    except Exception:  # noqa: BLE001 - a server without /v1/models still serves requests without a model
        return None


async def _open_loop(client: httpx.AsyncClient, endpoint: Endpoint, model: str | None,
                     specs: list[RequestSpec], offsets: list[float], run_start: float) -> list[RequestResult]:
    tasks = []
    for spec, offset in zip(specs, offsets):
        delay = run_start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(stream_one(client, endpoint, model, spec, run_start)))
    return list(await asyncio.gather(*tasks))


async def _closed_loop(client: httpx.AsyncClient, endpoint: Endpoint, model: str | None,
                       specs: list[RequestSpec], concurrency: int, run_start: float) -> list[RequestResult]:
    pending: Iterator[RequestSpec] = iter(specs)
    results: list[RequestResult] = []

    async def user() -> None:
        for spec in pending:    # the users share one iterator: each takes the next unsent request
            results.append(await stream_one(client, endpoint, model, spec, run_start))

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return sorted(results, key=lambda r: r.index)


async def run_schedule(endpoint: Endpoint, specs: list[RequestSpec], offsets: list[float] | None = None,
                       concurrency: int | None = None, warmup: list[RequestSpec] | None = None) -> RunResult:
    """Send `specs` to one server, open loop at `offsets` or closed loop at `concurrency` users.

    `warmup` requests go first, one at a time, and are not part of the result.
    """
    if (offsets is None) == (concurrency is None):
        raise ValueError("give either arrival offsets (open loop) or a concurrency (closed loop)")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"the concurrency must be >= 1, got {concurrency}")
    async with _client(endpoint) as client:
        model = await resolve_model(client, endpoint)
        for spec in warmup or []:
            await stream_one(client, endpoint, model, spec, time.perf_counter())
        run_start = time.perf_counter()
        if offsets is not None:
            results = await _open_loop(client, endpoint, model, specs, offsets, run_start)
        else:
            assert concurrency is not None
            results = await _closed_loop(client, endpoint, model, specs, concurrency, run_start)
    ends = [r.sent_at + r.done_at for r in results if r.done_at is not None]
    return RunResult(endpoint.url, model, results, max(ends, default=0.0))


def run(endpoint: Endpoint, specs: list[RequestSpec], offsets: list[float] | None = None,
        concurrency: int | None = None, warmup: list[RequestSpec] | None = None) -> RunResult:
    """`run_schedule` on a fresh event loop."""
    return asyncio.run(run_schedule(endpoint, specs, offsets, concurrency, warmup))
