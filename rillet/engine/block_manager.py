"""Block tables of running requests over one or more KV-cache groups. Pure Python.

A group is a set of layers that share block ids: the full-attention layers form one group,
sliding-window layers (Gemma 3's local layers) another. A request has one block table per
group, indexed by logical block (positions i*block_size .. (i+1)*block_size - 1). In a
sliding group, blocks whose keys no query can see any more are released and their table
entries point at NULL_BLOCK, so a long sequence holds only its window there.
"""
from __future__ import annotations

from dataclasses import dataclass

from rillet.engine.block_pool import NULL_BLOCK, BlockPool
from rillet.engine.prefix_cache import extend_block_hashes, window_blocks
from rillet.engine.sink import KVShift, evict_blocks
from rillet.request import Request


@dataclass
class PrefixHit:
    num_tokens: int
    block_tables: list[list[int]]  # per group, the hit's logical blocks


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, block_size: int, num_blocks: list[int], windows: list[int | None],
                 enable_caching: bool = True) -> None:
        assert len(num_blocks) == len(windows)
        self.block_size = block_size
        self.windows = windows
        self.enable_caching = enable_caching
        self.pools = [BlockPool(n, enable_caching) for n in num_blocks]
        self.block_tables: dict[str, list[list[int]]] = {}
        self.block_hashes: dict[str, list[int]] = {}
        self.num_registered: dict[str, int] = {}
        self.num_queries = 0  # prefix-cache lookups, in tokens
        self.num_hits = 0

    # -- capacity -------------------------------------------------------------------------------
    def max_blocks_needed(self, num_tokens: int, max_chunk: int) -> list[int]:
        """The most blocks per group a sequence of `num_tokens` holds at once."""
        full = cdiv(num_tokens, self.block_size)
        return [full if w is None else min(full, cdiv(w + max_chunk, self.block_size) + 1)
                for w in self.windows]

    def can_ever_fit(self, num_tokens: int, max_chunk: int) -> bool:
        needed = self.max_blocks_needed(num_tokens, max_chunk)
        return all(n <= pool.num_usable for n, pool in zip(needed, self.pools))

    def usage(self) -> float:
        return max(pool.usage() for pool in self.pools)

    def hit_rate(self) -> float:
        return self.num_hits / self.num_queries if self.num_queries else 0.0

    # -- prefix cache ---------------------------------------------------------------------------
    def find_prefix(self, req: Request) -> PrefixHit:
        """The longest cached prefix of a new request, leaving at least one token to compute."""
        empty = PrefixHit(0, [[] for _ in self.pools])
        if not self.enable_caching or req.is_sink:  # sink mode moves keys in place: no shared blocks
            return empty
        hashes = self.block_hashes.setdefault(req.request_id, [])
        extend_block_hashes(hashes, req.token_ids, self.block_size, req.num_tokens - 1)
        num_blocks = len(hashes)
        for pool, window in zip(self.pools, self.windows):
            if window is None:
                num_blocks = next((i for i in range(num_blocks) if pool.lookup(hashes[i]) is None), num_blocks)
        while num_blocks > 0 and not self._window_cached(hashes, num_blocks):
            num_blocks -= 1
        if num_blocks == 0:
            return empty
        num_tokens = num_blocks * self.block_size
        tables = []
        for pool, window in zip(self.pools, self.windows):
            keep = window_blocks(num_tokens, self.block_size, window)
            tables.append([pool.cached[hashes[i]] if i in keep else NULL_BLOCK for i in range(num_blocks)])
        return PrefixHit(num_tokens, tables)

    def _window_cached(self, hashes: list[int], num_blocks: int) -> bool:
        num_tokens = num_blocks * self.block_size
        for pool, window in zip(self.pools, self.windows):
            if window is not None and any(
                    pool.lookup(hashes[i]) is None for i in window_blocks(num_tokens, self.block_size, window)):
                return False
        return True

    # -- allocation -----------------------------------------------------------------------------
    def allocate(self, req: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens; all or nothing."""
        rid = req.request_id
        tables = self.block_tables.get(rid)
        if tables is None:
            tables = hit.block_tables if hit else [[] for _ in self.pools]
            start = hit.num_tokens if hit else 0
        else:
            start = req.num_kv_tokens
            self._drop_out_of_window(tables, start)
        end_blocks = cdiv(start + num_new_tokens, self.block_size)
        new = rid not in self.block_tables
        for pool, table in zip(self.pools, tables):
            num_touched_free = sum(1 for b in table if b != NULL_BLOCK and pool.ref_counts[b] == 0) if new else 0
            if pool.num_free < end_blocks - len(table) + num_touched_free:
                return False
        if new:
            for pool, table in zip(self.pools, tables):
                for b in table:
                    if b != NULL_BLOCK:
                        pool.touch(b)
            self.block_tables[rid] = tables
            self.num_registered[rid] = len(tables[0])
            self.num_queries += req.num_tokens
            self.num_hits += start
        for pool, table in zip(self.pools, tables):
            table.extend(pool.allocate() for _ in range(end_blocks - len(table)))
        return True

    def _drop_out_of_window(self, tables: list[list[int]], num_computed: int) -> None:
        for pool, window, table in zip(self.pools, self.windows, tables):
            if window is None:
                continue
            for i in range(window_blocks(num_computed, self.block_size, window).start):
                if table[i] != NULL_BLOCK:
                    pool.release(table[i])
                    table[i] = NULL_BLOCK

    def cache_blocks(self, req: Request) -> None:
        """Make the request's newly filled blocks findable by later requests."""
        if not self.enable_caching or req.is_sink:
            return
        rid = req.request_id
        hashes = self.block_hashes.setdefault(rid, [])
        extend_block_hashes(hashes, req.token_ids, self.block_size, req.num_computed_tokens)
        first, num_full = self.num_registered[rid], req.num_computed_tokens // self.block_size
        for pool, table in zip(self.pools, self.block_tables[rid]):
            for i in range(first, num_full):
                if table[i] != NULL_BLOCK:
                    pool.register(table[i], hashes[i])
        self.num_registered[rid] = max(first, num_full)

    def evict(self, req: Request, num_tokens: int) -> KVShift:
        """Evict `num_tokens` (whole blocks) of `req`'s cached tokens right after its sinks.

        The blocks between are released now; the returned shift says how the runner must move the
        kept keys before the next forward pass. The caller updates the request's counts.
        """
        assert num_tokens % self.block_size == 0
        num_sink, num_kv = req.context.num_sink_tokens, req.num_kv_tokens
        assert num_sink + num_tokens <= num_kv, "evicting tokens that are not in the cache"
        tables, copies = [], []
        for pool, table in zip(self.pools, self.block_tables[req.request_id]):
            kept, freed, copy = evict_blocks(table, num_sink, num_tokens // self.block_size, self.block_size)
            for b in freed:
                pool.release(b)
            table[:] = kept
            tables.append(list(kept))
            copies.append(copy)
        return KVShift(req.request_id, tables, copies, num_sink, num_kv - num_tokens, num_tokens)

    def free(self, req: Request) -> None:
        """Release every block of the request; its tail blocks become the first to be evicted."""
        rid = req.request_id
        for pool, table in zip(self.pools, self.block_tables.pop(rid, [])):
            for b in reversed(table):
                pool.release(b)
        self.block_hashes.pop(rid, None)
        self.num_registered.pop(rid, None)

    def get_block_tables(self, request_id: str) -> list[list[int]]:
        return self.block_tables[request_id]
