"""The C++ kernels equal their torch paths.

Paged decode attention against gather + SDPA with a mask: random caches, shuffled physical blocks,
tables padded with block 0, first logical blocks at or before the window's start, GQA, sliding
windows, float32 and bfloat16. RMS norm against torch's rms_norm: 2-d and strided 3-d inputs,
widths that are not a multiple of the vector width, both dtypes. The int8 linear against the
dequantized product in float64, for row counts on both sides of its 4-row passes; the int4
linear against the same product with the inputs rounded to int8 per group, as it does. The gated
activation against torch's gelu (tanh) and silu.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from rillet.engine.attention import PagedAttention
from rillet.engine.model_runner import _mask
from rillet.kernels import cpu as cpu_kernels

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def kernel(kernels: cpu_kernels.Kernels) -> cpu_kernels.DecodeAttention:
    return kernels.decode_attention


def random_tables(gen: torch.Generator, q_pos: torch.Tensor, block_size: int, window: int | None,
                  num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """first_blocks [D] and block tables [D, max_blocks], padded with the null block 0."""
    needed = [0 if window is None else max(0, p - window + 1) // block_size for p in q_pos.tolist()]
    # Some rows start earlier than they need to: the kernel must mask those keys too.
    firsts = torch.tensor([int(torch.randint(0, n + 1, (1,), generator=gen)) if i % 3 == 0 else n
                           for i, n in enumerate(needed)])
    lengths = q_pos // block_size - firsts + 1
    tables = torch.zeros(len(q_pos), int(lengths.max()), dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tables[i, :n] = torch.randperm(num_blocks - 1, generator=gen)[:n] + 1
    return firsts, tables


def torch_path(layer: PagedAttention, q: torch.Tensor, tables: torch.Tensor, firsts: torch.Tensor,
               q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    block_size = layer.k_cache.shape[1]
    mask = _mask(firsts, tables.shape[1], block_size, q_pos.unsqueeze(1), window)[:, None, None]
    return layer._attend(q.unsqueeze(2), tables, mask).squeeze(2)


@pytest.mark.parametrize("num_seqs", [1, 9])  # one sequence on 2+ threads: work split by query head
@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float32, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("window", [None, 7, 24, 512])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "block_size"),
                         [(4, 1, 256, 16), (4, 4, 64, 16), (8, 2, 128, 5), (2, 1, 32, 1)])
def test_matches_torch_path(kernel: cpu_kernels.DecodeAttention, num_seqs: int, dtype: torch.dtype,
                            cache_dtype: torch.dtype, window: int | None, num_heads: int, num_kv_heads: int, head_dim: int,
                            block_size: int) -> None:
    gen = torch.Generator().manual_seed(num_heads * 1000 + head_dim * 10 + block_size + (window or 0) * 7)
    max_pos = 300
    num_blocks = max_pos // block_size + 8
    layer = PagedAttention(num_heads, num_kv_heads, head_dim, head_dim**-0.5, group=0)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    layer.k_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    layer.v_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    q_pos = torch.randint(0, max_pos, (num_seqs,), generator=gen)
    q_pos[0] = max_pos - 1  # the longest context
    if num_seqs > 1:
        q_pos[1] = 0  # a single visible key
    firsts, tables = random_tables(gen, q_pos, block_size, window, num_blocks)
    # flat to sharp softmax: query norms vary by sequence
    sharpness = 1 + 3 * torch.rand(num_seqs, 1, 1, generator=gen)
    q = (torch.randn(num_seqs, num_heads, head_dim, generator=gen) * sharpness).to(dtype)

    out = kernel(q, layer.k_cache, layer.v_cache, tables, firsts, q_pos, window or 0, layer.scale)
    ref = torch_path(layer, q, tables, firsts, q_pos, window)
    assert out.dtype == dtype and out.shape == q.shape
    worst = (out.float() - ref.float()).abs().max().item()
    assert worst <= TOLERANCE[dtype], f"max |difference| {worst:.2e}"


def test_strided_query(kernel: cpu_kernels.DecodeAttention) -> None:
    """q may be a view with padded rows, as a slice of a larger projection is."""
    gen = torch.Generator().manual_seed(0)
    layer = PagedAttention(4, 1, 64, 0.125, group=0)
    layer.k_cache = torch.randn(8, 16, 1, 64, generator=gen)
    layer.v_cache = torch.randn(8, 16, 1, 64, generator=gen)
    q = torch.randn(3, 6, 64, generator=gen)[:, 1:5]
    q_pos = torch.tensor([20, 5, 40])
    firsts, tables = random_tables(gen, q_pos, 16, None, 8)
    out = kernel(q, layer.k_cache, layer.v_cache, tables, firsts, q_pos, 0, layer.scale)
    assert torch.allclose(out, torch_path(layer, q, tables, firsts, q_pos, None), atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 1), (4, 4)])
def test_first_chunk_attends_its_own_keys_as_the_cache_path(cache_dtype: torch.dtype, num_heads: int,
                                                            num_kv_heads: int) -> None:
    """A prompt's first chunk skips the gather and the mask (causal SDPA over its own keys,
    rounded as the cache holds them); the result equals reading them back from the cache."""
    gen = torch.Generator().manual_seed(num_heads + num_kv_heads)
    n, head_dim, block_size = 37, 64, 16
    layer = PagedAttention(num_heads, num_kv_heads, head_dim, head_dim**-0.5, group=0)
    layer.k_cache = torch.zeros(8, block_size, num_kv_heads, head_dim, dtype=cache_dtype)
    layer.v_cache = torch.zeros_like(layer.k_cache)
    q = torch.randn(n, num_heads, head_dim, generator=gen) * 2
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen)
    blocks = torch.tensor([5, 2, 7])  # logical blocks 0..2 of the sequence
    slots = torch.tensor([int(blocks[p // block_size]) * block_size + p % block_size for p in range(n)])
    for cache, new in ((layer.k_cache, k), (layer.v_cache, v)):
        cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, new.to(cache_dtype))
    qs = q.transpose(0, 1).unsqueeze(0)
    mask = _mask(torch.tensor([0]), len(blocks), block_size, torch.arange(n).unsqueeze(1), None)
    ref = layer._attend(qs, blocks.unsqueeze(0), mask[None, None])
    out = layer._attend_own(qs, k, v)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5), f"max |difference| {(out - ref).abs().max().item():.2e}"


def test_bad_block_id_raises(kernel: cpu_kernels.DecodeAttention) -> None:
    cache = torch.zeros(4, 16, 1, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel(torch.zeros(1, 4, 64), cache, cache, torch.tensor([[9]]), torch.tensor([0]), torch.tensor([3]), 0, 1.0)


@pytest.fixture(scope="module")
def rms_norm(kernels: cpu_kernels.Kernels) -> cpu_kernels.RmsNorm:
    return kernels.rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 640), (7, 256), (300, 37), (0, 64)])
def test_rms_norm_matches_torch(rms_norm: cpu_kernels.RmsNorm, shape: tuple[int, int], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    scale = torch.rand(shape[1], generator=gen) + 0.5
    want = torch.nn.functional.rms_norm(x.float(), (shape[1],), scale, 1e-6).to(dtype)
    got = rms_norm(x, scale, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_rms_norm_of_strided_heads(rms_norm: cpu_kernels.RmsNorm) -> None:
    # q and k come as views of one fused qkv output: [T, heads, dim] with a row stride past heads * dim
    qkv = torch.randn(5, 4 * 64 + 2 * 64)
    k = qkv[:, 4 * 64:5 * 64].view(5, 1, 64)
    q = qkv[:, :4 * 64].view(5, 4, 64)
    scale = torch.rand(64) + 0.5
    for x in (q, k):
        want = torch.nn.functional.rms_norm(x, (64,), scale, 1e-6)
        torch.testing.assert_close(rms_norm(x, scale, 1e-6), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        rms_norm(qkv.t(), torch.ones(5), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [False, True])
def test_rope_matches_the_torch_path(dtype: torch.dtype, with_norm: bool) -> None:
    from rillet.config import RopeConfig
    from rillet.models.layers import RMSNorm, Rotary

    rotary = Rotary(RopeConfig(theta=10000.0), 64)
    if rotary.kernel is None:
        pytest.skip("the C++ kernels did not build here")
    norm = RMSNorm(64, 1e-6, offset=1.0) if with_norm else None
    if norm is not None:
        torch.nn.init.normal_(norm.weight)
    qkv = torch.randn(7, 6 * 64).to(dtype)  # q: 4 heads, k: 1 head, v: 1 head, as views of one output
    q, k = qkv[:, :4 * 64].view(7, 4, 64), qkv[:, 4 * 64:5 * 64].view(7, 1, 64)
    positions = torch.tensor([0, 1, 2, 40, 41, 300, 511])
    fast = rotary(positions, (q, norm), (k, norm))
    rotary.kernel = None
    rotary._cached = None
    slow = rotary(positions, (q, norm), (k, norm))
    for got, want in zip(fast, slow):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 13])
@pytest.mark.parametrize(("out_features", "in_features"), [(4, 16), (40, 96), (1536, 640)])
def test_int8_linear_is_the_dequantized_product(kernels: cpu_kernels.Kernels, rows: int, out_features: int,
                                                in_features: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=gen)
    scale = torch.rand(out_features, generator=gen) / 100
    x = torch.randn(rows, in_features, generator=gen)
    got = kernels.int8_linear(x, cpu_kernels.pack_int8_tiles(q), scale)
    want = x.double() @ (q.double() * scale.double()[:, None]).t()
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_int8_linear_rejects_shapes_it_cannot_tile(kernels: cpu_kernels.Kernels) -> None:
    q = torch.zeros(6, 16, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        kernels.int8_linear(torch.zeros(1, 16), q, torch.ones(6))


def int8_rounded_per_group(x: torch.Tensor, group: int) -> torch.Tensor:
    """x rounded as the w8a8_linear kernel rounds it: int8 per group, scale max|x| / 127, half to even."""
    groups = x.view(x.shape[0], -1, group)
    amax = groups.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(groups * inv) * (amax / 127)).view(x.shape)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 32, 33])
@pytest.mark.parametrize(("out_features", "in_features", "group"), [(16, 32, 32), (48, 96, 32), (1536, 640, 32),
                                                                     (32, 128, 64),
                                                                     # one group per row (the LM head's screen):
                                                                     # blocks of 8 rows, a part chunk at the end
                                                                     (80, 64, 64), (208, 128, 128), (1024, 640, 640)])
def test_w8a8_linear_is_the_product_with_inputs_rounded_per_group(kernels: cpu_kernels.Kernels, rows: int,
                                                                   out_features: int, in_features: int,
                                                                   group: int) -> None:
    gen = torch.Generator().manual_seed(rows * 31 + out_features)
    q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=gen)
    scale = torch.rand(out_features, generator=gen) / 100
    x = torch.randn(rows, in_features, generator=gen)
    x[:, 1] *= 100  # an outlier: only its own group loses precision
    x[0, :group] = 0  # an all-zero group
    got = kernels.w8a8_linear(x, cpu_kernels.pack_w8a8(q), scale, group)
    want = int8_rounded_per_group(x, group).double() @ (q.double() * scale.double()[:, None]).t()
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    # the integer dot products are exact; the fp32 sum over groups rounds (terms larger than the result)
    assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max()) * in_features / group


def test_w8a8_linear_rejects_shapes_it_cannot_tile(kernels: cpu_kernels.Kernels) -> None:
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.w8a8_linear(torch.zeros(1, 32), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8), 32)
    with pytest.raises(RuntimeError, match="group"):
        kernels.w8a8_linear(torch.zeros(1, 48), torch.zeros(16, 48, dtype=torch.uint8), torch.ones(16), 32)


@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_gated_act_matches_torch(kernels: cpu_kernels.Kernels, act: str, rows: int) -> None:
    gate_up = torch.randn(rows, 2 * 200, generator=torch.Generator().manual_seed(rows)) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    want = (F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")) * up
    got = kernels.gated_act(gate_up, act)
    assert got.shape == (rows, 200)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6])
@pytest.mark.parametrize(("out_features", "in_features", "group"), [(8, 128, 128), (1030, 640, 128), (24, 512, 256)])
def test_int4_linear_is_the_product_with_int8_rounded_inputs(kernels: cpu_kernels.Kernels, rows: int,
                                                             out_features: int, in_features: int, group: int) -> None:
    gen = torch.Generator().manual_seed(rows * 7 + out_features)
    q = torch.randint(0, 16, (out_features, in_features), generator=gen)
    scales_zeros = (torch.randn(out_features, in_features // group, 2, generator=gen) / 50).bfloat16()
    x = torch.randn(rows, in_features, generator=gen)
    got = kernels.int4_linear(x, cpu_kernels.pack_int4_blocks(q), scales_zeros, group)
    # x as the kernel rounds it: int8 per group, scale amax / 127
    xg = x.double().view(rows, -1, group)
    sx = xg.abs().amax(dim=2, keepdim=True) / 127
    xq = torch.round(xg / sx).clamp(-127, 127) * sx
    sz = scales_zeros.double()
    w = (q.double().view(out_features, -1, group) * sz[..., :1] + sz[..., 1:]).view(out_features, in_features)
    want = xq.view(rows, in_features) @ w.t() - (xq.sum(2) - xg.sum(2)) @ sz[..., 1].t()  # zeros use the exact x
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 9])
@pytest.mark.parametrize(("out_features", "in_features", "group"), [(16, 128, 128), (80, 640, 128), (48, 512, 256)])
def test_int4_gemm_equals_the_single_row_kernel(kernels: cpu_kernels.Kernels, rows: int, out_features: int,
                                                in_features: int, group: int) -> None:
    gen = torch.Generator().manual_seed(rows * 5 + out_features)
    q = torch.randint(0, 16, (out_features, in_features), generator=gen)
    scales_zeros = torch.stack([torch.rand(out_features, in_features // group, generator=gen) / 10,
                                -torch.rand(out_features, in_features // group, generator=gen)], dim=2).bfloat16()
    x = torch.randn(rows, in_features, generator=gen)
    want = kernels.int4_linear(x, cpu_kernels.pack_int4_blocks(q), scales_zeros.contiguous(), group)
    got = kernels.int4_gemm(x, cpu_kernels.pack_int4_batch(q), cpu_kernels.pack_by_16_outputs(scales_zeros[..., 0].float()),
                            cpu_kernels.pack_by_16_outputs(scales_zeros[..., 1].float()), group)
    assert got.shape == (rows, out_features)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)  # the same integer sums, fp32 rounding apart


def test_failed_build_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from torch.utils import cpp_extension

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.build() is None
    assert [r.getMessage() for r in caplog.records] == [
        "C++ kernels unavailable, using the torch paths: Ninja is required to load C++ extensions"]
