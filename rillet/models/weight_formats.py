"""Faster weight formats for the linear layers, applied after loading.

- "none": weights stay in the engine dtype (float32 is the exact path the parity tests use).
  float32 weights are stored transposed, [in, out] (InputMajorLinear): the CPU's sgemm is 10-15%
  faster on x @ W than on x @ W.T at 4-64 rows, the decode batch sizes. bfloat16 weights
  are packed once into oneDNN's blocked layout (PackedLinear): plain bf16 F.linear re-blocks
  the weight on every call, which made it no faster than fp32 here;
- "auto" (the default): int8 copies of the decoder's weights (AutoInt8Linear), multiplied by
  rillet's kernels: a single row (one stream decoding) with fp32 activations, where reading the
  weights bounds the time; more rows (batched decode steps, prompts) with the activations rounded
  to int8 per group of 32 inputs, on VNNI, where arithmetic does. Greedy agreement with exact
  fp32 in docs/PERFORMANCE.md;
- "int8": weight-only int8 with one scale per output channel, multiplied by
  torch._weight_int8pack_mm. Small batches are bound by reading weights, so halving their
  bytes pays; the LM head keeps its bf16/fp32 copy too and uses it for larger batches,
  where the int8 kernel is the slower one.
- "w8a8": int8 weights (per output channel) and int8 activations (per token, quantized on the
  fly), multiplied by torch._int_mm on the CPU's VNNI units. Measured here for Gemma 3's
  262,144 x 640 LM head: 30 ms at 32 rows against 84 ms in bf16, 8 ms against 21 ms at 1 row.
  As an LM head it screens: the int8 logits pick each row's best candidates, whose logits are
  then recomputed exactly from the dense weight (see RescoredHead), so greedy choices match the
  exact head unless its argmax ranks below the 32 best int8 logits.
"""
from __future__ import annotations

import torch
from torch import nn

from rillet.kernels import cpu as cpu_kernels
from rillet.loaders.format_cache import derived

QUANTIZATIONS = ("auto", "none", "int8", "w8a8")


def _row_scales(w: torch.Tensor) -> torch.Tensor:
    """One symmetric int8 scale per row: [rows, 1]."""
    return w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0


# Rows quantized at a time: the temporaries stay in cache (the 262,144-row LM head: 0.3 s, not 1.0).
_CHUNK_ROWS = 1024


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: w ~ q * scale[:, None]."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0])
    for start in range(0, w.shape[0], _CHUNK_ROWS):
        part = w[start:start + _CHUNK_ROWS].float()
        part_scale = _row_scales(part)
        q[start:start + _CHUNK_ROWS] = torch.round(part / part_scale).clamp_(-127, 127)
        scale[start:start + _CHUNK_ROWS] = part_scale.squeeze(1)
    return q, scale


def _int8_rows(linear: nn.Linear) -> tuple[torch.Tensor, ...]:
    """The int8 copy of a linear's weight and its per-row scales (cached across starts)."""
    return derived("int8_rows", lambda: _quantize_rows(linear.weight.detach().float()))


