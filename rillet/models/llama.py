"""Llama 3.x: pre-norm decoder, SiLU-gated MLP, grouped-query attention, rotary with the
"llama3" frequency scaling. The Qwen family (qwen.py) reuses these blocks."""
from __future__ import annotations

import torch
from torch import nn

from rillet.config import ModelConfig
from rillet.engine.attention import PagedAttention
from rillet.models.layers import GatedMLP, QKVProjection, RMSNorm, Rotary, embedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = QKVProjection(cfg.hidden_size, h, kvh, hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * hd, cfg.hidden_size, bias=False)
        # Qwen 3 normalises q and k per head before rotary.
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attn = PagedAttention(h, kvh, hd, cfg.attention_scale, group=0)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        q, k, v = self.qkv(x)
        q, k = rotary(positions, (q, self.q_norm), (k, self.k_norm))
        return self.o_proj(self.attn(q, k, v))


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act="silu")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.rope, cfg.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T]  -> hidden: [T, hidden]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, self.rotary)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.model = LlamaModel(cfg)
        # Tied to embed_tokens by the loader when the model ties them.
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
