"""The seeded request schedule: arrival processes' statistics, prompts and length distributions."""
from __future__ import annotations

import math
import random
import statistics

import pytest

from rillet.bench.datasets import (LengthDist, ReadingSpeedMix, StdlibDocSource, build_requests, fit_to_tokens,
                                   sample_text)
from rillet.bench.loadgen import Arrivals, arrival_offsets

N = 20_000


def gaps(offsets: list[float]) -> list[float]:
    return [b - a for a, b in zip(offsets, offsets[1:])]


def test_poisson_gaps_are_exponential() -> None:
    g = gaps(arrival_offsets(N, Arrivals("poisson", rate=4.0), seed=0))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(0.25, rel=0.03)
    assert statistics.pstdev(g) / mean == pytest.approx(1.0, rel=0.05)    # exponential: CV 1
    assert sum(x < 0.25 * math.log(2) for x in g) / len(g) == pytest.approx(0.5, abs=0.02)   # median ln2/rate


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_keep_the_rate_and_scale_the_variance(burstiness: float) -> None:
    g = gaps(arrival_offsets(N, Arrivals("gamma", rate=2.0, burstiness=burstiness), seed=1))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(0.5, rel=0.05)
    assert (statistics.pvariance(g) / mean**2) == pytest.approx(1.0 / burstiness, rel=0.15)   # CV^2 = 1/k


def test_offsets_start_at_zero_and_rise() -> None:
    offsets = arrival_offsets(100, Arrivals("poisson", rate=3.0), seed=5)
    assert offsets[0] == 0.0
    assert all(b >= a for a, b in zip(offsets, offsets[1:]))


def test_same_seed_same_offsets_and_rates_scale_one_pattern() -> None:
    slow = arrival_offsets(50, Arrivals("gamma", rate=1.0, burstiness=0.5), seed=7)
    assert slow == arrival_offsets(50, Arrivals("gamma", rate=1.0, burstiness=0.5), seed=7)
    fast = arrival_offsets(50, Arrivals("gamma", rate=4.0, burstiness=0.5), seed=7)
    assert fast == pytest.approx([t / 4.0 for t in slow])
    assert slow != arrival_offsets(50, Arrivals("gamma", rate=1.0, burstiness=0.5), seed=8)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_offsets(5, Arrivals(rate=math.inf), seed=0) == [0.0] * 5


@pytest.mark.parametrize("kwargs", [{"kind": "uniform"}, {"rate": 0.0}, {"burstiness": 0.0}])
def test_arrivals_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Arrivals(**kwargs)  # type: ignore[arg-type]


def test_length_distributions() -> None:
    rng = random.Random(0)
    assert LengthDist.parse("60").sample(rng) == 60
    uniform = [LengthDist.parse("uniform:40,80").sample(rng) for _ in range(5000)]
    assert min(uniform) == 40 and max(uniform) == 80
    assert statistics.fmean(uniform) == pytest.approx(60, rel=0.02)
    normal = [LengthDist.parse("normal:100,10").sample(rng) for _ in range(5000)]
    assert statistics.fmean(normal) == pytest.approx(100, rel=0.01)
    assert statistics.pstdev(normal) == pytest.approx(10, rel=0.05)
    assert min(LengthDist.parse("normal:2,10").sample(rng) for _ in range(200)) == 1    # clipped at 1


@pytest.mark.parametrize("text", ["", "abc", "uniform:5", "uniform:9,3", "normal:10,-1", "zipf:1,2", "0"])
def test_length_distribution_errors(text: str) -> None:
    with pytest.raises(ValueError):
        LengthDist.parse(text)


def test_reading_speed_mix() -> None:
    mix = ReadingSpeedMix.parse("4:0.75,10:0.25")
    rng = random.Random(0)
    draws = [mix.sample(rng) for _ in range(8000)]
    assert set(draws) == {4.0, 10.0}
    assert draws.count(4.0) / len(draws) == pytest.approx(0.75, abs=0.02)
    with pytest.raises(ValueError):
        ReadingSpeedMix.parse("0:1")


def test_sample_text_has_exactly_the_words_asked_for() -> None:
    passages = [["one two three", "four five"], ["six seven eight nine"]]
    for seed in range(20):
        text = sample_text(passages, 7, random.Random(seed))
        assert len(text.split()) == 7


def test_stdlib_source_needs_no_download() -> None:
    passages = StdlibDocSource().passages()
    assert len(passages) > 100
    text = sample_text(passages, 60, random.Random(0))
    assert len(text.split()) == 60


def test_requests_are_seeded_and_independent_of_everything_else() -> None:
    source = StdlibDocSource()
    args = dict(num_requests=20, prompt_words=LengthDist.parse("uniform:30,90"),
                output_tokens=LengthDist.parse("uniform:16,64"), reading_speeds=ReadingSpeedMix.parse("5:1,8:1"),
                source=source)
    a = build_requests(seed=3, **args)  # type: ignore[arg-type]
    assert a == build_requests(seed=3, **args)  # type: ignore[arg-type]
    assert [s.index for s in a] == list(range(20))
    assert all(30 <= len(s.prompt.split()) <= 90 and 16 <= s.max_tokens <= 64 for s in a)
    assert {s.reading_speed for s in a} == {5.0, 8.0}
    assert [s.prompt for s in a] != [s.prompt for s in build_requests(seed=4, **args)]  # type: ignore[arg-type]
    warmup = build_requests(seed=3, purpose="warmup", **args)  # type: ignore[arg-type]
    assert not {s.prompt for s in warmup} & {s.prompt for s in a}


class WordTokenizer:
    """One token per whitespace-separated word."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join("x" * i for i in ids)


def test_prompt_lengths_in_tokens() -> None:
    tok = WordTokenizer()
    text = fit_to_tokens(lambda n: " ".join(["ab"] * (n // 3 + 1)), 50, tok)   # draws too few words at first
    assert len(tok.encode(text)) == 50
    specs = build_requests(5, 0, None, LengthDist.parse("8"), ReadingSpeedMix.parse("5"),
                           prompt_tokens=LengthDist.parse("25"), tokenizer=tok, source=StdlibDocSource())
    assert all(len(tok.encode(s.prompt)) == 25 for s in specs)