class PackedLinear(nn.Module):
    """bf16 linear with its weight packed once for oneDNN's bf16 GEMM (AVX-512 BF16).

    Measured here at 1 row: 45 us against 99 us for F.linear in bf16 and 76 us in fp32 for a
    2048 x 640 weight; the 262,144 x 640 LM head: 15 ms against 21 ms (bf16) at 1 row,
    69 ms against 82 ms at 32 rows.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias.detach() if linear.bias is not None else None

    @staticmethod
    def supported(linear: nn.Linear) -> bool:
        return linear.weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] (bf16) -> [..., out]
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


class InputMajorLinear(nn.Module):
    """float32 linear with its weight stored [in, out], so the GEMM reads it without a transpose.

    Measured here for the 18 decoder blocks of Gemma 3 270M (all four GEMMs of each, weights streamed
    from memory): 31.6 ms against 37.2 at 16 rows, 42.0 against 48.2 at 32; never slower from 1 to
    512 rows.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = linear.weight.detach().t().contiguous()  # [in, out]
        self.bias = linear.bias.detach() if linear.bias is not None else None

    @staticmethod
    def supported(linear: nn.Linear) -> bool:
        return linear.weight.dtype == torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        flat = x.reshape(-1, x.shape[-1])
        out = torch.mm(flat, self.weight_t) if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return out.view(*x.shape[:-1], self.weight_t.shape[1])


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with q int8 [out, in] and scale [out]."""

    def __init__(self, linear: nn.Linear, keep_dense_above: int | None = None) -> None:
        super().__init__()
        self.qweight, self.scale = _int8_rows(linear)
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


class AutoInt8Linear(nn.Module):
    """fp32 linear run on an int8 copy of its weight (one scale per output), by row count.

    - one row (a single stream decoding), bound by reading the weight: rillet's int8_linear kernel,
      fp32 activations, the weight packed into 4 x 16 tiles;
    - more rows (batched decode steps, prompts), bound by arithmetic: rillet's w8a8_linear kernel,
      the activations rounded to int8 per group of 32 inputs on the fly, VNNI. A scale per group,
      not per row, keeps Gemma 3's outlier channels from flattening the rest of the row: greedy
      agreement with exact fp32 is then that of int8 weights alone (docs/PERFORMANCE.md), where a
      scale per row (`w8a8`) loses most of it.

    Measured here for the 18 decoder blocks of Gemma 3 270M, weights streamed from memory
    (int8_linear / w8a8_linear / fp32): 6.6 / 6.5 / 13-17 ms at 1 row, 9.1 / 7.5 / 27 at 4, 34 / 12.5
    / 50 at 16, - / 24 / 67 at 32. Where the kernels did not build (or the shape does not tile), the
    earlier split: torch._weight_int8pack_mm (bf16 activations) up to 8 rows, the fp32 weight above.
    """

    GROUP = 32  # inputs per activation scale, as llama.cpp's Q8_0

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features, in_features = linear.weight.shape
        self.bias = linear.bias.detach() if linear.bias is not None else None
        kernels = cpu_kernels.load()
        self.kernels = kernels if (kernels is not None and self.out_features % 16 == 0
                                   and in_features % self.GROUP == 0) else None
        self.dense: InputMajorLinear | None = None
        if self.kernels is not None:
            def make() -> tuple[torch.Tensor, ...]:
                q, scale = _quantize_rows(linear.weight.detach().float())
                return scale, cpu_kernels.pack_int8_tiles(q), cpu_kernels.pack_w8a8(q)

            self.scale, self.tiles, self.packed = derived("auto_int8", make)
        else:
            self.qweight, self.scale = _quantize_rows(linear.weight.detach().float())
            self.dense, self.scale_bf16 = InputMajorLinear(linear), self.scale.to(torch.bfloat16)

    @staticmethod
    def supported(linear: nn.Linear) -> bool:
        return linear.weight.dtype == torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        flat = x.reshape(-1, x.shape[-1])
        if self.kernels is not None:
            flat = flat.contiguous()
            if flat.shape[0] == 1:
                out = self.kernels.int8_linear(flat, self.tiles, self.scale)
            else:
                out = self.kernels.w8a8_linear(flat, self.packed, self.scale, self.GROUP)
        elif flat.shape[0] > 8:
            assert self.dense is not None
            return self.dense(x)
        else:
            out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.qweight, self.scale_bf16).float()
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


class W8A8Linear(nn.Module):
    """y = (qx @ qw.T) * sx * sw: int8 x int8 -> int32 on VNNI, rescaled in fp32.

    Where oneDNN's quantized linear is built in, the int8 weight is packed once for it and the
    GEMM writes fp32 with the weight scales applied: for the 262,144 x 640 LM head, 5.6 ms
    against 7.6 ms for torch._int_mm and two rescaling passes at 1 row, 23 against 47 at 32 rows,
    with identical results (activations go in as uint8 with zero point 128).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.qweight, self.scale = _int8_rows(linear)
        self.bias = linear.bias
        self.packed: torch.Tensor | None = None
        # NOTE: oneDNN's u8 x s8 product saturates without VNNI; torch._int_mm (s8 x s8) stays exact.
        if (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")
                and cpu_kernels.has_vnni()):
            self.packed = torch.ops.onednn.qlinear_prepack(self.qweight, None)
            self.zero_points = torch.zeros(self.qweight.shape[0], dtype=torch.long)
            self.qweight = torch.empty(0, dtype=torch.int8)  # the packed copy is all that is read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        flat = x.reshape(-1, x.shape[-1]).float()
        if self.packed is not None:
            sx = _row_scales(flat)
            qx = torch.round(flat / sx).add_(128).to(torch.uint8)
            out = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, self.packed, self.scale, self.zero_points,
                                                     None, 1.0, 0, torch.float32, "none", [], "").mul_(sx)
        else:
            qx, sxr = _quantize_rows(flat)
            # NOTE: two passes over [rows, out], no [rows, out] temporary of scales.
            out = torch.mul(torch._int_mm(qx, self.qweight.t()), self.scale).mul_(sxr[:, None])
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


