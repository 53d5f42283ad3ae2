"""The scheduling fields of a request body against a live server: qoe targets, priority, stream_pace,
and the QoE metrics they feed."""
from __future__ import annotations

import time

import httpx

from tests.server.conftest import LiveServer

BODY = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


def _tokens_and_times(http: httpx.Client, body: dict) -> tuple[str, list[float]]:
    text, times = "", []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                import json
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    text += chunk["choices"][0]["text"]
                    times.append(time.monotonic())
    return text, times


def test_qoe_and_priority_fields_are_accepted_and_do_not_change_the_output(server: LiveServer) -> None:
    http = server.http()
    plain = http.post("/v1/completions", json=BODY).json()["choices"][0]["text"]
    body = {**BODY, "qoe": {"ttft_s": 0.5, "tokens_per_s": 20}, "priority": -3, "user": "tenant-a"}
    assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == plain
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "qoe": {"tokens_per_s": 8}}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200


def test_bad_qoe_fields_get_a_400(server: LiveServer) -> None:
    http = server.http()
    for bad in ({"qoe": {"tokens_per_s": 0}}, {"qoe": {"ttft_s": -1}}, {"qoe": {"speed": 3}}, {"qoe": 5},
                {"priority": "high"}, {"stream_pace": "yes"}):
        r = http.post("/v1/completions", json={**BODY, **bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert http.post("/v1/completions", json=BODY).status_code == 200  # and the server still serves


def test_stream_pace_delivers_at_the_readers_speed(server: LiveServer) -> None:
    http = server.http()
    body = {**BODY, "max_tokens": 9, "qoe": {"tokens_per_s": 10}}
    free_text, _ = _tokens_and_times(http, body)
    paced_text, times = _tokens_and_times(http, {**body, "stream_pace": True})
    assert paced_text == free_text
    # 9 tokens at 10 tokens/s: the last leaves at least 0.8 s after the first
    assert len(times) >= 2 and times[-1] - times[0] >= 0.8 * (len(times) - 1) / 9 - 0.01


def test_finished_requests_feed_the_qoe_histogram(server: LiveServer) -> None:
    before = server.metrics().get("rillet_request_qoe_count", 0.0)
    http = server.http()
    _tokens_and_times(http, BODY)
    after = server.wait_for_metrics(lambda m: m.get("rillet_request_qoe_count", 0.0) >= before + 1)
    assert after["rillet_request_qoe_count"] >= before + 1
    assert 0.0 < after["rillet_request_qoe_sum"] <= after["rillet_request_qoe_count"]
    assert "rillet_stalls_total" in after and "rillet_behind_pace_seconds_total" in after


def test_scenario_probes_run_against_a_live_server(server: LiveServer) -> None:
    import asyncio

    from rillet.bench.scenarios import stall, tenants

    got = asyncio.run(stall(server.url, long_words=300, stream_tokens=400, settle_s=0.5))
    assert got["long_prompt_ttft_s"] > 0 and got["max_gap_during_prefill_ms"] > 0
    shared = asyncio.run(tenants(server.url, rate=20.0, num=4, words=10, max_tokens=4))
    assert shared["light_ttft_p99_alone_s"] > 0 and shared["p99_ratio"] > 0
