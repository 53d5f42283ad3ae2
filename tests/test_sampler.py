"""Sampler: exact checks against argmax / log_softmax / a naive reference, and loose but
deterministic (fixed seeds) checks of sampled distributions."""
from __future__ import annotations

import functools
import math
from collections import Counter

import pytest
import torch

from rillet.engine import sampler as sampler_module
from rillet.engine.sampler import Sampler, SamplingRow, _edit_logits
from rillet.sampling_params import SamplingParams


def row(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None,
        generator: torch.Generator | None = None, banned: tuple[int, ...] = ()) -> SamplingRow:
    return SamplingRow(params, prompt or [], output or [], generator, banned)


def ids(tokens: list) -> list[int]:
    return [t.token_id for t in tokens]


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filtered distribution, the slow way: temperature, top-k, top-p, min-p over a full sort."""
    probs = torch.softmax(logits.double() / p.temperature, -1)
    order = probs.argsort(descending=True)
    sorted_p = probs[order]
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if 0 < p.top_k < len(probs):
        keep[p.top_k:] = False
    renorm = torch.where(keep, sorted_p, 0.0)
    renorm = renorm / renorm.sum()
    keep &= (renorm.cumsum(0) - renorm) < p.top_p
    keep &= sorted_p >= p.min_p * sorted_p[0]
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


def sample_counts(logits: torch.Tensor, p: SamplingParams, num_samples: int, seed: int = 0) -> Counter[int]:
    sampler, counts = Sampler(seed), Counter[int]()
    per_call = 250
    batch = logits.expand(per_call, -1).contiguous()
    for _ in range(num_samples // per_call):
        counts.update(ids(sampler(batch, [row(p)] * per_call)))
    return counts


def assert_matches(counts: Counter[int], probs: torch.Tensor) -> None:
    """No sample outside the support, and a chi-square statistic far below a 6-sigma bound."""
    n = sum(counts.values())
    support = set(probs.nonzero().flatten().tolist())
    assert set(counts) <= support, sorted(set(counts) - support)[:10]
    expected = (probs * n).tolist()
    big = [t for t in support if expected[t] >= 5]
    rest = [t for t in support if expected[t] < 5]
    bins = [(counts[t], expected[t]) for t in big]
    if rest and sum(expected[t] for t in rest) >= 5:
        bins.append((sum(counts[t] for t in rest), sum(expected[t] for t in rest)))
    chi2 = sum((o - e) ** 2 / e for o, e in bins)
    df = max(len(bins) - 1, 1)
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)


@functools.cache
def peaked_logits(vocab_size: int, seed: int, scale: float = 1.6) -> torch.Tensor:
    """LLM-like: logits fall with log rank, tokens in random order. Cached: do not modify."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.arange(1, vocab_size + 1, dtype=torch.float32)
    logits = -scale * rank.log() + 0.3 * torch.randn(vocab_size, generator=g)
    return logits[torch.randperm(vocab_size, generator=g)] + 5


# -- greedy -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size", [1, 10, 64, 130, 5000, 2**18])
def test_greedy_is_argmax(vocab_size: int) -> None:
    logits = torch.randn(7, vocab_size, generator=torch.Generator().manual_seed(vocab_size))
    logits[0, -1] = 100.0  # the max in the last (possibly partial) chunk
    out = Sampler(0)(logits, [row(SamplingParams(temperature=0))] * 7)
    assert ids(out) == logits.argmax(-1).tolist()
    assert all(t.logprob is None and t.top_logprobs is None for t in out)


def test_greedy_ties_pick_the_first_index_like_argmax() -> None:
    logits = torch.zeros(3, 1000)
    logits[0, [5, 700]] = 3.0
    logits[1, [130, 131, 999]] = 3.0
    out = Sampler(0)(logits, [row(SamplingParams(temperature=0))] * 3)
    assert ids(out) == logits.argmax(-1).tolist() == [5, 130, 0]


