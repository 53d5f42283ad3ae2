"""Soak a live `rillet serve`: N concurrent streams for a while, watching the server process.

Every stream must end with its finish reason and [DONE]; after a warm-up, the server's resident
memory must not grow by 5% or more; its open file descriptors must be the same when idle after
the run as when idle before it; and every KV block must be free once the clients stop.

    python scripts/soak.py --tiny --duration 600                 # 10 minutes on a tiny model
    python scripts/soak.py --url http://127.0.0.1:8000 --pid PID --duration 600
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MAX_RSS_GROWTH = 0.05


@dataclass
class SoakReport:
    num_requests: int = 0
    num_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, RSS bytes, open fds)
    warmup_s: float = 0.0
    idle_fds_before: int | None = None
    idle_fds_after: int | None = None
    kv_idle_after: bool = False

    def rss_growth(self) -> float | None:
        """Median RSS over the last tenth of the run against the median over the warm-up's last tenth."""
        after = [s for s in self.samples if s[0] >= self.warmup_s]
        before = [s for s in self.samples if s[0] < self.warmup_s]
        if len(after) < 2 or not before:
            return None
        tail = max(1, len(before) // 10), max(1, len(after) // 10)
        base = statistics.median(rss for _, rss, _ in before[-tail[0]:])
        end = statistics.median(rss for _, rss, _ in after[-tail[1]:])
        return (end - base) / base

    def failures(self) -> list[str]:
        out = list(self.errors[:10])
        growth = self.rss_growth()
        if growth is not None and growth >= MAX_RSS_GROWTH:
            out.append(f"resident memory grew {growth:.1%} after warm-up")
        fds_before, fds_after = self.idle_fds_before, self.idle_fds_after
        if fds_before is not None and (fds_after is None or fds_after > fds_before):
            # NOTE: fewer is fine: the "before" count can include the readiness probe's connection.
            out.append(f"open file descriptors when idle: {self.idle_fds_before} before, {self.idle_fds_after} after")
        if not self.kv_idle_after:
            out.append("the KV cache was not all free once idle")
        if self.num_requests == 0:
            out.append("no request completed")
        return out

    def summary(self) -> str:
        growth = self.rss_growth()
        rss = [s[1] for s in self.samples]
        memory = f"RSS {min(rss) >> 20}-{max(rss) >> 20} MiB, growth after warm-up " + \
                 (f"{growth:+.2%}" if growth is not None else "n/a") if rss else "RSS not measured"
        return (f"{self.num_requests} streams, {self.num_tokens} tokens, {len(self.errors)} errors; {memory}; "
                f"idle fds {self.idle_fds_before} -> {self.idle_fds_after}; KV all free: {self.kv_idle_after}")


def process_usage(pid: int) -> tuple[int, int]:
    """(resident bytes, open file descriptors) of a Linux process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kb << 10, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def kv_idle(metrics_text: str) -> bool:
    values: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("rillet_") and " " in line:
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    groups = [k for k in values if k.startswith("rillet_kv_cache_blocks{")]
    free = all(values[g] == values[g.replace("kv_cache_blocks", "kv_cache_free_blocks")] for g in groups)
    return bool(groups) and free and values.get("rillet_num_requests_running") == 0 \
        and values.get("rillet_num_requests_waiting") == 0


async def _stream_once(client: httpx.AsyncClient, model: str, rng: random.Random, report: SoakReport) -> None:
    max_tokens = rng.randint(8, 96)
    body = {"model": model, "prompt": f"Soak {rng.random():.6f}: tell me about " + "rivers " * rng.randint(1, 40),
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": rng.choice([0, 0.8]),
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                report.errors.append(f"status {response.status_code}: {(await response.aread())[:200]!r}")
                return
            events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as e:
        report.errors.append(f"{type(e).__name__}: {e}")
        return
    if events[-1:] != ["[DONE]"] or '"error"' in "".join(events):
        report.errors.append(f"bad stream end: {events[-2:]}")
        return
    usage = json.loads(events[-2])["usage"]
    if usage["completion_tokens"] != max_tokens:
        report.errors.append(f"{usage['completion_tokens']} tokens, wanted {max_tokens}")
        return
    report.num_requests += 1
    report.num_tokens += max_tokens


async def soak(url: str, model: str, duration_s: float, concurrency: int = 32, pid: int | None = None,
               headers: dict[str, str] | None = None, warmup_s: float | None = None, seed: int = 0) -> SoakReport:
    """Run `concurrency` clients, each streaming one request after another, for `duration_s` seconds."""
    report = SoakReport(warmup_s=warmup_s if warmup_s is not None else max(10.0, duration_s / 5))
    start = time.monotonic()
    if pid is not None:
        report.idle_fds_before = process_usage(pid)[1]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() - start < duration_s:
                await _stream_once(client, model, rng, report)

        async def sampler() -> None:
            while pid is not None and time.monotonic() - start < duration_s:
                rss, fds = process_usage(pid)
                report.samples.append((time.monotonic() - start, rss, fds))
                await asyncio.sleep(1.0)

        await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        for _ in range(200):  # the last aborts and finishes reach the engine thread
            report.kv_idle_after = kv_idle((await client.get("/metrics")).text)
            if report.kv_idle_after:
                break
            await asyncio.sleep(0.05)
    if pid is not None:
        for _ in range(100):  # sockets closed by the clients are closed by the server a moment later
            report.idle_fds_after = process_usage(pid)[1]
            if report.idle_fds_before is not None and report.idle_fds_after <= report.idle_fds_before:
                break
            await asyncio.sleep(0.05)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server")
    parser.add_argument("--pid", type=int, help="its process id, to watch its memory and file descriptors")
    parser.add_argument("--tiny", action="store_true", help="start `rillet serve` on a tiny random model")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="the model name to send (default: the server's)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default: 600)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default: a fifth of the run, >= 10)")
    args = parser.parse_args(argv)
    if not args.url and not args.tiny:
        parser.error("give --url (and --pid) or --tiny")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    server = None
    if args.url is None:
        from scripts.tiny_server import start_tiny_server
        server = start_tiny_server("--max-num-seqs", str(args.concurrency), api_key=args.api_key)
        args.url, args.pid = server.url, server.proc.pid
    try:
        model = args.model or httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"][0]["id"]
        report = asyncio.run(soak(args.url, model, args.duration, args.concurrency, args.pid, headers,
                                  args.warmup))
    finally:
        if server is not None:
            server.stop()
    print(report.summary())
    for failure in report.failures():
        print("FAIL:", failure)
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
