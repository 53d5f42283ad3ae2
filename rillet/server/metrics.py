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

from rillet.bench.qoe import QoETarget as BenchTarget
from rillet.bench.qoe import displayed_times, qoe
from rillet.engine.outputs import RequestOutput
from rillet.engine.policy import QoETarget
from rillet.server.async_engine import EngineStats

logger = logging.getLogger("rillet.server.requests")
disable_created_metrics()  # no `*_created` series: they double the output and nobody graphs them

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_QOE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
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
    def __init__(self, stats: Callable[[], EngineStats], default_qoe: QoETarget | None = None,
                 stall_s: float = 0.2) -> None:
        self.default_qoe = default_qoe or QoETarget()
        self.stall_s = stall_s
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
        self.qoe = Histogram("rillet_request_qoe", "Andes QoE of each finished choice against its reader's "
                             "target (server clock)", buckets=_QOE_BUCKETS, registry=r)
        self.stalls = Counter("rillet_stalls", "inter-token gaps longer than the stall target", registry=r)
        self.behind_pace = Counter("rillet_behind_pace_seconds", "time readers waited for text beyond their "
                                   "expected pace (a late first token, then an empty screen)", registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _time_behind(times: list[float], target: BenchTarget) -> float:
    """Seconds a reader of tokens arriving at `times` waited beyond the expected pace."""
    waited = max(0.0, times[0] - target.ttft_s) if times else 0.0
    interval = 1.0 / target.reading_speed
    for shown, t in zip(displayed_times(times, target.reading_speed), times[1:]):
        waited += max(0.0, t - (shown + interval))
    return waited


class RequestTimer:
    """Times one request from arrival to its last choice, then counts and logs it once."""

    def __init__(self, metrics: ServerMetrics, request_id: str, arrival: float,
                 qoe: QoETarget | None = None) -> None:
        self.metrics = metrics
        self.request_id = request_id
        self.arrival = arrival
        self.target = qoe or metrics.default_qoe
        self._times: dict[int, list[float]] = {}  # choice -> token arrival times since `arrival`
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
                gap = now - self._last_at[out.index]
                self.metrics.itl.observe(gap)
                if gap > self.metrics.stall_s:
                    self.metrics.stalls.inc()
            self._last_at[out.index] = now
            self._times.setdefault(out.index, []).extend([now - self.arrival] * len(out.new_token_ids))
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
        if reason in ("stop", "length"):
            target = BenchTarget(self.target.ttft_s, self.target.tokens_per_s)
            for times in self._times.values():
                self.metrics.qoe.observe(qoe(times, target))
                self.metrics.behind_pace.inc(_time_behind(times, target))
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
