"""The weight formats compute what they claim: exact where they say exact, close where quantized."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rillet.kernels import cpu as cpu_kernels

from rillet.models.weight_formats import (InputMajorLinear, RescoredHead, SmallBatchInt8Linear, W8A8Linear,
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


@pytest.mark.parametrize("with_kernels", [True, False])
@torch.inference_mode()
def test_small_batch_int8_switches_to_the_exact_weights_above_its_row_limit(
        with_kernels: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not with_kernels:
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    lin = linear(128, 64, 1, bias=True)
    fmt = SmallBatchInt8Linear(lin, max_int8_rows=8)
    assert (fmt.kernel is None) == (not with_kernels or cpu_kernels.load() is None)
    big = torch.randn(9, 128)
    torch.testing.assert_close(fmt(big), lin(big), atol=1e-5, rtol=1e-5)  # the fp32 weights
    small = big[:8]
    got = fmt(small)
    assert got.dtype == torch.float32 and got.shape == (8, 64)
    assert not torch.allclose(got, lin(small), atol=1e-6)  # int8 weights
    assert relative_error(got, lin(small)) < 0.02
    # what it computes: x times the per-row dequantized int8 weight, plus the bias
    scale = lin.weight.abs().amax(dim=1, keepdim=True) / 127
    dequant = torch.round(lin.weight / scale).clamp(-127, 127) * scale
    # the C++ kernel takes fp32 activations; torch's fallback rounds them (and its scales) to bf16
    exact_x = fmt.kernel is not None
    want = (small if exact_x else small.bfloat16().float()) @ dequant.t() + lin.bias
    assert relative_error(got, want) < (1e-5 if exact_x else 0.01)


@torch.inference_mode()
def test_w8a8_is_close() -> None:
    lin = linear(256, 128, 2)
    x = torch.randn(4, 256)
    assert relative_error(W8A8Linear(lin)(x), lin(x)) < 0.02


@torch.inference_mode()
def test_rescored_head_is_exact_where_it_matters() -> None:
    lin = linear(64, 4096 * 8, 3)
    head = RescoredHead(lin, num_exact=32, chunk=1024)
    assert head.single_row_screen is not None
    for rows in (5, 1):  # int8 screen; a single row's 4-bit screen
        x = torch.randn(rows, 64)
        want = lin(x)
        got = head(x)
        assert torch.equal(got.argmax(dim=1), want.argmax(dim=1))
        best = want.topk(8, dim=1).indices  # the few likeliest tokens carry their exact logits
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
    assert isinstance(model.layers[0]["proj"], SmallBatchInt8Linear)
    assert isinstance(model.lm_head, nn.Linear)
