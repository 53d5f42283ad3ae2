"""SIGTERM: new requests get 503, in-flight streams finish (or are aborted past the timeout), exit 0."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.tiny_models import TinyModel
from tests.server.conftest import LiveServer, free_port, start_server
from tests.server.test_api import check_stream_shape

NUM_STREAMS = 4


def open_streams(server: LiveServer, max_tokens: int) -> tuple[list[httpx.Client], list[Any], list[Any]]:
    """Start streams and read each one's first event, so all are running before the signal."""
    clients, responses, firsts = [], [], []
    for i in range(NUM_STREAMS):
        http = server.http(timeout=120)
        body = {"model": server.model, "prompt": f"Stream {i}:", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        response = http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
        assert response.status_code == 200
        lines = response.iter_lines()
        firsts.append(next(line for line in lines if line.startswith("data: ")))
        clients.append(http)
        responses.append(lines)
    return clients, responses, firsts


def read_rest(first: str, lines: Any) -> list[Any]:
    events = [json.loads(first[len("data: "):])]
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_sigterm_drains_streams_then_exits_0(qwen3: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(qwen3, tmp_path_factory.mktemp("drain"), "--shutdown-timeout", "300")
    clients, lines, firsts = open_streams(server, max_tokens=400)
    server.proc.send_signal(signal.SIGTERM)
    with ThreadPoolExecutor(NUM_STREAMS) as pool:
        rest = [pool.submit(read_rest, f, it) for f, it in zip(firsts, lines)]
        refused = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": "late"})
        health = httpx.get(f"{server.url}/health")
        events = [r.result(timeout=300) for r in rest]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
    assert health.status_code == 503
    for ev in events:
        assert check_stream_shape(ev, n=1) == {0: "length"}
        assert ev[-2]["usage"]["completion_tokens"] == 400
    assert server.proc.wait(60) == 0
    for http in clients:
        http.close()


def test_streams_past_the_timeout_are_aborted(qwen3: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(qwen3, tmp_path_factory.mktemp("abort"), "--shutdown-timeout", "0.5")
    clients, lines, firsts = open_streams(server, max_tokens=3800)
    server.proc.send_signal(signal.SIGTERM)
    events = [read_rest(f, it) for f, it in zip(firsts, lines)]
    for ev in events:
        assert check_stream_shape(ev, n=1) == {0: "abort"}
    assert server.proc.wait(60) == 0
    for http in clients:
        http.close()


def test_a_model_that_fails_to_load_exits_1(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    cmd = [sys.executable, "-m", "rillet.cli", "serve", "--model", str(broken), "--port", str(free_port())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "failed to load" in done.stderr
    missing = subprocess.run([*cmd[:5], str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