class Int4Screen(nn.Module):
    """Approximate logits for a single row from 4-bit weights: asymmetric, one scale and offset per
    group of inputs, multiplied by rillet's int4_linear kernel (VNNI, the activations rounded to int8
    per group, reading 4 KiB ahead of the hardware prefetcher: 4.8-5.2 against 8.0 ms for Gemma 3's
    head at 1 row, measured 2026-12-01) or, where the kernels did not build,
    torch._weight_int4pack_mm_for_cpu with bf16 activations (the figures below).

    About half the bytes of int8: for Gemma 3's 262,144 x 640 head with groups of 32, 5.5 against
    6.6 ms for the int8 screen at 1 row (0.5-1.5 ms of a 21 ms decode step in the engine); about equal at 2 rows
    (6.9 against 7.0), slower from 3 (8.7 against 7.6).

    Groups are the largest of 128, 64 or 32 inputs that divides the row: the bf16 scales and offsets
    of groups of 32 are a fifth of the bytes read. Measured for that head: 89 MB and 6.2 ms per row
    with groups of 128, against 105 MB and 7.9 ms with 32; the exact argmax of 1,280 rows of the
    accuracy prompts ranked at most 10th among the 4-bit logits (7th with groups of 32).
    """

    GROUPS = (128, 64, 32)  # group sizes tried, largest first (fewer scale bytes)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        group = self.group = next(g for g in self.GROUPS if weight.shape[1] % g == 0)
        kernels = cpu_kernels.load()
        self.kernel: cpu_kernels.Int4Linear | None = None
        self.batch_kernel: cpu_kernels.Int4Gemm | None = None
        if kernels is not None and group % 128 == 0:  # rillet's kernels: w = q * scale + low
            self.kernel, self.batch_kernel = kernels.int4_linear, kernels.int4_gemm
            (self.packed, self.scales_and_zeros, self.batch_packed, self.batch_scales,
             self.batch_zeros) = derived("int4_kernels", lambda: _pack_for_kernels(*_quantize_int4(weight, group)))
        else:  # torch's: w = (q - 8) * scale + zero
            self.packed, self.scales_and_zeros = derived("int4_torch", lambda: _pack_for_torch(
                *_quantize_int4(weight, group)))

    @classmethod
    def supported(cls, weight: torch.Tensor) -> bool:
        # NOTE: without VNNI neither rillet's kernels nor torch's beat the int8 screen at one row
        # (Gemma 3's head on AVX2: 30 ms for torch's int4 against 16 ms for w8a8_linear).
        return (hasattr(torch, "_weight_int4pack_mm_for_cpu") and weight.shape[1] % cls.GROUPS[-1] == 0
                and weight.shape[0] % 16 == 0 and cpu_kernels.has_vnni())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [rows, in] -> [rows, out] float32
        if self.batch_kernel is not None and x.shape[0] > 1:
            return self.batch_kernel(x.float().contiguous(), self.batch_packed, self.batch_scales, self.batch_zeros,
                                     self.group)
        if self.kernel is not None:
            return self.kernel(x.float().contiguous(), self.packed, self.scales_and_zeros, self.group)
        return torch._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, self.group,
                                                 self.scales_and_zeros).float()


