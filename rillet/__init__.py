"""rillet: a streaming-first LLM inference server that runs well on a plain CPU."""
from __future__ import annotations

import os
from typing import Any

# Tensors of 2 MiB and more that torch allocates (a step's activations and logits, weight formats
# made at load) in transparent huge pages: read before torch allocates its first tensor, so it
# must be set before torch is imported. On the 2-core machine of docs/PERFORMANCE.md, 32 streams
# run ~13% faster, and without it the first ~30 s after loading ran slower still while the fresh
# 4 KiB pages settled. THP_MEM_ALLOC_ENABLE=0 turns it off. (The KV cache and the weights copied
# out of cache files are in 4 KiB pages: see rillet.memory.)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__all__ = ["LLM", "SamplingParams", "EngineConfig"]


def __getattr__(name: str) -> Any:
    # NOTE: lazy, so the pure-Python core (scheduler, block manager) imports without torch.
    if name == "LLM":
        from rillet.llm import LLM

        return LLM
    if name == "SamplingParams":
        from rillet.sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from rillet.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