def test_greedy_slow_path_matches_fast_path() -> None:
    logits = torch.randn(5, 3000, generator=torch.Generator().manual_seed(1))
    fast = Sampler(0)(logits, [row(SamplingParams(temperature=0))] * 5)
    slow = Sampler(0)(logits, [row(SamplingParams(temperature=0, logprobs=2))] * 5)
    assert ids(fast) == ids(slow) == logits.argmax(-1).tolist()


def test_top_k_1_is_greedy() -> None:
    logits = torch.randn(6, 4000, generator=torch.Generator().manual_seed(2))
    out = Sampler(0)(logits, [row(SamplingParams(temperature=1.5, top_k=1))] * 6)
    assert ids(out) == logits.argmax(-1).tolist()


def test_tiny_top_p_and_min_p_1_are_argmax() -> None:
    logits = torch.randn(6, 4000, generator=torch.Generator().manual_seed(3)) * 3
    sampler = Sampler(0)
    for params in (SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0), SamplingParams(top_k=40, top_p=1e-6)):
        assert ids(sampler(logits, [row(params)] * 6)) == logits.argmax(-1).tolist()


def test_argmax_in_mixed_batch_sees_edits() -> None:
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(4))
    best = logits.argmax(-1).tolist()
    rows = [row(SamplingParams(temperature=0), banned=(best[0],)),
            row(SamplingParams(top_k=5)),
            row(SamplingParams(temperature=0, logit_bias={7: 100.0}))]
    out = ids(Sampler(0)(logits, rows))
    assert out[0] == logits[0].topk(2).indices[1].item()
    assert out[2] == 7


# -- logit edits --------------------------------------------------------------------------------------

def test_logit_bias_forces_and_forbids() -> None:
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(5))
    json_bias = {"42": 100}  # keys as a JSON body has them
    forced = Sampler(0)(logits, [row(SamplingParams(logit_bias=json_bias))] * 8)  # type: ignore[arg-type]
    assert ids(forced) == [42] * 8
    logits[:, 3] = 50.0
    forbidden = Sampler(0)(logits, [row(SamplingParams(logit_bias={3: -100}))] * 8)
    assert 3 not in ids(forbidden)


def test_banned_ids_are_never_chosen() -> None:
    logits = torch.zeros(200, 50)
    logits[:, :3] = 20.0
    out = Sampler(0)(logits, [row(SamplingParams(), banned=(0, 1, 2))] * 200)
    assert not set(ids(out)) & {0, 1, 2}


def naive_edits(logits: list[float], r: SamplingRow) -> list[float]:
    p, out = r.params, list(logits)
    for t, b in (p.logit_bias or {}).items():
        out[t] += b
    for t in set(r.prompt_ids + r.output_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t, count in Counter(r.output_ids).items():
        out[t] -= count * p.frequency_penalty + p.presence_penalty
    for t in r.banned_ids:
        out[t] = -math.inf
    return out


def test_edits_match_naive_reference_and_are_undone() -> None:
    g = torch.Generator().manual_seed(6)
    vocab_size = 40
    logits = torch.randn(4, vocab_size, generator=g) * 3
    rows = [
        row(SamplingParams(repetition_penalty=1.3), [1, 2, 2, 30], [5, 5, 1]),
        row(SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4), [1, 2], [3, 3, 3, 9]),
        row(SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=1.5,
                           logit_bias={9: 2.5, 0: -3.0}), [0, 9, 9], [9, 4, 4], banned=(7,)),
        row(SamplingParams()),  # untouched
    ]
    before = logits.clone()
    undo = _edit_logits(logits, rows)
    assert undo is not None
    for r, (got, raw) in enumerate(zip(logits, before)):
        torch.testing.assert_close(got, torch.tensor(naive_edits(raw.tolist(), rows[r])), rtol=1e-5, atol=1e-5)
    positions, originals = undo
    logits.view(-1)[positions] = originals
    assert torch.equal(logits, before)


def test_sampler_leaves_logits_unchanged() -> None:
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(7))
    before = logits.clone()
    p = SamplingParams(repetition_penalty=1.2, presence_penalty=1.0, logit_bias={1: 5.0}, top_p=0.8, logprobs=3)
    Sampler(0)(logits, [row(p, [1, 2], [3, 3], banned=(4,))] * 3)
    assert torch.equal(logits, before)