def _quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per group of inputs: w ~ q * scale + low; q [rows, cols] int32."""
    rows, cols = weight.shape
    groups = weight.detach().view(rows, cols // group, group)
    q = torch.empty(rows, cols, dtype=torch.int32)
    low = torch.empty(rows, cols // group)
    scale = torch.empty(rows, cols // group)
    for start in range(0, rows, _CHUNK_ROWS):
        part, end = groups[start:start + _CHUNK_ROWS].float(), start + _CHUNK_ROWS
        low[start:end], high = part.amin(dim=2), part.amax(dim=2)
        scale[start:end] = ((high - low[start:end]) / 15).clamp(min=1e-8)
        part_q = torch.round((part - low[start:end].unsqueeze(2)) / scale[start:end].unsqueeze(2))
        q[start:end] = part_q.clamp_(0, 15).view(-1, cols)
    return q, low, scale


def _pack_for_kernels(q: torch.Tensor, low: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    scales_and_zeros = torch.stack([scale, low], dim=2).bfloat16().contiguous()
    # a few rows at once (int4_gemm): the same bf16-rounded scales, laid out by 16 outputs
    return (cpu_kernels.pack_int4_blocks(q), scales_and_zeros, cpu_kernels.pack_int4_batch(q),
            cpu_kernels.pack_by_16_outputs(scales_and_zeros[..., 0].float()),
            cpu_kernels.pack_by_16_outputs(scales_and_zeros[..., 1].float()))


def _pack_for_torch(q: torch.Tensor, low: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (torch._convert_weight_to_int4pack_for_cpu(q, 1),
            torch.stack([scale.t(), (low + 8 * scale).t()], dim=2).contiguous().bfloat16())


class Int8Screen(nn.Module):
    """The LM head's int8 logits for many rows (several streams decoding): rillet's w8a8_linear
    kernel with one activation scale per row, the same rounding as W8A8Linear, the scales applied
    as each block is stored. For Gemma 3's 262,144 x 640 head (8 rows of x against 32 outputs
    per block, the int32 sums in registers): 22.3-26.0 against 28.7-30.5 ms for oneDNN at 32
    rows, 14.3-15.7 against 17.8-21.1 at 16, 44.1-48.1 against 49.4-63.0 at 64 (measured
    2026-12-02), and no prepacked oneDNN copy (1.2 s of each start).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        kernels = cpu_kernels.load()
        assert kernels is not None

        def make() -> tuple[torch.Tensor, ...]:
            q, scale = _quantize_rows(linear.weight.detach().float())
            return scale, cpu_kernels.pack_w8a8(q)

        self.scale, self.packed = derived("int8_screen", make)
        self.kernel = kernels.w8a8_linear
        self.bias = linear.bias

    @staticmethod
    def supported(linear: nn.Linear) -> bool:
        out_features, in_features = linear.weight.shape
        return cpu_kernels.load() is not None and out_features % 16 == 0 and in_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [rows, in] -> [rows, out] float32
        out = self.kernel(x.float().contiguous(), self.packed, self.scale, x.shape[1])
        return out if self.bias is None else out + self.bias


