"""Gemma 3 (text). Quirks, all visible below:
- layers alternate sliding-window (local) and full (global) attention, 5 local : 1 global;
  local layers have their own rotary base (10k vs 1M) and keep only their window of KV;
- RMSNorm scales by (1 + w); q and k are RMS-normalised per head before rotary;
- four norms per block (before and after attention, before and after the MLP);
- embeddings are multiplied by sqrt(hidden_size); the LM head is tied to them.
"""
from __future__ import annotations

import torch
from torch import nn

from rillet.config import ModelConfig
from rillet.engine.attention import PagedAttention
from rillet.models.layers import GatedMLP, QKVProjection, RMSNorm, Rotary, embedding
from rillet.models.registry import kv_groups


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, group: int) -> None:
        super().__init__()
        h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = QKVProjection(cfg.hidden_size, h, kvh, hd, bias=False)
        self.o_proj = nn.Linear(h * hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, offset=1.0)
        self.attn = PagedAttention(h, kvh, hd, cfg.attention_scale, group)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        q, k, v = self.qkv(x)
        q, k = rotary(positions, (q, self.q_norm), (k, self.k_norm))
        return self.o_proj(self.attn(q, k, v))


class Gemma3Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool, group: int) -> None:
        super().__init__()
        self.sliding = sliding
        self.self_attn = Gemma3Attention(cfg, group)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act="gelu_tanh")
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset=1.0)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, rotary))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        groups = kv_groups(cfg)
        self.layers = nn.ModuleList(
            Gemma3Layer(cfg, cfg.layer_type(i) == "sliding", groups.index(cfg.layer_type(i)))
            for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)
        self.rotary_global = Rotary(cfg.rope, cfg.head_dim)
        self.rotary_local = Rotary(cfg.local_rope or cfg.rope, cfg.head_dim)
        self.embed_scale = cfg.hidden_size ** 0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T]  -> hidden: [T, hidden]
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, positions, self.rotary_local if layer.sliding else self.rotary_global)
        return self.norm(x)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.model = Gemma3Model(cfg)
        # Tied to embed_tokens by the loader (one tensor, unless a weight format repacks it).
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

