"""Exact block ids, ref counts and eviction order of the block pool and KV-cache manager."""
import pytest

from rillet.engine.block_manager import KVCacheManager
from rillet.engine.block_pool import NULL_BLOCK, BlockPool
from rillet.engine.prefix_cache import extend_block_hashes, window_blocks
from rillet.request import Request
from rillet.sampling_params import SamplingParams

BS = 4


def req(rid: str, ids: list[int]) -> Request:
    return Request(rid, ids, SamplingParams(max_tokens=8))


def test_pool_hands_out_lowest_ids_and_never_the_null_block() -> None:
    pool = BlockPool(4)
    assert [pool.allocate() for _ in range(3)] == [1, 2, 3]
    assert pool.num_free == 0
    with pytest.raises(KeyError):
        pool.allocate()


def test_pool_evicts_uncached_first_then_least_recently_freed() -> None:
    pool = BlockPool(6)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()  # 1, 2, 3
    pool.register(a, 111)
    pool.register(b, 222)
    pool.release(b)
    pool.release(a)
    pool.release(c)  # uncached: goes to the front
    assert list(pool.free) == [3, 4, 5, 2, 1]
    assert [pool.allocate() for _ in range(4)] == [3, 4, 5, 2]
    assert pool.lookup(222) is None  # evicted with block 2
    assert pool.lookup(111) == 1


def test_touch_revives_a_cached_free_block() -> None:
    pool = BlockPool(3)
    b = pool.allocate()
    pool.register(b, 7)
    pool.release(b)
    pool.touch(b)
    assert pool.ref_counts[b] == 1 and b not in pool.free
    pool.touch(b)
    pool.release(b)
    assert b not in pool.free
    pool.release(b)
    assert b in pool.free


def test_block_hashes_chain_from_the_start() -> None:
    h1: list[int] = []
    h2: list[int] = []
    extend_block_hashes(h1, [1, 2, 3, 4, 5, 6, 7, 8, 9], BS, 9)
    extend_block_hashes(h2, [0, 2, 3, 4, 5, 6, 7, 8], BS, 8)
    assert len(h1) == 2 and len(h2) == 2
    assert h1[1] != h2[1]  # same second block, different first block


def test_window_blocks() -> None:
    assert window_blocks(10, BS, None) == range(0, 3)
    # a query at position 10 with window 4 sees keys 7..10: blocks 1 and 2
    assert window_blocks(10, BS, 4) == range(1, 3)
    assert window_blocks(3, BS, 4) == range(0, 1)


def test_allocate_grows_tables_all_or_nothing() -> None:
    kv = KVCacheManager(BS, [5], [None])
    r = req("a", list(range(10)))
    assert kv.allocate(r, 10)
    assert kv.block_tables["a"] == [[1, 2, 3]]
    r.num_computed_tokens = 10
    assert kv.allocate(r, 2)  # positions 10, 11 still fit in block 3
    assert kv.block_tables["a"] == [[1, 2, 3]]
    r.num_computed_tokens = 12
    assert kv.allocate(r, 4)
    assert kv.block_tables["a"] == [[1, 2, 3, 4]]
    r.num_computed_tokens = 16
    assert not kv.allocate(r, 1)  # a fifth block does not exist
    assert kv.block_tables["a"] == [[1, 2, 3, 4]]
    kv.free(r)
    assert kv.pools[0].num_free == 4 and "a" not in kv.block_tables


def test_prefix_hit_reuses_blocks_and_counts_hits() -> None:
    kv = KVCacheManager(BS, [8], [None])
    a = req("a", list(range(10)))
    assert kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_blocks(a)  # blocks 1, 2 are full; block 3 holds 2 tokens
    b = req("b", list(range(8)) + [99, 98, 97])
    hit = kv.find_prefix(b)
    assert hit.num_tokens == 8 and hit.block_tables == [[1, 2]]
    assert kv.allocate(b, 3, hit)
    assert kv.block_tables["b"] == [[1, 2, 4]]
    assert kv.pools[0].ref_counts[1:5] == [2, 2, 1, 1]
    assert kv.num_hits == 8 and kv.num_queries == 21
    kv.free(a)
    kv.free(b)
    # Tail blocks are evicted first; the shared prefix last.
    assert list(kv.pools[0].free)[:2] == [4, 3]
    assert list(kv.pools[0].free)[-2:] == [2, 1]


def test_prefix_hit_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(BS, [8], [None])
    a = req("a", list(range(8)))
    assert kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_blocks(a)
    same = req("b", list(range(8)))
    assert kv.find_prefix(same).num_tokens == 4


def test_sliding_group_keeps_only_its_window() -> None:
    # group 0 full, group 1 sliding with a window of 4 tokens
    kv = KVCacheManager(BS, [10, 10], [None, 4])
    r = req("a", list(range(12)))
    assert kv.allocate(r, 12)
    assert kv.block_tables["a"] == [[1, 2, 3], [1, 2, 3]]
    r.num_computed_tokens = 12
    r.append_token(5)
    assert kv.allocate(r, 1)
    # the query at 12 sees keys 9..12: logical blocks 2, 3; blocks 0, 1 are released, and
    # being uncached, block 2 is handed out again at once
    assert kv.block_tables["a"] == [[1, 2, 3, 4], [NULL_BLOCK, NULL_BLOCK, 3, 2]]
    assert kv.pools[1].ref_counts[1:4] == [0, 1, 1]
    assert kv.max_blocks_needed(1000, max_chunk=8) == [250, 4]


def test_sliding_prefix_hit_needs_only_the_window() -> None:
    kv = KVCacheManager(BS, [10, 10], [None, 4])
    a = req("a", list(range(13)))
    assert kv.allocate(a, 12)
    a.num_computed_tokens = 12
    kv.cache_blocks(a)
    a.append_token(1)
    assert kv.allocate(a, 1)  # drops sliding blocks 1, 2 (still cached, now free)
    kv.free(a)
    # Reuse 8 sliding blocks: 4 (uncached), 5..9, then 1 and 2, evicting logical blocks 0, 1.
    assert [kv.pools[1].allocate() for _ in range(8)] == [4, 5, 6, 7, 8, 9, 1, 2]
    b = req("b", list(range(12)) + [7])
    hit = kv.find_prefix(b)
    assert hit.num_tokens == 12  # the sliding layers only need the window: logical block 2
    assert hit.block_tables == [[1, 2, 3], [NULL_BLOCK, NULL_BLOCK, 3]]
