"""Prefix-cache keys: each full block is named by a hash chained from the start of the sequence.

Two sequences share a block hash only if every token up to the end of that block is the same,
so a hit on block i implies hits on blocks 0..i-1. Pure Python.
"""
from __future__ import annotations

ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    # NOTE: Python's hash of a tuple of ints is deterministic (no per-process salt).
    return hash((parent_hash, token_ids))


def extend_block_hashes(hashes: list[int], token_ids: list[int], block_size: int, num_tokens: int) -> None:
    """Append the hashes of every full block within the first `num_tokens` tokens not yet hashed."""
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), num_tokens // block_size):
        parent = hash_block(parent, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        hashes.append(parent)


def window_blocks(num_tokens: int, block_size: int, window: int | None) -> range:
    """Logical blocks that hold keys a query at position `num_tokens` can still attend to.

    A query at position p sees keys p - window + 1 .. p. With window None, all blocks.
        keys:   |--- dropped ---|==== window ====|p
        blocks: [0][1][2][3][4][5][6][7][8]
                 null  null   ^ first kept block
    """
    last = -(-num_tokens // block_size)  # ceil
    if window is None:
        return range(0, last)
    first = max(0, num_tokens - window + 1) // block_size
    return range(first, last)
