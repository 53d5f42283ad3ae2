"""The scheduler's decisions on hand-built states: token budget, chunking, preemption, abort."""
import pytest

from rillet.engine.block_manager import KVCacheManager
from rillet.engine.scheduler import Scheduler, SchedulerConfig
from rillet.request import FinishReason, Request, RequestStatus
from rillet.sampling_params import SamplingParams

BS = 4


def make(num_blocks: int, budget: int = 100, max_seqs: int = 8, windows: list[int | None] | None = None
         ) -> Scheduler:
    windows = windows or [None]
    kv = KVCacheManager(BS, [num_blocks] * len(windows), windows)
    return Scheduler(SchedulerConfig(budget, max_seqs, max_model_len=1000), kv)


def req(rid: str, n: int, max_tokens: int = 20) -> Request:
    first = 100 + 1000 * sum(map(ord, rid))  # distinct prompts: no accidental prefix sharing
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens), frozenset({0}))


def run_step(s: Scheduler, token: int = 7) -> dict[str, int]:
    """Schedule one step and feed back `token` for every sequence that samples."""
    out = s.schedule()
    s.update(out, {q.request_id: token for q in out.seqs if q.samples})
    return out.num_scheduled_tokens


def test_budget_chunks_prompts_and_streams_go_first() -> None:
    s = make(20, budget=8)
    r1, r2 = req("r1", 6), req("r2", 5)
    s.add_request(r1)
    s.add_request(r2)
    assert run_step(s) == {"r1": 6, "r2": 2}  # r2's prompt is chunked
    assert r1.output_ids == [7] and r2.output_ids == []
    assert run_step(s) == {"r1": 1, "r2": 3}  # r1's decode token first
    assert s.kv.block_tables == {"r1": [[1, 2]], "r2": [[3, 4]]}
    assert r2.output_ids == [7]


def test_long_prefill_never_starves_running_streams() -> None:
    s = make(100, budget=6)
    streams = [req(f"s{i}", 2) for i in range(3)]
    for r in streams:
        s.add_request(r)
    run_step(s)
    long = req("long", 40)
    s.add_request(long)
    for _ in range(5):
        sched = run_step(s)
        assert all(sched[r.request_id] == 1 for r in streams)
        assert sched["long"] == 3
    assert long.num_computed_tokens == 15


def test_newest_request_is_preempted_and_its_blocks_freed() -> None:
    s = make(5)  # 4 usable blocks of 4 tokens
    r1, r2 = req("r1", 7, max_tokens=8), req("r2", 7, max_tokens=8)
    s.add_request(r1)
    s.add_request(r2)
    run_step(s)
    run_step(s)
    assert s.kv.block_tables == {"r1": [[1, 2]], "r2": [[3, 4]]}
    out = s.schedule()  # r1 needs a third block: r2 goes
    assert out.preempted_ids == ["r2"]
    assert out.num_scheduled_tokens == {"r1": 1}
    assert r2.status is RequestStatus.WAITING and r2.num_computed_tokens == 0
    assert r2.output_ids == [7, 7]  # recomputed later, not resampled
    # r2's tail block is evicted first (LRU from the tail)
    assert s.kv.block_tables == {"r1": [[1, 2, 4]]}
    assert s.waiting[0] is r2 and s.num_preemptions == 1


def test_preempted_request_is_readmitted_with_its_cached_prefix() -> None:
    s = make(5)
    r1, r2 = req("r1", 7, max_tokens=8), req("r2", 7, max_tokens=8)
    s.add_request(r1)
    s.add_request(r2)
    run_step(s)
    run_step(s)
    s.update(s.schedule(), {"r1": 7})  # preempts r2
    s.abort("r1")
    assert r1.finish_reason is FinishReason.ABORT
    assert run_step(s) == {"r2": 5}  # 9 tokens, the first block found in the cache
    assert s.kv.block_tables["r2"][0][0] == 3


def test_abort_frees_every_block_at_once() -> None:
    s = make(10, budget=4)
    r = req("r", 20, max_tokens=4)
    s.add_request(r)
    run_step(s)
    assert s.kv.pools[0].num_free == 8
    s.abort("r")
    assert s.kv.pools[0].num_free == 9 and not s.running and "r" not in s.kv.block_tables
    assert s.schedule().seqs == []


def test_abort_of_a_waiting_request() -> None:
    s = make(10, max_seqs=1)
    s.add_request(req("a", 3))
    s.add_request(req("b", 3))
    run_step(s)
    assert s.abort("b") is not None
    assert not s.waiting and s.abort("missing") is None


def test_max_num_seqs_bounds_admission() -> None:
    s = make(50, max_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 3))
    assert set(run_step(s)) == {"r0", "r1"}


def test_requests_finish_on_eos_and_max_tokens() -> None:
    s = make(20)
    a, b = req("a", 3, max_tokens=2), req("b", 3)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    s.update(out, {"a": 5, "b": 0})  # 0 is EOS
    assert b.finish_reason is FinishReason.STOP and b.stop_reason == 0
    run_step(s)
    assert a.finish_reason is FinishReason.LENGTH and a.output_ids == [5, 7]
    assert not s.has_unfinished() and s.kv.pools[0].num_free == 19


def test_a_request_that_can_never_fit_is_rejected_at_admission() -> None:
    s = make(5)
    with pytest.raises(ValueError, match="never fit"):
        s.add_request(req("big", 30))
    with pytest.raises(ValueError, match="context limit"):
        s.add_request(req("huge", 1000))
    assert not s.waiting


def test_sliding_window_request_fits_beyond_the_pool_size() -> None:
    # The sliding group has only 6 blocks, yet a 60-token sequence runs: it needs its window only.
    kv = KVCacheManager(BS, [20, 6], [None, 4])
    s = Scheduler(SchedulerConfig(4, 4, max_model_len=1000), kv)
    r = req("r", 60, max_tokens=1)
    s.add_request(r)
    while s.has_unfinished():
        run_step(s)
    assert r.output_ids == [7] and r.num_preemptions == 0
