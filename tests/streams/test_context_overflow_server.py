"""context_overflow on a live server (tiny qwen3, context limit 128): error, truncate_left, sink, and
scoring a prompt longer than the context with echo + logprobs."""
from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest

from tests.fixtures.tiny_models import TinyModel
from tests.server.conftest import LiveServer, start_server

LIMIT = 128


@pytest.fixture(scope="module")
def small(tiny_models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tiny_models["qwen3"], tmp_path_factory.mktemp("overflow"), "--max-model-len", str(LIMIT))
    yield live
    live.stop()


def ids(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 104729) % 400 + 50 for i in range(n)]


def complete(server: LiveServer, **body: object) -> dict:  # type: ignore[type-arg]
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": server.model, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_error_mode_names_the_limit(small: LiveServer) -> None:
    with small.http() as http:
        r = http.post("/v1/completions", json={"prompt": ids(200), "max_tokens": 4})
    assert r.status_code == 400 and f"context limit is {LIMIT}" in r.json()["error"]["message"]


def test_truncate_left_reports_what_it_cut(small: LiveServer) -> None:
    body = complete(small, prompt=ids(200), max_tokens=8, ignore_eos=True, context_overflow="truncate_left")
    choice = body["choices"][0]
    assert choice["context_overflow"]["mode"] == "truncate_left"
    assert choice["context_overflow"]["num_truncated_tokens"] == 200 - (LIMIT - 8)
    assert body["usage"]["prompt_tokens"] == LIMIT - 8 and body["usage"]["completion_tokens"] == 8


def test_sink_equals_normal_before_the_limit(small: LiveServer) -> None:
    normal = complete(small, prompt=ids(40, 1), max_tokens=30, ignore_eos=True)
    sink = complete(small, prompt=ids(40, 1), max_tokens=30, ignore_eos=True, context_overflow="sink")
    assert sink["choices"][0]["text"] == normal["choices"][0]["text"]
    assert normal["choices"][0]["context_overflow"] is None
    assert sink["choices"][0]["context_overflow"]["num_evicted_tokens"] == 0


def test_sink_generates_far_past_the_limit_and_says_so(small: LiveServer) -> None:
    body = complete(small, prompt=ids(40, 2), max_tokens=400, ignore_eos=True, context_overflow="sink")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 400
    report = choice["context_overflow"]
    assert report["mode"] == "sink" and report["first_eviction_at"] == LIMIT
    assert report["num_evicted_tokens"] >= 440 - 1 - LIMIT and report["num_evictions"] > 0
    # Streamed: the final chunk carries the same report.
    body = {"prompt": ids(40, 2), "max_tokens": 400, "ignore_eos": True, "temperature": 0,
            "context_overflow": "sink", "stream": True}
    with small.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    assert final["choices"][0]["context_overflow"] == report
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]


def test_echo_scores_a_prompt_longer_than_the_context(small: LiveServer) -> None:
    body = complete(small, prompt=ids(300, 3), max_tokens=1, logprobs=0, echo=True, context_overflow="sink",
                    num_sink_tokens=4)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 301 and logprobs["token_logprobs"][0] is None
    assert all(math.isfinite(lp) and lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert body["choices"][0]["context_overflow"]["num_evicted_tokens"] > 0
    short = complete(small, prompt=ids(300, 3)[:100], max_tokens=1, logprobs=0, echo=True)
    assert short["choices"][0]["logprobs"]["token_logprobs"][1:100] == pytest.approx(
        logprobs["token_logprobs"][1:100], abs=1e-4)


def test_bad_overflow_fields_are_400s(small: LiveServer) -> None:
    with small.http() as http:
        bad_mode = http.post("/v1/completions", json={"prompt": "hi", "context_overflow": "wrap"})
        sinks_without_sink = http.post("/v1/completions", json={"prompt": "hi", "num_sink_tokens": 4})
    assert bad_mode.status_code == 400
    assert sinks_without_sink.status_code == 400 and "num_sink_tokens" in sinks_without_sink.text