def test_penalties_steer_greedy_like_the_reference() -> None:
    g = torch.Generator().manual_seed(8)
    vocab_size = 30
    for _ in range(50):
        logits = torch.randn(1, vocab_size, generator=g) * 2
        prompt = torch.randint(vocab_size, (6,), generator=g).tolist()
        output = torch.randint(vocab_size, (8,), generator=g).tolist()
        p = SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.5)
        r = row(p, prompt, output)
        expected = max(range(vocab_size), key=naive_edits(logits[0].tolist(), r).__getitem__)
        assert ids(Sampler(0)(logits, [r])) == [expected]


# -- distributions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=4),
    SamplingParams(top_p=0.8),
    SamplingParams(min_p=0.1),
    SamplingParams(top_k=6, top_p=0.9, min_p=0.05),
], ids=["plain", "temperature", "top_k", "top_p", "min_p", "all"])
def test_small_vocab_distribution_matches_softmax(params: SamplingParams) -> None:
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, 1.2])
    assert_matches(sample_counts(logits, params, 20_000), reference_probs(logits, params))


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(top_k=50, top_p=0.9),
    SamplingParams(top_p=0.95),
    SamplingParams(min_p=0.02, temperature=0.8),
], ids=["plain", "top_k_top_p", "top_p", "min_p"])
def test_large_vocab_distribution_matches_softmax(params: SamplingParams) -> None:
    logits = peaked_logits(6000 + 37, seed=9).clone()  # a partial last chunk
    logits[-1] = logits.max() + 0.5  # a likely token in it
    assert_matches(sample_counts(logits, params, 10_000), reference_probs(logits, params))


def test_nucleus_candidate_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small tiers, so rows whose nucleus ends in the first, second, third tier or only after a
    # full sort all run in one batch.
    monkeypatch.setattr(sampler_module, "_NUCLEUS_CANDIDATES", (8, 64, 256))
    vocab_size, per_kind = 8000, 100
    kinds = [peaked_logits(vocab_size, seed=12, scale=3.0),  # nucleus of a few tokens
             peaked_logits(vocab_size, seed=13, scale=1.6),  # tens
             peaked_logits(vocab_size, seed=14, scale=1.25),  # hundreds
             torch.randn(vocab_size, generator=torch.Generator().manual_seed(15))]  # thousands
    p = SamplingParams(top_p=0.9)
    probs = [reference_probs(logits, p) for logits in kinds]
    assert [int((q > 0).sum()) for q in probs] == sorted(int((q > 0).sum()) for q in probs)
    assert int((probs[0] > 0).sum()) < 8 and int((probs[-1] > 0).sum()) > 256
    batch = torch.stack(kinds).repeat_interleave(per_kind, dim=0)
    sampler, counts = Sampler(0), [Counter[int]() for _ in kinds]
    for _ in range(8):
        out = ids(sampler(batch, [row(p)] * len(batch)))
        for k in range(len(kinds)):
            counts[k].update(out[k * per_kind:(k + 1) * per_kind])
    for c, q in zip(counts, probs):
        assert_matches(*equal_mass_slices(c, q))


def equal_mass_slices(counts: Counter[int], probs: torch.Tensor,
                      num_slices: int = 10) -> tuple[Counter[int], torch.Tensor]:
    """Tokens grouped into slices of equal probability mass, by descending probability."""
    order = probs.argsort(descending=True)
    slice_of = torch.empty(len(probs), dtype=torch.long)
    slice_of[order] = (probs[order].cumsum(0) * num_slices).clamp(max=num_slices - 1e-3).long()
    slice_of[probs == 0] = num_slices  # outside the support
    sliced = Counter[int]()
    for t, n in counts.items():
        sliced[int(slice_of[t])] += n
    expected = torch.zeros(num_slices + 1, dtype=torch.float64).index_add_(0, slice_of, probs)
    return sliced, expected


# -- seeds ----------------------------------------------------------------------------------------------

