"""Attention over the paged KV cache.

The model runner describes a step once (`AttentionMetadata`, built per KV group); every
attention layer reads it from a scoped context, so a model's forward stays
`forward(input_ids, positions)`. Tokens of the step are laid out as
    [decode tokens of D sequences][chunk of prefill seq 0][chunk of prefill seq 1]...
Decodes run as one batched attention call (the C++ paged kernel where it built, else gather
+ SDPA); each prefill chunk runs as one call.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rillet.kernels import cpu as cpu_kernels


@dataclass
class GroupMetadata:
    """Where one KV group's keys live for this step."""

    slot_mapping: torch.Tensor  # [num_tokens] flat slot each new token's K/V is written to
    # decodes: blocks to gather per sequence and which gathered keys each query may see
    decode_blocks: torch.Tensor | None  # [D, max_blocks]
    decode_mask: torch.Tensor | None  # [D, 1, 1, max_blocks * block_size] bool
    # prefills: (first token index, num tokens, blocks [nb], mask [1, 1, n, nb * block_size]); blocks
    # and mask None: a chunk that starts its sequence and fits the window sees only its own keys, causally
    prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]
    # decodes, for the paged kernel: logical block of decode_blocks[:, 0], query positions [D] each
    decode_first_blocks: torch.Tensor | None = None
    decode_positions: torch.Tensor | None = None
    window: int = 0  # sliding window of this group's layers, 0 for none


@dataclass
class AttentionMetadata:
    num_decodes: int
    groups: list[GroupMetadata]


_metadata: AttentionMetadata | None = None


@contextlib.contextmanager
def attention_context(metadata: AttentionMetadata) -> Iterator[None]:
    global _metadata
    _metadata = metadata
    try:
        yield
    finally:
        _metadata = None


class PagedAttention(nn.Module):
    """Writes this layer's new keys/values into its cache, then attends over the cached ones."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, group: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.group = group
        # Bound by the model runner: [num_blocks, block_size, num_kv_heads, head_dim] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        kernels = cpu_kernels.load()
        self.decode_kernel = kernels.decode_attention if kernels else None  # None: gather + SDPA

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, hd]   k, v: [T, KVH, hd]   -> [T, H * hd]
        assert _metadata is not None, "attention called outside attention_context"
        meta = _metadata.groups[self.group]
        num_blocks, block_size = self.k_cache.shape[:2]
        for cache, new in ((self.k_cache, k), (self.v_cache, v)):  # the cache may be narrower (float16)
            cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, new.to(cache.dtype))
        d = _metadata.num_decodes
        if d == q.shape[0]:  # a decode-only step
            return self._decode(q, meta).flatten(1)
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(q[:d], meta)
        for first, n, blocks, mask in meta.prefills:
            qs = q[first:first + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
            if blocks is None:
                out[first:first + n] = self._attend_own(qs, k[first:first + n], v[first:first + n])[0].transpose(0, 1)
            else:
                assert mask is not None
                out[first:first + n] = self._attend(qs, blocks.unsqueeze(0), mask)[0].transpose(0, 1)
        return out.flatten(1)

    def _decode(self, q: torch.Tensor, meta: GroupMetadata) -> torch.Tensor:
        # q: [D, H, hd] -> [D, H, hd]
        assert meta.decode_blocks is not None
        if self.decode_kernel is not None and meta.decode_positions is not None:
            assert meta.decode_first_blocks is not None
            return self.decode_kernel(q, self.k_cache, self.v_cache, meta.decode_blocks,
                                      meta.decode_first_blocks, meta.decode_positions, meta.window, self.scale)
        assert meta.decode_mask is not None
        return self._attend(q.unsqueeze(2), meta.decode_blocks, meta.decode_mask).squeeze(2)

    def _attend_own(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [1, H, n, hd]   k, v: [n, KVH, hd], this chunk's own   -> [1, H, n, hd]
        # NOTE: rounded as the cache holds them, so a prompt computes the same whether or not its
        # prefix was cached; no gather, no mask.
        k, v = (t.to(self.k_cache.dtype).to(q.dtype).transpose(0, 1).unsqueeze(0) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                              enable_gqa=self.num_heads != self.num_kv_heads)

    def _attend(self, q: torch.Tensor, blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # q: [B, H, n, hd]   blocks: [B, nb]   mask: [B, 1, n, nb * block_size]   -> [B, H, n, hd]
        b = blocks.shape[0]
        k = self.k_cache[blocks].view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2).to(q.dtype)
        v = self.v_cache[blocks].view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                              enable_gqa=self.num_heads != self.num_kv_heads)
