"""Fuzzing a live server: schemathesis over its OpenAPI schema, then hypothesis-generated bodies.
Zero 5xx over 5,000 requests; the long runs are `scripts/fuzz.py`."""
from __future__ import annotations

import httpx

from scripts.fuzz import FuzzReport, fuzz_bodies, fuzz_schema
from tests.reliability.conftest import canary, kv_idle
from tests.server.conftest import LiveServer

NUM_SCHEMA_CASES = 1000
NUM_BODY_CASES = 4000


def check(report: FuzzReport, num_cases: int) -> None:
    assert report.num_5xx == 0, report.failures[:10]
    assert report.failures == [], report.failures[:10]
    assert report.num_requests == num_cases
    statuses = {status for (_, status) in report.statuses}
    assert 200 in statuses and 400 in statuses, report.summary()  # both sides of validation were reached


def test_fuzz_five_thousand_requests_no_5xx(guarded: LiveServer) -> None:
    with guarded.http() as http:
        before = canary(http, guarded)
    check(fuzz_schema(guarded.url, guarded.headers, NUM_SCHEMA_CASES), NUM_SCHEMA_CASES)
    check(fuzz_bodies(guarded.url, guarded.headers, guarded.model, NUM_BODY_CASES), NUM_BODY_CASES)
    assert kv_idle(guarded.wait_for_metrics(kv_idle))
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    with guarded.http() as http:
        assert canary(http, guarded) == before