SEEDED = [
    SamplingParams(seed=1, top_k=40, top_p=0.9),
    SamplingParams(seed=2, top_p=0.9),
    SamplingParams(seed=3, min_p=0.05, temperature=0.9),
    SamplingParams(seed=4, temperature=1.1),
    SamplingParams(seed=5, repetition_penalty=1.2, presence_penalty=0.3, top_k=200),
]


def seeded_run(params: SamplingParams, with_others: bool, steps: int = 50) -> list[int]:
    vocab_size = 2**14 + 37
    sampler = Sampler(123)
    gen = torch.Generator().manual_seed(params.seed or 0)
    noise = torch.Generator().manual_seed(999)
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=40, top_p=0.9),
              SamplingParams(top_p=0.5, logprobs=3), SamplingParams(min_p=0.1, seed=7),
              SamplingParams(top_k=7), SamplingParams(temperature=0.3, frequency_penalty=1.0),
              SamplingParams(top_p=0.99)]  # flat logits below: a full sort
    output: list[int] = []
    for step in range(steps):
        mine = peaked_logits(vocab_size, seed=step, scale=1.6 + (step % 3) * 0.4)
        r = row(params, [5, 6, 7], output, gen)
        if with_others:
            at = step % (len(others) + 1)
            logits = torch.stack([peaked_logits(vocab_size, seed=1000 + (step + j) % 13) for j in range(len(others))])
            logits[-1] = torch.randn(vocab_size, generator=noise)
            logits = torch.cat([logits[:at], mine[None], logits[at:]])
            rows = [row(o, [1], [2], torch.Generator().manual_seed(step) if o.seed else None) for o in others]
            rows.insert(at, r)
            token = sampler(logits, rows)[at].token_id
        else:
            token = sampler(mine[None], [r])[0].token_id
        output = output + [token]
    return output


@pytest.mark.parametrize("params", SEEDED, ids=["top_k_top_p", "top_p", "min_p", "plain", "penalties"])
def test_seeded_output_does_not_depend_on_the_batch(params: SamplingParams) -> None:
    alone = seeded_run(params, with_others=False)
    assert seeded_run(params, with_others=False) == alone
    assert seeded_run(params, with_others=True) == alone
    assert len(set(alone)) > 5  # really sampled


def test_different_seeds_differ() -> None:
    a = seeded_run(SamplingParams(seed=1, top_p=0.95), with_others=False, steps=20)
    b = seeded_run(SamplingParams(seed=2, top_p=0.95), with_others=False, steps=20)
    assert a != b


# -- logprobs -----------------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_and_top_sorted() -> None:
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(11)) * 2
    raw = torch.log_softmax(logits.double(), -1)
    rows = [row(SamplingParams(logprobs=5, repetition_penalty=1.5, logit_bias={0: 30.0}), [1, 2], [3]),
            row(SamplingParams(temperature=0, logprobs=20)),
            row(SamplingParams(top_k=10, logprobs=0)),
            row(SamplingParams(top_p=0.9))]
    out = Sampler(0)(logits, rows)
    assert ids(out)[0] == 0  # chosen under the bias, logprob still of the raw logits
    for i, n in enumerate([5, 20, 0]):
        tok = out[i]
        assert tok.logprob == pytest.approx(raw[i, tok.token_id].item(), abs=1e-5)
        assert tok.top_logprobs is not None and len(tok.top_logprobs) == n
        top = raw[i].topk(n) if n else None
        if top is not None:
            assert [t for t, _ in tok.top_logprobs] == top.indices.tolist()
            assert [v for _, v in tok.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)
            assert [v for _, v in tok.top_logprobs] == sorted((v for _, v in tok.top_logprobs), reverse=True)
    assert out[1].top_logprobs is not None and out[1].token_id == out[1].top_logprobs[0][0]
    assert out[3].logprob is None and out[3].top_logprobs is None


def test_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_rows=2"):
        Sampler(0)(torch.zeros(3, 10), [row(SamplingParams())] * 2)
    assert Sampler(0)(torch.zeros(0, 10), []) == []
