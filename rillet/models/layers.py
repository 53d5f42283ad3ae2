"""Layers shared by the model families."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rillet.config import RopeConfig
from rillet.kernels import cpu as cpu_kernels


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """An embedding table with no random init: the loader assigns its weight. (Initializing one
    on the meta device imports torch._dynamo, 1.7 s of every start.)"""
    return nn.Embedding(vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size))


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + w), computed in fp32. Gemma uses offset 1, everyone else 0.

    One C++ op where the kernels built (torch's rms_norm is five ops, ~27 us per call at one token).
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset
        kernels = cpu_kernels.load()
        self.kernel = kernels.rms_norm if kernels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim] -> same shape, x's dtype
        if self.kernel is not None and x.dim() in (2, 3) and x.stride(-1) == 1 and x.dtype in _KERNEL_DTYPES:
            return self.kernel(x, self._scale(), self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self._scale(), self.eps).to(x.dtype)

    def _scale(self) -> torch.Tensor:
        """offset + w in fp32, computed once per version of the weight (it is loaded after construction)."""
        key = (self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_scale_key", None) != key:
            w = self.weight.detach().float()
            self._scale_cache = w + self.offset if self.offset else w
            self._scale_key = key
        return self._scale_cache


def inverse_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    # NOTE: on the CPU even while the model is built on the meta device (see build_model).
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if rope.freq_factors is not None:
        return inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32, device="cpu")
    if rope.scaling_type == "linear":
        return inv_freq / rope.factor
    if rope.scaling_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are stretched by `factor`, short ones kept, and the band between
    # low_freq_factor and high_freq_factor interpolated smoothly.
    old_len = rope.original_max_position
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= old_len / rope.high_freq_factor) & (wavelen <= old_len / rope.low_freq_factor)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotary embedding in the rotate-half layout Hugging Face checkpoints use.

    x * cos + rotate_half(x) * sin, with cos and sin stored at full width and the sign of rotate_half
    folded into sin: three ops per tensor. The tables of a step's positions are computed once and
    reused by every layer (the model passes the same positions tensor to each). A per-head RMS norm
    to apply first (Gemma 3's and Qwen 3's q and k norms) comes with its tensor; where the C++
    kernels built, norm and rotation are one op.
    """

    def __init__(self, rope: RopeConfig, dim: int) -> None:
        super().__init__()
        # NOTE: the angles are computed per step, for its positions, not kept as [context, dim]
        # tables: 67 MB each at a 32k context, whose fresh memory took ~1 s of each start.
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inverse_frequencies(rope, dim), persistent=False)
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        kernels = cpu_kernels.load()
        self.kernel = kernels.rope if kernels else None
        self._no_scale = torch.empty(0, device="cpu")

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at `positions`, at full width, the sign of rotate_half folded into sin: [T, dim] each."""
        freqs = positions.float().unsqueeze(1) * self.inv_freq  # [T, dim / 2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def forward(self, positions: torch.Tensor, *xs: tuple[torch.Tensor, RMSNorm | None]) -> list[torch.Tensor]:
        # positions: [T]   each x: ([T, heads, dim], the norm to apply first or None)
        if self._cached is None or self._cached[0] is not positions:
            self._cached = (positions, *self.tables(positions))
        _, cos, sin = self._cached
        out = []
        for x, norm in xs:
            if self.kernel is not None and x.dim() == 3 and x.stride(-1) == 1 and x.dtype in _KERNEL_DTYPES:
                scale, eps = (norm._scale(), norm.eps) if norm is not None else (self._no_scale, 0.0)
                out.append(self.kernel(x, cos, sin, scale, eps))
                continue
            xf = (norm(x) if norm is not None else x).float()
            x1, x2 = xf.chunk(2, dim=-1)
            out.append(torch.addcmul(xf * cos.unsqueeze(1), torch.cat((x2, x1), dim=-1), sin.unsqueeze(1)).to(x.dtype))
        return out


class QKVProjection(nn.Module):
    """q, k and v projections as one GEMM (checkpoints' q_proj/k_proj/v_proj are stacked at load)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool) -> None:
        super().__init__()
        self.sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        self.shapes = [(num_heads, head_dim), (num_kv_heads, head_dim), (num_kv_heads, head_dim)]
        self.qkv_proj = nn.Linear(hidden, sum(self.sizes), bias=bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [T, hidden] -> q [T, heads, dim], k and v [T, kv_heads, dim] (views of one output)
        t = x.shape[0]
        parts = self.qkv_proj(x).split(self.sizes, dim=-1)
        return [p.view(t, *shape) for p, shape in zip(parts, self.shapes)]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up as one GEMM (stacked at load); act(gate) * up is one
    C++ op where the kernels built (torch's chunk, gelu and mul: ~19 against ~7 us at one token)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = act
        kernels = cpu_kernels.load()
        self.kernel = kernels.gated_act if kernels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fused = gate_up.dtype == torch.float32 and gate_up.dim() == 2 and gate_up.is_contiguous()
        if self.kernel is not None and fused:
            return self.down_proj(self.kernel(gate_up, self.act))
        gate, up = gate_up.chunk(2, dim=-1)
        gate = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate.mul_(up))
