"""The load generator and the command end to end, against a fake OpenAI-compatible server in this process.

The fake server waits FIRST_TOKEN_DELAY_S before its first token and TOKEN_GAP_S between tokens. Only lower
bounds on time are asserted: the machine may be busy.
"""
from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from rillet.bench import cli
from rillet.bench.datasets import LengthDist, ReadingSpeedMix, RequestSpec, StdlibDocSource, build_requests
from rillet.bench.loadgen import Arrivals, Endpoint, arrival_offsets, run
from rillet.bench.report import SLO, analyze, summarize

FIRST_TOKEN_DELAY_S = 0.2
TOKEN_GAP_S = 0.01


class FakeServer:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.app = Starlette(routes=[
            Route("/v1/models", self.models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.completions, methods=["POST"]),
        ])

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(self, request: Request) -> StreamingResponse:
        body = await request.json()
        self.bodies.append(body)
        chat = request.url.path.endswith("/chat/completions")
        return StreamingResponse(self.events(body["max_tokens"], chat), media_type="text/event-stream")

    async def events(self, num_tokens: int, chat: bool) -> AsyncIterator[str]:
        await asyncio.sleep(FIRST_TOKEN_DELAY_S)
        for i in range(num_tokens):
            choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            await asyncio.sleep(TOKEN_GAP_S)
        usage = {"prompt_tokens": 7, "completion_tokens": num_tokens, "total_tokens": 7 + num_tokens}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeServer, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = FakeServer()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    yield server, f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)


def specs(count: int, num_tokens: int) -> list[Any]:
    return build_requests(count, 0, LengthDist.parse("12"), LengthDist.parse(str(num_tokens)),
                          ReadingSpeedMix.parse("5"), source=StdlibDocSource())


def check_streams(result: Any, count: int, num_tokens: int) -> None:
    assert [r.index for r in result.results] == list(range(count))
    for r in result.results:
        assert r.ok, r.error
        assert len(r.token_times) == num_tokens
        assert r.num_tokens == num_tokens and r.num_prompt_tokens == 7
        assert r.token_times[0] >= FIRST_TOKEN_DELAY_S
        assert all(b >= a for a, b in zip(r.token_times, r.token_times[1:]))
        assert r.done_at is not None and r.done_at >= r.token_times[-1]


def test_closed_loop_streams_and_times_every_token(fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    server.bodies.clear()
    requests = specs(4, 5)
    result = run(Endpoint(url), requests, concurrency=2)
    check_streams(result, 4, 5)
    assert result.model == "fake-model"
    assert sorted(b["prompt"] for b in server.bodies) == sorted(s.prompt for s in requests)
    for body in server.bodies:
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["max_tokens"] == 5 and body["model"] == "fake-model"

    records = analyze(result, requests, ttft_target_s=1.0)
    summary = summarize(result, records, SLO(ttft_s=1.0, tpot_s=0.2))
    assert summary["num_ok"] == 4 and summary["output_tokens"] == 20
    assert summary["ttft_s"]["p50"] >= FIRST_TOKEN_DELAY_S
    assert summary["goodput_req_s"] <= summary["request_throughput_req_s"]
    assert all(rec.metrics.num_tokens == 5 for rec in records)


def test_open_loop_and_chat(fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    server.bodies.clear()
    requests = specs(6, 3)
    offsets = arrival_offsets(6, Arrivals("poisson", rate=50.0), seed=0)
    result = run(Endpoint(url + "/v1", model="named", api="chat"), requests, offsets=offsets, warmup=specs(1, 2))
    check_streams(result, 6, 3)
    assert all(r.sent_at >= offsets[r.index] for r in result.results)
    assert len(server.bodies) == 7                      # one warm-up request, not in the result
    assert all(b["model"] == "named" and b["messages"][0]["role"] == "user" for b in server.bodies)


def test_unreachable_server_is_an_error_per_request() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run(Endpoint(f"http://127.0.0.1:{port}", model="m"), specs(2, 3), concurrency=1)
    assert [r.ok for r in result.results] == [False, False]


def test_command_compares_sweeps_and_writes_json_and_plots(fake: tuple[FakeServer, str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    server, url = fake
    server.bodies.clear()
    out = tmp_path / "bench.json"
    status = cli.main(["--url", url, "--compare", url, "--num-requests", "4", "--prompt-words", "10",
                       "--output-tokens", "4", "--sweep", "20,inf", "--warmup", "0",
                       "--reading-speed-mix", "5:1,20:1", "--json", str(out), "--plot", str(tmp_path / "plots")])
    printed = capsys.readouterr().out
    assert status == 0
    assert "ratio" in printed and "highest rate with mean QoE" in printed
    doc = json.loads(out.read_text())
    assert len(doc["runs"]) == 4                         # two rates x two servers
    assert {r["request_rate"] for r in doc["runs"]} == {20.0, None}    # inf is written as null
    for run_doc in doc["runs"]:
        assert run_doc["summary"]["num_ok"] == 4
        assert all(len(r["token_times_s"]) == 4 and r["ttft_s"] >= FIRST_TOKEN_DELAY_S for r in run_doc["requests"])
    assert set(doc["sweep"]) == set(doc["servers"])
    # The same prompts for both servers; new prompts for the next rate, so no prefix cache carries over.
    prompts = [{b["prompt"] for b in server.bodies[i:i + 4]} for i in range(0, 16, 4)]
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and not prompts[0] & prompts[2]
    for name in ("qoe_ttft_vs_rate.png", "timelines_1.png", "timelines_2.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_command_closed_loop(fake: tuple[FakeServer, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, url = fake
    assert cli.main(["--url", url, "--concurrency", "3", "--num-requests", "3", "--output-tokens", "2"]) == 0
    assert "concurrency 3" in capsys.readouterr().out
    assert cli.main(["--url", url, "--concurrency", "3", "--sweep", "1,2"]) == 2


def test_labels_name_servers_in_order(fake: tuple[FakeServer, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._labels(["http://a:1", "http://b:2", "http://b:2"], ["qoe"]) == ["1:qoe", "2:b:2", "3:b:2"]
    assert cli._labels(["http://a:1", "http://b:2"], []) == ["a:1", "b:2"]
    _, url = fake
    out = tmp_path / "bench.json"
    assert cli.main(["--url", url, "--compare", url, "--label", "qoe", "--label", "fcfs", "--concurrency", "2",
                     "--num-requests", "2", "--output-tokens", "2", "--warmup", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["servers"] == ["qoe", "fcfs"]
    assert "qoe" in capsys.readouterr().out
    assert cli.main(["--url", url, "--label", "a", "--label", "b", "--concurrency", "1"]) == 2


def test_rate_inf_is_accepted() -> None:
    assert math.isinf(cli._rate("inf"))


def test_send_qoe_puts_each_requests_reader_in_the_body() -> None:
    spec = RequestSpec(0, "hello", 8, reading_speed=12.0)
    assert "qoe" not in Endpoint("http://x").body(spec, None)
    body = Endpoint("http://x", send_qoe_ttft_s=0.5).body(spec, "m")
    assert body["qoe"] == {"ttft_s": 0.5, "tokens_per_s": 12.0} and body["model"] == "m"
