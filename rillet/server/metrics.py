"""Prometheus metrics of the server, and the per-request timer that feeds them and the request log.

Latencies are measured on the event loop when outputs reach the handler, so the engine thread
does no timing work; engine gauges are read from the `EngineStats` snapshot at scrape time.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rillet.engine.outputs import RequestOutput
from rillet.server.async_engine import EngineStats

logger = logging.getLogger("rillet.server.requests")
disable_created_metrics()  # no `*_created` series: they double the output and nobody graphs them

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Gauges read from the engine thread's latest snapshot."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        yield GaugeMetricFamily("rillet_num_requests_waiting", "sequences waiting for a slot", s.num_waiting)
        yield GaugeMetricFamily("rillet_num_requests_running", "sequences in the running batch", s.num_running)
        yield CounterMetricFamily("rillet_num_preemptions", "sequences preempted to free KV blocks",
                                  s.num_preemptions)
        yield GaugeMetricFamily("rillet_kv_cache_usage_ratio", "fraction of KV blocks in use (fullest group)",
                                s.kv_usage)
        yield GaugeMetricFamily("rillet_prefix_cache_hit_rate", "prompt tokens found in the prefix cache, "
                                "as a fraction of those looked up", s.prefix_cache_hit_rate)
        yield GaugeMetricFamily("rillet_engine_heartbeat_age_seconds", "seconds since the engine loop's last "
                                "iteration", max(0.0, time.monotonic() - s.heartbeat))
        yield _per_group("rillet_kv_cache_free_blocks", "free KV blocks per cache group", s.kv_free_blocks)
        yield _per_group("rillet_kv_cache_blocks", "usable KV blocks per cache group", s.kv_usable_blocks)


def _per_group(name: str, doc: str, values: tuple[int, ...]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["group"])
    for group, value in enumerate(values):
        family.add_metric([str(group)], value)
    return family


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rillet_requests", "finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.ttft = Histogram("rillet_time_to_first_token_seconds", "arrival to first output token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("rillet_inter_token_latency_seconds", "time between a choice's output tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("rillet_e2e_request_latency_seconds", "arrival to last output token",
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("rillet_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("rillet_generation_tokens", "tokens generated", registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Times one request from arrival to its last choice, then counts and logs it once."""

    def __init__(self, metrics: ServerMetrics, request_id: str, arrival: float) -> None:
        self.metrics = metrics
        self.request_id = request_id
        self.arrival = arrival
        self.num_prompt_tokens = 0
        self.n = 1
        self.first_token_at: float | None = None
        self._last_at: dict[int, float] = {}
        self._num_output: dict[int, int] = {}
        self._reasons: dict[int, str] = {}
        self._done = False

    def accepted(self, num_prompt_tokens: int, n: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.n = n
        self.metrics.prompt_tokens.inc(num_prompt_tokens)

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.new_token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
                self.metrics.ttft.observe(now - self.arrival)
            elif out.index in self._last_at:
                self.metrics.itl.observe(now - self._last_at[out.index])
            self._last_at[out.index] = now
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
        self._num_output[out.index] = max(self._num_output.get(out.index, 0), out.num_output_tokens)
        if out.finished and out.finish_reason:
            self._reasons[out.index] = out.finish_reason

    def finish(self, failed: bool = False) -> None:
        """Count and log the request; choices that never finished were aborted."""
        if self._done:
            return
        self._done = True
        now = time.monotonic()
        reason = self._reason(failed)
        self.metrics.requests.labels(finish_reason=reason).inc()
        self.metrics.e2e.observe(now - self.arrival)
        ttft = f"{self.first_token_at - self.arrival:.3f} s" if self.first_token_at is not None else "-"
        logger.info("%s: prompt %d tokens, output %d tokens, ttft %s, total %.3f s, finish %s",
                    self.request_id, self.num_prompt_tokens, sum(self._num_output.values()), ttft,
                    now - self.arrival, reason)

    def _reason(self, failed: bool) -> str:
        reasons = set(self._reasons.values())
        if failed:
            return "error"
        if "abort" in reasons or len(self._reasons) < self.n:
            return "abort"
        return self._reasons.get(0) or sorted(reasons)[0]
