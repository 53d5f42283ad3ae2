"""Derived weight formats saved once and loaded at the next start give the same layers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rillet.kernels import cpu as cpu_kernels
from rillet.loaders import format_cache
from rillet.memory import lazy_zeros, resident_copy
from rillet.models import weight_formats
from rillet.models.weight_formats import apply_quantization


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(128, 64, bias=False)) for _ in range(2))
        self.lm_head = nn.Linear(128, 4096, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (*(layer(x) for layer in self.layers), self.lm_head(x))


def quantized(path: Path | None) -> Tiny:
    model = Tiny()
    with format_cache.cached(path):
        apply_quantization(model, "auto", "w8a8")
    return model


@torch.inference_mode()
def test_a_second_start_loads_the_formats_and_computes_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernels: cpu_kernels.Kernels) -> None:
    path = tmp_path / "formats.safetensors"
    first = quantized(path)
    assert path.exists()

    def no_quantizing(*_: object) -> None:
        raise AssertionError("computed again instead of loaded")

    monkeypatch.setattr(weight_formats, "_quantize_rows", no_quantizing)
    monkeypatch.setattr(weight_formats, "_quantize_int4", no_quantizing)
    second = quantized(path)
    x = torch.randn(5, 128)
    for rows in (x[:1], x[:3], x):  # the single-row, few-row and batched paths
        for a, b in zip(first(rows), second(rows), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the two decoder layers got their own entries, not the first one's twice
    assert not torch.equal(second.layers[0][0].packed, second.layers[1][0].packed)


@torch.inference_mode()
def test_a_damaged_cache_file_is_computed_again(tmp_path: Path) -> None:
    path = tmp_path / "formats.safetensors"
    path.write_bytes(b"not a safetensors file")
    model = quantized(path)
    x = torch.randn(2, 128)
    torch.testing.assert_close(model(x)[2], quantized(None)(x)[2], rtol=0, atol=0)
    assert path.stat().st_size > 1000  # replaced by a good one


def test_the_cache_key_follows_the_options_and_the_model_file(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"a")
    auto = format_cache.entry_path(model, "auto", "w8a8", "float32")
    assert format_cache.entry_path(model, "auto", "w8a8", "float32") == auto
    assert format_cache.entry_path(model, "int8", "w8a8", "float32") != auto
    model.write_bytes(b"ab")
    assert format_cache.entry_path(model, "auto", "w8a8", "float32") != auto


def test_lazy_zeros_read_as_zero_and_take_writes() -> None:
    t = lazy_zeros((64, 16, 1, 32), torch.float16)
    assert t.shape == (64, 16, 1, 32) and t.dtype == torch.float16 and t.is_contiguous()
    assert not t.any()
    t[3].fill_(2.0)
    assert float(t.float().sum()) == 2.0 * 16 * 32


def test_resident_copy_equals_its_source_and_owns_its_memory() -> None:
    source = torch.randn(300, 70)
    copy = resident_copy(source)
    assert torch.equal(copy, source) and copy.dtype == source.dtype
    source.zero_()
    assert copy.abs().sum() > 0  # not a view of the source
