"""Qwen 2 / 2.5 / 3: the Llama architecture with two switches, both read from the config.
- Qwen 2 and 2.5 put a bias on the q, k and v projections (`attention_bias`);
- Qwen 3 drops the bias and RMS-normalises q and k per head before rotary (`qk_norm`),
  with an explicit head_dim that need not be hidden_size / num_heads.
"""
from __future__ import annotations

from rillet.models.llama import LlamaForCausalLM


class QwenForCausalLM(LlamaForCausalLM):
    pass
