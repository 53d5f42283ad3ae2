"""Two scheduling scenarios, each run against one or more OpenAI-compatible servers in turn.

    python -m rillet.bench.scenarios stall --url http://127.0.0.1:8000 --url http://127.0.0.1:8080
    python -m rillet.bench.scenarios tenants --url http://127.0.0.1:8000

stall: 8 streams run; then a long prompt (default 4,000 tokens) arrives. Reported per server: the
longest inter-token gap of the 8 streams while the long prompt is prefilled (from its send to its
first token), the long prompt's TTFT, and the 8 streams' longest gap before it arrived.

tenants: a light tenant (`user` "light") sends Poisson arrivals alone, then again while a heavy
tenant ("heavy") sends 10x its rate with the same request shape. Reported: the light tenant's TTFT
p50/p99 alone and under the heavy load, and their ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

import httpx

from rillet.bench.datasets import default_source, sample_text


async def _stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, user: str | None = None
                  ) -> list[float]:
    """Token arrival times (perf_counter) of one streamed greedy completion."""
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                            "ignore_eos": True}
    if user:
        body["user"] = user
    times: list[float] = []
    async with client.stream("POST", url.rstrip("/") + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
    return times


def _prompt(words: int, seed: int) -> str:
    return sample_text(default_source().passages(), words, random.Random(seed))


async def stall(url: str, long_words: int, stream_tokens: int, seed: int = 0, settle_s: float = 3.0
                ) -> dict[str, float]:
    # NOTE: fresh texts per seed, so a repeat finds nothing in the prefix cache.
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(keepalive_expiry=2.0)) as client:
        await _stream(client, url, _prompt(20, 999 + 10_000 * seed), 4)  # warm-up
        streams = [asyncio.create_task(_stream(client, url, _prompt(40, i + 10_000 * seed), stream_tokens))
                   for i in range(8)]
        await asyncio.sleep(settle_s)  # the 8 streams are decoding
        sent = time.perf_counter()
        long_times = await _stream(client, url, _prompt(long_words, 1000 + 10_000 * seed), 1)
        first = long_times[0]
        runs = await asyncio.gather(*streams)
    during, before = 0.0, 0.0
    for times in runs:
        for a, b in zip(times, times[1:]):
            if b > sent and a < first:
                during = max(during, b - a)
            elif b <= sent:
                before = max(before, b - a)
    return {"max_gap_during_prefill_ms": 1000 * during, "max_gap_before_ms": 1000 * before,
            "long_prompt_ttft_s": first - sent}


async def _poisson(client: httpx.AsyncClient, url: str, user: str, rate: float, num: int, seed: int,
                   words: int, max_tokens: int) -> list[float]:
    rng = random.Random(seed)
    tasks = []
    for i in range(num):
        sent = time.perf_counter()
        tasks.append((sent, asyncio.create_task(_stream(client, url, _prompt(words, seed * 1000 + i), max_tokens,
                                                            user))))
        await asyncio.sleep(rng.expovariate(rate))
    return [(await t)[0] - sent for sent, t in tasks]


async def tenants(url: str, rate: float, num: int, words: int, max_tokens: int) -> dict[str, float]:
    # NOTE: idle connections are dropped before uvicorn's 5 s keep-alive closes them: reusing one the
    # server is closing at that moment fails the request (httpx.ReadError).
    limits = httpx.Limits(max_connections=1000, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await _stream(client, url, _prompt(20, 999), 4)  # warm-up
        alone = await _poisson(client, url, "light", rate, num, 1, words, max_tokens)
        heavy = asyncio.create_task(_poisson(client, url, "heavy", 10 * rate, 10 * num, 2, words, max_tokens))
        shared = await _poisson(client, url, "light", rate, num, 3, words, max_tokens)
        await heavy
    q = statistics.quantiles
    out = {"light_ttft_p50_alone_s": statistics.median(alone), "light_ttft_p99_alone_s": q(alone, n=100)[98],
           "light_ttft_p50_shared_s": statistics.median(shared), "light_ttft_p99_shared_s": q(shared, n=100)[98]}
    out["p99_ratio"] = out["light_ttft_p99_shared_s"] / out["light_ttft_p99_alone_s"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=("stall", "tenants"))
    parser.add_argument("--url", action="append", required=True, help="a server (repeatable; run in turn)")
    parser.add_argument("--long-words", type=int, default=3300, help="stall: words of the long prompt "
                        "(~4,000 Gemma tokens)")
    parser.add_argument("--stream-tokens", type=int, default=400, help="stall: tokens each of the 8 streams asks for")
    parser.add_argument("--repeats", type=int, default=1, help="stall: runs per server, each with fresh texts; "
                        "the worst gap is reported")
    parser.add_argument("--rate", type=float, default=0.2, help="tenants: the light tenant's requests/s")
    parser.add_argument("--num-requests", type=int, default=20, help="tenants: the light tenant's requests per phase")
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    for url in args.url:
        if args.scenario == "stall":
            runs = [asyncio.run(stall(url, args.long_words, args.stream_tokens, seed)) for seed in range(args.repeats)]
            results[url] = {**max(runs, key=lambda r: r["max_gap_during_prefill_ms"]),
                            "runs_max_gap_during_prefill_ms": [r["max_gap_during_prefill_ms"] for r in runs]}
        else:
            results[url] = dict(asyncio.run(tenants(url, args.rate, args.num_requests, args.prompt_words,
                                                    args.output_tokens)))
        print(url, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results[url].items()}),
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scenario": args.scenario, "options": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
