"""The weight formats compute what they claim: exact where they say exact, close where quantized."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rillet.kernels import cpu as cpu_kernels

from rillet.models.weight_formats import (AutoInt8Linear, InputMajorLinear, Int8Screen, RescoredHead, W8A8Linear,
                                          apply_quantization)


def linear(in_features: int, out_features: int, seed: int, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@torch.inference_mode()
def test_input_major_is_the_same_fp32_product() -> None:
    lin = linear(96, 80, 0, bias=True)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(InputMajorLinear(lin)(x), lin(x), atol=1e-5, rtol=1e-5)


def int8_dequantized(lin: nn.Linear) -> torch.Tensor:
    scale = lin.weight.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(lin.weight / scale).clamp(-127, 127) * scale


@torch.inference_mode()
def test_auto_int8_takes_fp32_rows_alone_and_int8_rows_in_batches(kernels: cpu_kernels.Kernels) -> None:
    lin = linear(512, 64, 1, bias=True)
    fmt = AutoInt8Linear(lin)
    assert fmt.kernels is not None and fmt.dense is None  # no fp32 copy kept
    dequant = int8_dequantized(lin)
    x = torch.randn(9, 512)
    x[:, 5] *= 50  # an outlier channel, as Gemma 3's activations have
    one = fmt(x[:1])  # one row: the exact activations times the int8 weight
    assert relative_error(one, x[:1] @ dequant.t() + lin.bias) < 1e-5
    got = fmt(x)  # more: the activations rounded to int8 per group of 32 inputs
    groups = x.view(9, 16, 32)
    sx = groups.abs().amax(dim=2, keepdim=True) / 127
    xq = (torch.round(groups / sx) * sx).view(9, 512)
    assert relative_error(got, xq @ dequant.t() + lin.bias) < 1e-4
    assert not torch.allclose(got, x @ dequant.t() + lin.bias, atol=1e-5)
    assert relative_error(got, lin(x)) < 0.02
    # a scale per row would let the outlier flatten the other channels: far worse
    row_sx = x.abs().amax(dim=1, keepdim=True) / 127
    per_row = torch.round(x / row_sx) * row_sx @ dequant.t() + lin.bias
    exact_x = x @ dequant.t() + lin.bias
    assert relative_error(got, exact_x) < relative_error(per_row, exact_x) / 3


@torch.inference_mode()
def test_auto_int8_without_kernels_keeps_the_fp32_weights_for_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    lin = linear(128, 64, 1, bias=True)
    fmt = AutoInt8Linear(lin)
    assert fmt.kernels is None
    big = torch.randn(9, 128)
    torch.testing.assert_close(fmt(big), lin(big), atol=1e-5, rtol=1e-5)  # the fp32 weights
    small = big[:8]
    got = fmt(small)  # torch's int8 kernel, its activations and scales rounded to bf16
    assert not torch.allclose(got, lin(small), atol=1e-6)
    assert relative_error(got, small.bfloat16().float() @ int8_dequantized(lin).t() + lin.bias) < 0.01


@torch.inference_mode()
def test_w8a8_is_close() -> None:
    lin = linear(256, 128, 2)
    x = torch.randn(4, 256)
    assert relative_error(W8A8Linear(lin)(x), lin(x)) < 0.02


@torch.inference_mode()
def test_int8_screen_rounds_as_w8a8_and_computes_the_same(kernels: cpu_kernels.Kernels) -> None:
    lin = linear(640, 4096 + 16, 4)  # the last block of outputs is a part one
    screen, reference = Int8Screen(lin), W8A8Linear(lin)
    for rows in (1, 7, 8, 19, 32):
        x = torch.randn(rows, 640)
        x[:, 3] *= 50
        got, want = screen(x), reference(x)
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)
    assert isinstance(RescoredHead(lin).screen, Int8Screen)


@torch.inference_mode()
def test_rescored_head_is_exact_where_it_matters() -> None:
    lin = linear(128, 4096 * 8, 3)
    head = RescoredHead(lin, num_exact=32, chunk=1024)
    assert (head.int4_screen is not None) == cpu_kernels.has_vnni()  # 4-bit screens need VNNI to pay
    for rows in (20, 5, 1):  # int8 screen; 4-bit screens of a few rows (with the kernels) and of one row
        x = torch.randn(rows, 128)
        want = lin(x)
        got = head(x)
        assert torch.equal(got.argmax(dim=1), want.argmax(dim=1))
        # the few likeliest tokens carry their exact logits (the int8 screen rescores 32, the 4-bit ones 64)
        best = want.topk(8 if rows <= head.int4_rows else 4, dim=1).indices
        torch.testing.assert_close(got.gather(1, best), want.gather(1, best), atol=1e-5, rtol=1e-5)
        assert not torch.equal(got, want)  # the tail keeps the screen's precision


def test_auto_replaces_the_decoder_linears_and_leaves_the_head() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.ModuleDict({"proj": linear(32, 32, 4)})])
            self.lm_head = linear(32, 100, 5)

    model = Tiny()
    apply_quantization(model, "auto", "none")
    assert isinstance(model.layers[0]["proj"], AutoInt8Linear)
    assert isinstance(model.lm_head, nn.Linear)