class RescoredHead(nn.Module):
    """An LM head that screens with fast int8 logits and recomputes the best ones exactly.

    Per row the int8 logits' error is up to ~1.5 on Gemma 3's 262k vocabulary (std ~0.1), enough to
    swap close leaders; the exact argmax ranked at most 2nd among int8 logits on real prompts.
    The `num_exact` best int8 logits of each row are replaced by exact dot products with the
    dense weight, so every token greedy or top-k/top-p sampling can pick carries its exact logit;
    only the far tail keeps int8 precision. A single row screens with 4-bit weights (Int4Screen),
    whose error is larger (the exact argmax ranked at most 10th over 1,280 rows
    of the accuracy prompts), so it rescores its best 64 from the best 32 chunks.
    """

    def __init__(self, linear: nn.Linear, num_exact: int = 32, chunk: int = 1024) -> None:
        super().__init__()
        self.screen = Int8Screen(linear) if Int8Screen.supported(linear) else W8A8Linear(linear)
        # A few rows (one to a few streams decoding) screen with 4-bit weights: reading the head bounds them.
        self.int4_screen = Int4Screen(linear.weight) if Int4Screen.supported(linear.weight) else None
        self.int4_rows = 8 if self.int4_screen is not None and self.int4_screen.batch_kernel is not None else 1
        self.dense = linear.weight.detach()  # the (tied) embedding: no extra memory
        self.bias = linear.bias
        self.num_exact = min(num_exact, self.dense.shape[0])
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [rows, hidden] -> logits [rows, vocab] (float32)
        if self.int4_screen is not None and x.shape[0] <= self.int4_rows:
            logits = self.int4_screen(x.float())
            ids = self._candidates(logits, 2 * self.num_exact, num_chunks=32)
        else:
            logits = self.screen(x.float()).float()
            ids = self._candidates(logits, self.num_exact, num_chunks=8)  # [rows, num_exact]
        exact = torch.bmm(self.dense[ids].float(), x.float().unsqueeze(2)).squeeze(2)
        if self.bias is not None:
            exact += self.bias[ids]
        return logits.scatter_(1, ids, exact)

    def _candidates(self, logits: torch.Tensor, num_exact: int, num_chunks: int) -> torch.Tensor:
        """Ids of each row's `num_exact` largest logits; the top-k runs over a few chunks only.

        A token of rank r lies in a chunk whose maximum ranks <= r among chunk maxima, so the
        best `num_chunks` chunks hold at least the best `num_chunks` tokens of the row exactly.
        """
        rows, vocab = logits.shape
        num_exact = min(num_exact, vocab)
        if vocab % self.chunk or vocab < 4 * num_chunks * self.chunk:
            return logits.topk(num_exact, dim=1).indices
        chunked = logits.view(rows, vocab // self.chunk, self.chunk)
        best = chunked.amax(dim=2).topk(num_chunks, dim=1).indices  # [rows, num_chunks]
        sub = chunked.gather(1, best.unsqueeze(2).expand(rows, num_chunks, self.chunk))
        idx = sub.view(rows, -1).topk(num_exact, dim=1).indices  # into the gathered chunks
        return best.gather(1, idx // self.chunk) * self.chunk + idx % self.chunk


def apply_quantization(model: nn.Module, layers: str, lm_head: str, lm_head_dense_above: int = 8) -> None:
    """Replace the linear layers of the decoder blocks (`layers`) and the LM head (`lm_head`)."""
    for fmt in (layers, lm_head):
        if fmt not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {fmt!r}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            is_head = not name and child_name == "lm_head"
            fmt = lm_head if is_head else layers
            if fmt == "w8a8":
                setattr(module, child_name, RescoredHead(child) if is_head else W8A8Linear(child))
            elif fmt == "int8":
                setattr(module, child_name, Int8Linear(child, lm_head_dense_above if is_head else None))
            elif fmt == "auto" and not is_head and AutoInt8Linear.supported(child):
                setattr(module, child_name, AutoInt8Linear(child))
            elif PackedLinear.supported(child):
                setattr(module, child_name, PackedLinear(child))
            elif InputMajorLinear.supported(child) and not is_head:
                # NOTE: the head's weight is usually the tied embedding; a transposed copy would double it.
                setattr(module, child_name, InputMajorLinear(child))
