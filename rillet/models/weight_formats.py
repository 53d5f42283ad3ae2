"""Faster weight formats for the linear layers, applied after loading.

- "none": weights stay in the engine dtype (float32 is the exact path the parity tests use);
- "int8": weight-only int8 with one scale per output channel, multiplied by
  torch._weight_int8pack_mm. Small batches are bound by reading weights, so halving their
  bytes pays; the LM head keeps its bf16/fp32 copy too and uses it for larger batches,
  where the int8 kernel is the slower one.
"""
from __future__ import annotations

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8")


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with q int8 [out, in] and scale [out]."""

    def __init__(self, linear: nn.Linear, keep_dense_above: int | None = None) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.scale = scale
        self.bias = linear.bias
        # NOTE: a dense copy is kept only where large batches are common enough to want it.
        self.dense = linear.weight.detach() if keep_dense_above is not None else None
        self.keep_dense_above = keep_dense_above or 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        flat = x.reshape(-1, x.shape[-1])
        if self.dense is not None and flat.shape[0] > self.keep_dense_above:
            out = flat @ self.dense.t()
        else:
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scale.to(flat.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


def apply_quantization(model: nn.Module, quantization: str, lm_head_dense_above: int = 8) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "none":
        return
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                dense_above = lm_head_dense_above if full == "lm_head" else None
                setattr(module, child_name, Int8Linear(child, dense_above))
