"""Sink-mode eviction bookkeeping: which blocks go, which are copied, where kept tokens land. Pure Python."""
import pytest

from rillet.engine.block_manager import KVCacheManager
from rillet.engine.scheduler import Scheduler, SchedulerConfig
from rillet.engine.sink import evict_blocks, max_sink_chunk, num_tokens_to_evict
from rillet.request import ContextOverflow, ContextPolicy, Request, truncate_left
from rillet.sampling_params import SamplingParams

BS = 4
SINK = ContextPolicy(ContextOverflow.SINK, num_sink_tokens=3)


def make(limit: int, num_blocks: int = 64, budget: int = 100, windows: list[int | None] | None = None
         ) -> Scheduler:
    windows = windows or [None]
    kv = KVCacheManager(BS, [num_blocks] * len(windows), windows)
    return Scheduler(SchedulerConfig(budget, 8, max_model_len=limit), kv)


def sink_req(rid: str, n: int, max_tokens: int = 50, context: ContextPolicy = SINK) -> Request:
    return Request(rid, list(range(100, 100 + n)), SamplingParams(max_tokens=max_tokens), frozenset({0}),
                   context=context)


def step(s: Scheduler, token: int = 7):  # type: ignore[no-untyped-def]
    out = s.schedule()
    s.update(out, {q.request_id: token for q in out.seqs if q.samples})
    return out


def test_evict_blocks_keeps_the_sink_block_and_copies_the_tail_of_the_last_evicted_block() -> None:
    table = [11, 12, 13, 14, 15]
    assert evict_blocks(table, 3, 2, BS) == ([11, 14, 15], [12, 13], (13, 11))
    assert evict_blocks(table, 4, 2, BS) == ([11, 14, 15], [12, 13], None)  # sinks fill block 0
    assert evict_blocks(table, 0, 2, BS) == ([13, 14, 15], [11, 12], None)  # no sinks: a plain window
    assert evict_blocks(table, 6, 1, BS) == ([11, 12, 14, 15], [13], (13, 12))  # sinks span two blocks
    assert evict_blocks([0, 0, 13, 14], 3, 1, BS) == ([0, 13, 14], [0], None)  # sliding group: sink block gone


def test_evict_whole_blocks_only_when_the_limit_is_passed() -> None:
    assert num_tokens_to_evict(10, 6, 16, BS) == 0
    assert num_tokens_to_evict(16, 1, 16, BS) == 4
    assert num_tokens_to_evict(14, 7, 16, BS) == 8
    assert max_sink_chunk(16, 3, BS, [None]) == 10
    assert max_sink_chunk(32, 3, BS, [None, 8]) == 15  # the sliding window must stay clear of the sinks
    assert max_sink_chunk(12, 3, BS, [None, 8]) == 0


def test_generation_past_the_limit_evicts_after_the_sinks_and_keeps_positions_below_it() -> None:
    s = make(limit=16)
    r = sink_req("r", 14)
    s.add_request(r)
    out = step(s)
    assert out.seqs[0].start_pos == 0 and out.seqs[0].num_tokens == 10  # capped chunk
    assert s.kv.block_tables["r"] == [[1, 2, 3]]
    out = step(s)  # 4 more prompt tokens: 10 + 4 <= 16, no eviction
    assert out.kv_shifts == [] and r.output_ids == [7]
    out = step(s)  # decode token index 14
    assert out.kv_shifts == [] and out.seqs[0].start_pos == 14
    out = step(s)  # token index 15: the cache is full
    assert out.kv_shifts == [] and out.seqs[0].start_pos == 15
    out = step(s)  # token 16 would pass the limit: evict one block after the 3 sinks
    [shift] = out.kv_shifts
    assert (shift.delta, shift.num_sink_tokens, shift.num_kv_tokens) == (4, 3, 12)
    assert shift.copies == [(2, 1)] and shift.block_tables == [[1, 3, 4]]
    # Block 2 is free again and handed straight back for the new token (the copy out of it runs first).
    assert s.kv.block_tables["r"] == [[1, 3, 4, 2]]
    assert out.seqs[0].start_pos == 12  # token index 16 at cache position 16 - 4
    assert (r.num_evicted_tokens, r.num_evictions, r.first_eviction_at) == (4, 1, 16)
    while not r.is_finished:
        out = step(s)
        for seq in out.seqs:
            assert seq.start_pos + seq.num_tokens <= 16
        assert len(s.kv.block_tables.get("r", [[]])[0]) <= 4  # memory stays flat
    assert r.num_output_tokens == 50
    report = r.overflow_report()
    assert report is not None and report.mode == "sink"
    # 64 tokens, the last one never computed; at most 16 in the cache, evicted 4 at a time.
    assert report.num_evicted_tokens == r.num_evicted_tokens == 48 and report.num_evictions == 12
    assert r.num_kv_tokens == 63 - 48 == 15
    assert s.kv.pools[0].num_free == 63


def test_a_long_prompt_is_prefilled_in_chunks_with_evictions_between() -> None:
    s = make(limit=16, budget=100)
    r = sink_req("r", 40, max_tokens=1)
    s.add_request(r)
    seen = []
    while not r.is_finished:
        out = step(s)
        seen += [(q.start_pos, q.num_tokens) for q in out.seqs]
    assert all(start + n <= 16 for start, n in seen)
    assert sum(n for _, n in seen) == 40
    assert r.num_computed_tokens == 40 and r.num_kv_tokens <= 16


def test_sink_requests_neither_hit_nor_fill_the_prefix_cache() -> None:
    s = make(limit=64)
    plain = Request("p", list(range(100, 120)), SamplingParams(max_tokens=1), frozenset({0}))
    s.add_request(plain)
    step(s)
    r = sink_req("r", 20, max_tokens=1)
    s.add_request(r)
    step(s)
    assert r.num_cached_tokens == 0
    assert not any(s.kv.pools[0].block_hash[b] for b in s.kv.block_tables.get("r", [[]])[0])


def test_preempting_a_sink_request_drops_its_pending_shift_and_restarts_its_cache() -> None:
    s = make(limit=16, num_blocks=6)  # 5 usable blocks
    r = sink_req("r", 15)
    s.add_request(r)
    while r.num_evictions == 0:
        step(s)
    r2 = Request("q", list(range(500, 508)), SamplingParams(max_tokens=30), frozenset({0}))
    s.add_request(r2)
    for _ in range(12):
        out = step(s)
        assert all(shift.request_id in {q.request_id for q in out.seqs} for shift in out.kv_shifts)
    if r.num_preemptions:
        assert r.num_evicted_tokens <= r.num_computed_tokens


def test_error_mode_still_refuses_long_prompts_and_sink_mode_needs_room() -> None:
    s = make(limit=16)
    with pytest.raises(ValueError, match="context limit is 16"):
        s.add_request(sink_req("e", 16, context=ContextPolicy()))
    with pytest.raises(ValueError, match="larger context limit"):
        make(limit=6).add_request(sink_req("s", 4))


def test_truncate_left_keeps_the_newest_tokens() -> None:
    assert truncate_left(list(range(10)), 4, 8) == [6, 7, 8, 9]
    assert truncate_left(list(range(3)), 4, 8) == [0, 1, 2]
    assert truncate_left(list(range(10)), None, 8) == [4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="no room"):
        truncate_left([1], 8, 8)
    with pytest.raises(ValueError):
        ContextPolicy(ContextOverflow.SINK, num_sink_tokens=-1)
