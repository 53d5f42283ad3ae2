"""rillet: a streaming-first LLM inference server that runs well on a plain CPU."""
from __future__ import annotations

from typing import Any

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
