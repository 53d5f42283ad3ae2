"""KV-cache tensors: how many blocks each group gets, binding them to attention layers, moving kept keys."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rillet.config import EngineConfig, ModelConfig
from rillet.engine.attention import PagedAttention
from rillet.engine.block_manager import cdiv
from rillet.engine.block_pool import NULL_BLOCK
from rillet.engine.sink import KVShift
from rillet.memory import lazy_zeros
from rillet.models.layers import inverse_frequencies
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
            module.k_cache = lazy_zeros(shape, dtype)
            module.v_cache = lazy_zeros(shape, dtype)


class KVShifter:
    """Carries out sink-mode evictions on the cache tensors (`rillet.engine.sink` plans them).

    Keys are stored after rotary embedding. RoPE turns each pair (x1_i, x2_i) of a key at position
    p by the angle p * w_i, so turning it again by -delta * w_i yields exactly the key the model
    would have written at position p - delta: kept keys move back without recomputing anything.
    Each KV group has its own rotary base (Gemma 3: global layers 1M, sliding layers 10k).
    """

    def __init__(self, model: nn.Module, cfg: ModelConfig, block_size: int) -> None:
        self.block_size = block_size
        groups = kv_groups(cfg)
        ropes = [cfg.rope if g == "full" else (cfg.local_rope or cfg.rope) for g in groups]
        self.inv_freqs = [inverse_frequencies(rope, cfg.head_dim) for rope in ropes]  # [head_dim / 2] each
        layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        self.layers = [[m for m in layers if m.group == g] for g in range(len(groups))]

    @torch.inference_mode()
    def apply(self, shifts: list[KVShift]) -> None:
        for shift in shifts:
            for g, inv_freq in enumerate(self.inv_freqs):
                slots = self._kept_slots(shift, g)
                angle = -shift.delta * inv_freq.double()  # NOTE: double: delta * w can be large
                cos, sin = angle.cos().float(), angle.sin().float()
                for layer in self.layers[g]:
                    if shift.copies[g] is not None:
                        src, dst = shift.copies[g]  # type: ignore[misc]
                        r = shift.num_sink_tokens % self.block_size
                        layer.k_cache[dst, r:] = layer.k_cache[src, r:]
                        layer.v_cache[dst, r:] = layer.v_cache[src, r:]
                    rotate_keys(layer.k_cache.view(-1, *layer.k_cache.shape[2:]), slots, cos, sin)

    def _kept_slots(self, shift: KVShift, g: int) -> torch.Tensor:
        """Flat slots of the kept tokens after the sinks, in the new layout: [n]."""
        bs = self.block_size
        pos = torch.arange(shift.num_sink_tokens, shift.num_kv_tokens)
        blocks = torch.tensor(shift.block_tables[g], dtype=torch.long)[pos // bs]
        return (blocks * bs + pos % bs)[blocks != NULL_BLOCK]


def rotate_keys(k_flat: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the keys at `slots` by one angle per frequency, in place (rotate-half layout).

    k_flat: [num_slots, kv_heads, head_dim]   slots: [n]   cos, sin: [head_dim / 2]
    """
    k = k_flat[slots].float()  # [n, kv_heads, head_dim]
    x1, x2 = k.chunk(2, dim=-1)
    k_flat[slots] = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(k_flat.dtype)
