"""A one-minute soak: 32 concurrent streams, zero errors, flat memory and file descriptors, and
every KV block free when idle. `scripts/soak.py --tiny --duration 600` is the ten-minute run."""
from __future__ import annotations

import asyncio

import pytest

from scripts.soak import MAX_RSS_GROWTH, soak
from tests.fixtures.tiny_models import TinyModel
from tests.server.conftest import start_server

DURATION_S = 60.0
WARMUP_S = 15.0
CONCURRENCY = 32


def test_one_minute_of_32_streams(tiny_models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(tiny_models["qwen3"], tmp_path_factory.mktemp("soak"), "--max-num-seqs", str(CONCURRENCY))
    try:
        report = asyncio.run(soak(server.url, server.model, DURATION_S, CONCURRENCY, pid=server.proc.pid,
                                  warmup_s=WARMUP_S))
    finally:
        assert server.stop() == 0
    print(report.summary())
    assert report.errors == []
    assert report.num_requests >= CONCURRENCY
    growth = report.rss_growth()
    assert growth is not None and growth < MAX_RSS_GROWTH, report.summary()
    # No leak: no more descriptors once idle than right after start (which can count the readiness probe's).
    assert report.idle_fds_before is not None and report.idle_fds_after is not None
    assert report.idle_fds_after <= report.idle_fds_before, report.summary()
    assert report.kv_idle_after
    assert report.failures() == []
