"""Per-request streaming metrics from client-clock token arrivals: TTFT, TPOT, gaps, stall, e2e, Andes QoE.

Andes QoE (Liu et al., "Andes: Defining and Enhancing Quality-of-Experience in LLM-Based Text Streaming
Services", 2024) compares two token-count curves of one request:

    tokens
      n |                      ____________      expected: token k at ttft_target + (k-1)/reading_speed
        |               _____|  ......:          displayed: arrivals passed through a client buffer
        |          ____|   ....:                            that shows at most reading_speed tokens/s
        |     ____|  ....:
        |    |  ....:
      0 +----+--:------------------------> t
             ttft_target

    QoE = area under displayed ÷ area under expected, both integrated from the request's send time
          to the horizon T = max(last expected time, last displayed time), capped at 1.

Both curves are step functions (a token either is on screen or is not), so the area up to T of a curve
with token times t_1..t_n is sum(T - t_k) = n*T - sum(t_k): the integrals are exact, no sampling.
Tokens that arrive early are displayed early, which can lift the ratio above 1; hence the cap.

For a stream that follows the expected pace but starts D seconds late the ratio has a closed form,
QoE = (n-1) / (n-1 + 2*r*D) with r the reading speed: 100 tokens with a 5 s TTFT against a 1 s target
at 5 tokens/s give 99/139 = 0.712.

TPOT is (e2e - ttft) / (n - 1): the mean time per output token after the first, with e2e measured to the
last token's arrival. It is undefined (None) for a single-token response.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class QoETarget:
    """What a user expects: the first token within `ttft_s`, then `reading_speed` tokens per second."""

    ttft_s: float = 1.0
    reading_speed: float = 5.0

    def __post_init__(self) -> None:
        if not self.ttft_s >= 0:
            raise ValueError(f"the TTFT target must be >= 0 seconds, got {self.ttft_s}")
        if not (self.reading_speed > 0 and math.isfinite(self.reading_speed)):
            raise ValueError(f"the reading speed must be a positive number of tokens/s, got {self.reading_speed}")


def expected_times(num_tokens: int, target: QoETarget) -> list[float]:
    """When each of `num_tokens` tokens should be on screen: the first at the TTFT target, then on pace."""
    return [target.ttft_s + k / target.reading_speed for k in range(num_tokens)]


def displayed_times(arrival_times: list[float], reading_speed: float) -> list[float]:
    """When each token reaches the screen through a buffer that releases at most `reading_speed` tokens/s.

    A token is shown when it has arrived and at least 1/reading_speed after the previous one was shown;
    the first is shown on arrival.
    """
    interval = 1.0 / reading_speed
    shown: list[float] = []
    for t in arrival_times:
        shown.append(t if not shown else max(t, shown[-1] + interval))
    return shown


def qoe(arrival_times: list[float], target: QoETarget) -> float:
    """Andes QoE in [0, 1] of one request; `arrival_times` are seconds since the request was sent, sorted."""
    if not arrival_times:
        return 0.0
    shown = displayed_times(arrival_times, target.reading_speed)
    expected = expected_times(len(shown), target)
    horizon = max(shown[-1], expected[-1])
    area_expected = _area_under_count(expected, horizon)
    area_shown = _area_under_count(shown, horizon)
    if area_expected <= 0.0:
        # NOTE: one token shown exactly at the target: both curves are empty up to the horizon.
        return 1.0 if shown[-1] <= expected[-1] else 0.0
    return min(1.0, area_shown / area_expected)


def _area_under_count(times: list[float], horizon: float) -> float:
    """Integral over [0, horizon] of the number of times <= t."""
    return sum(horizon - t for t in times if t < horizon)


@dataclass(frozen=True)
class RequestMetrics:
    """What one streamed request looked like from the client. Times in seconds since it was sent."""

    num_tokens: int
    ttft: float | None            # first token's arrival
    tpot: float | None            # (e2e - ttft) / (num_tokens - 1)
    e2e: float | None             # last token's arrival
    gaps: list[float]             # every inter-token gap, num_tokens - 1 of them
    max_stall: float              # the longest inter-token gap (0 with fewer than two tokens)
    qoe: float


def request_metrics(arrival_times: list[float], target: QoETarget) -> RequestMetrics:
    """All per-request metrics of one stream; an empty stream (a failed request) has QoE 0."""
    n = len(arrival_times)
    if n == 0:
        return RequestMetrics(0, None, None, None, [], 0.0, 0.0)
    ttft, e2e = arrival_times[0], arrival_times[-1]
    gaps = [b - a for a, b in zip(arrival_times, arrival_times[1:])]
    tpot = (e2e - ttft) / (n - 1) if n > 1 else None
    return RequestMetrics(n, ttft, tpot, e2e, gaps, max(gaps, default=0.0), qoe(arrival_times, target))
