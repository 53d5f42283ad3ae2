"""StreamingLLM's attention sinks over the paged KV cache: what to evict, and where kept tokens go. Pure Python.

When a sink-mode sequence would outgrow the context limit, the tokens right after its first
`num_sink_tokens` (the attention sinks) are evicted, a whole number of blocks at a time, and every
later token moves back by the evicted count. The cache then always holds cache positions
0 .. limit-1, and since a token's cache position is its rotary position, positions never exceed
what the model was trained on. With S sinks, j = S // bs and r = S % bs, evicting k blocks:

    before:  [s s s a][b b b b][c c c x][y y y y]      S = 3, bs = 4, k = 2
              block j  j+1      j+k      j+k+1
                    |<------ evicted ---->|            a, b b b b, c c c: k * bs tokens
    after:   [s s s x][y y y y]
                    ^ offsets r.. of block j+k copied into block j; blocks j+1 .. j+k freed

(With r == 0 there is nothing to copy: blocks j .. j+k-1 are freed.) The keys of every kept token
after the sinks were rotated for their old position; the model runner rotates them back by the
evicted count (`rillet.engine.kv_cache.apply_kv_shifts`). Values carry no position and stay.
"""
from __future__ import annotations

from dataclasses import dataclass

from rillet.engine.block_pool import NULL_BLOCK


@dataclass(frozen=True)
class KVShift:
    """The tensor work one eviction leaves for the model runner."""

    request_id: str
    block_tables: list[list[int]]  # per group: the sequence's table after the eviction
    copies: list[tuple[int, int] | None]  # per group: (src, dst) block, offsets num_sink_tokens % bs ..
    num_sink_tokens: int
    num_kv_tokens: int  # tokens in the cache after the eviction: cache positions 0 .. num_kv_tokens-1
    delta: int  # tokens evicted: every kept token after the sinks moves back this many positions


def num_tokens_to_evict(num_kv_tokens: int, num_new_tokens: int, max_len: int, block_size: int) -> int:
    """The fewest tokens, in whole blocks, to evict so that `num_new_tokens` more fit in `max_len`."""
    excess = num_kv_tokens + num_new_tokens - max_len
    return 0 if excess <= 0 else -(-excess // block_size) * block_size


def max_sink_chunk(max_len: int, num_sink_tokens: int, block_size: int, windows: list[int | None]) -> int:
    """The most tokens one step may compute for a sink-mode sequence (0: sink mode cannot work).

    The evicted tokens must exist (num_sink + evicted <= cached tokens), and a sliding-window group
    must never need keys of the sink block after the shift: its first block holds only the sinks.
    """
    chunk = max_len - num_sink_tokens - block_size + 1
    for window in windows:
        if window is not None:
            chunk = min(chunk, max_len - window - 2 * block_size + 2 - num_sink_tokens)
    return max(0, chunk)


def evict_blocks(table: list[int], num_sink_tokens: int, num_blocks: int, block_size: int
                 ) -> tuple[list[int], list[int], tuple[int, int] | None]:
    """Evict `num_blocks` blocks' worth of tokens after the sinks from one block table.

    Returns the new table, the block ids to release, and the (src, dst) copy to make, if any.
    """
    j, r = divmod(num_sink_tokens, block_size)
    if r == 0:
        return table[:j] + table[j + num_blocks:], table[j:j + num_blocks], None
    src, dst = table[j + num_blocks], table[j]
    copy = (src, dst) if src != NULL_BLOCK and dst != NULL_BLOCK else None
    return table[:j + 1] + table[j + 1 + num_blocks:], table[j + 1:j + 1 + num_blocks], copy
