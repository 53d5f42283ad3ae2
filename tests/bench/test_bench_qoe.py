"""Andes QoE and the per-request metrics on hand-built token timelines, against values worked out by hand."""
from __future__ import annotations

import pytest

from rillet.bench.qoe import QoETarget, displayed_times, expected_times, qoe, request_metrics

TARGET = QoETarget(ttft_s=1.0, reading_speed=5.0)


def late_by(delay_s: float, num_tokens: int, target: QoETarget = TARGET) -> float:
    """Closed form for a stream on pace but `delay_s` late: areas differ by n*D, the expected one is
    n*D + sum_k (k-1)/r = n*D + n(n-1)/(2r) up to the horizon."""
    n, r = num_tokens, target.reading_speed
    return (n - 1) / (n - 1 + 2 * r * delay_s)


def test_expected_timeline_is_first_token_at_target_then_reading_speed() -> None:
    assert expected_times(4, TARGET) == pytest.approx([1.0, 1.2, 1.4, 1.6])


def test_on_time_stream_scores_one() -> None:
    assert qoe(expected_times(100, TARGET), TARGET) == 1.0


def test_early_stream_is_capped_at_one() -> None:
    arrivals = [0.1 + k * 0.01 for k in range(50)]        # far ahead of the target at 100 tokens/s
    assert qoe(arrivals, TARGET) == 1.0


def test_five_second_ttft_then_on_pace() -> None:
    # 100 tokens, first at 5 s instead of 1 s, then 5 tokens/s: a 4 s delay of every token.
    arrivals = [5.0 + k / 5.0 for k in range(100)]
    value = qoe(arrivals, TARGET)
    assert value == pytest.approx(99 / 139, rel=1e-12)      # 0.7122...
    assert value == pytest.approx(0.72, abs=0.01)            # the figure the requirements quote


@pytest.mark.parametrize(("delay_s", "num_tokens"), [(0.5, 10), (2.0, 10), (4.0, 100), (30.0, 64), (1.0, 2)])
def test_uniform_delay_matches_closed_form(delay_s: float, num_tokens: int) -> None:
    arrivals = [t + delay_s for t in expected_times(num_tokens, TARGET)]
    assert qoe(arrivals, TARGET) == pytest.approx(late_by(delay_s, num_tokens), rel=1e-12)


def test_ten_second_stall_after_twenty_of_hundred_tokens() -> None:
    # Tokens 1..20 on time, tokens 21..100 on pace but 10 s late. Horizon T = 20.8 + 10 = 30.8 s.
    # Expected area: sum(T - e_k) = 100*10 + sum_k (k-1)/5 = 1000 + 990 = 1990.
    # Displayed area: 80 tokens are 10 s later, so 1990 - 800 = 1190.
    on_time = expected_times(100, TARGET)
    arrivals = on_time[:20] + [t + 10.0 for t in on_time[20:]]
    value = qoe(arrivals, TARGET)
    assert value == pytest.approx(1190 / 1990, rel=1e-12)   # 0.598
    assert value == pytest.approx(0.60, abs=0.01)


def test_burst_at_target_is_displayed_at_reading_speed() -> None:
    arrivals = [1.0] * 10                                    # everything at once, exactly at the TTFT target
    assert displayed_times(arrivals, 5.0) == pytest.approx(expected_times(10, TARGET))
    assert qoe(arrivals, TARGET) == pytest.approx(1.0)


def test_late_burst_is_a_delayed_stream() -> None:
    arrivals = [3.0] * 10                                    # everything at once, 2 s after the target
    assert displayed_times(arrivals, 5.0) == pytest.approx([3.0 + k / 5.0 for k in range(10)])
    assert qoe(arrivals, TARGET) == pytest.approx(late_by(2.0, 10), rel=1e-12)   # 9/29


def test_buffer_only_holds_back_what_comes_too_fast() -> None:
    assert displayed_times([0.0, 0.05, 1.0, 1.1, 1.15], 5.0) == pytest.approx([0.0, 0.2, 1.0, 1.2, 1.4])


def test_faster_reader_expects_more() -> None:
    # A stream on time for 5 tokens/s, judged by a 10 tokens/s reader. With T = 1 + (n-1)/5:
    # displayed area n(n-1)/10, expected area sum((n-1)/5 - (k-1)/10) = 3n(n-1)/20, ratio 2/3.
    arrivals = expected_times(50, TARGET)
    assert qoe(arrivals, QoETarget(1.0, 10.0)) == pytest.approx(2 / 3, rel=1e-12)


def test_single_token_and_empty_streams() -> None:
    assert qoe([], TARGET) == 0.0
    assert qoe([1.0], TARGET) == 1.0
    assert qoe([0.3], TARGET) == 1.0
    assert qoe([1.5], TARGET) == 0.0    # one late token: nothing shown while something was expected


def test_request_metrics() -> None:
    m = request_metrics([0.5, 0.6, 0.8, 1.4], TARGET)
    assert m.num_tokens == 4
    assert m.ttft == 0.5
    assert m.e2e == 1.4
    assert m.tpot == pytest.approx((1.4 - 0.5) / 3)          # (e2e - ttft) / (n - 1)
    assert m.gaps == pytest.approx([0.1, 0.2, 0.6])
    assert m.max_stall == pytest.approx(0.6)
    assert m.qoe == 1.0


def test_request_metrics_of_short_streams() -> None:
    one = request_metrics([0.7], TARGET)
    assert (one.ttft, one.tpot, one.gaps, one.max_stall) == (0.7, None, [], 0.0)
    empty = request_metrics([], TARGET)
    assert (empty.num_tokens, empty.ttft, empty.qoe) == (0, None, 0.0)


@pytest.mark.parametrize("kwargs", [{"ttft_s": -1.0}, {"reading_speed": 0.0}, {"reading_speed": float("inf")}])
def test_target_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        QoETarget(**kwargs)
