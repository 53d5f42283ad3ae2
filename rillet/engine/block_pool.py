"""Block ids of one KV-cache group: ref counts, a free queue in LRU order, and the prefix-cache map.

Pure Python. Block 0 is never handed out: block tables point at it for entries that hold
nothing (sliding-window blocks that fell out of the window), so gathers need no special case.
"""
from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Unreferenced blocks; the first is evicted first. Cached blocks keep their hash here
        # until they are handed out again, so a later request can still hit them.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_usable

    def allocate(self) -> int:
        """Hand out the least recently freed block, evicting its cached contents."""
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            del self.cached[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def touch(self, block: int) -> None:
        """Take a reference to a cached block (a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        if block == NULL_BLOCK:
            return
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            self.free[block] = None
            if self.block_hash[block] is None:
                # Nothing to reuse in it: hand it out before any cached block.
                self.free.move_to_end(block, last=False)

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def register(self, block: int, block_hash: int) -> None:
        """Record that `block` holds the tokens `block_hash` names."""
        if not self.enable_caching or self.block_hash[block] is not None:
            return
        if block_hash in self.cached:  # another block already holds the same tokens
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block
