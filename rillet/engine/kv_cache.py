"""KV-cache tensors: how many blocks each group gets, and binding them to attention layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rillet.config import EngineConfig, ModelConfig
from rillet.engine.attention import PagedAttention
from rillet.engine.block_manager import cdiv
from rillet.models.registry import kv_groups


@dataclass(frozen=True)
class KVPlan:
    groups: list[str]  # "full" / "sliding"
    num_blocks: list[int]  # per group, including the null block
    windows: list[int | None]


def plan_kv_cache(cfg: ModelConfig, ecfg: EngineConfig, dtype: torch.dtype, max_model_len: int) -> KVPlan:
    """Split the KV budget between the full-attention group and the sliding-window group.

    A sliding group needs at most its window (plus one chunk) per sequence, whatever the
    context length, so it gets exactly that for `max_num_seqs` sequences; the rest of the
    budget goes to the full-attention layers, whose size bounds the total context.
    """
    groups = kv_groups(cfg)
    bs = ecfg.block_size
    layers = {g: sum(1 for i in range(cfg.num_layers) if cfg.layer_type(i) == g) for g in groups}
    block_bytes = 2 * bs * cfg.num_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()
    windows: list[int | None] = [None if g == "full" else cfg.sliding_window for g in groups]
    sliding = 0
    if "sliding" in groups:
        assert cfg.sliding_window is not None
        sliding = ecfg.max_num_seqs * (cdiv(cfg.sliding_window, bs) + 1) + cdiv(ecfg.max_num_batched_tokens, bs) + 2
    if ecfg.num_kv_tokens is not None:
        full = cdiv(ecfg.num_kv_tokens, bs) + 1
    else:
        budget = int(ecfg.kv_cache_memory_gb * 2**30) - sliding * block_bytes * layers.get("sliding", 0)
        full = min(budget // (block_bytes * layers["full"]), ecfg.max_num_seqs * cdiv(max_model_len, bs) + 1)
        if full < 2:
            raise ValueError(f"kv_cache_memory_gb={ecfg.kv_cache_memory_gb} leaves no room for the KV cache")
    if sliding:
        sliding = min(sliding, full)
    return KVPlan(groups, [full, sliding] if sliding else [full], windows)


def allocate_kv_cache(model: nn.Module, cfg: ModelConfig, plan: KVPlan, block_size: int,
                      dtype: torch.dtype) -> None:
    """Give each attention layer its cache tensors: [num_blocks, block_size, kv_heads, head_dim]."""
    for module in model.modules():
        if isinstance(module, PagedAttention):
            shape = (plan.num_blocks[module.group], block_size, cfg.num_kv_heads, cfg.head_dim)
            module.k_cache = torch.zeros(shape, dtype=dtype)
            module.v_cache = torch.zeros(shape, dtype=dtype)
