"""Model families by name, imported lazily."""
from __future__ import annotations

import importlib

from torch import nn

from rillet.config import ModelConfig

_FAMILIES = {
    "gemma3": ("rillet.models.gemma3", "Gemma3ForCausalLM"),
    "llama": ("rillet.models.llama", "LlamaForCausalLM"),
    "qwen2": ("rillet.models.qwen", "QwenForCausalLM"),
    "qwen3": ("rillet.models.qwen", "QwenForCausalLM"),
}


def model_class(family: str) -> type[nn.Module]:
    if family not in _FAMILIES:
        raise ValueError(f"unsupported model family {family!r}; rillet runs {', '.join(sorted(_FAMILIES))}")
    module, name = _FAMILIES[family]
    cls: type[nn.Module] = getattr(importlib.import_module(module), name)
    return cls


def kv_groups(cfg: ModelConfig) -> list[str]:
    """KV-cache groups in a fixed order: "full" first, then "sliding" if the model has any."""
    return [t for t in ("full", "sliding") if t in (cfg.layer_types or ("full",))]
