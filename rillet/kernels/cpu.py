"""rillet's C++ CPU kernels, built on first use:

- `paged_attention.cpp`: decode attention read straight from the paged KV cache;
- `rms_norm.cpp`: RMS norm as one op instead of torch's five;
- `rope.cpp`: rotary embedding, after an optional per-head RMS norm, as one op instead of ~10;
- `int8_linear.cpp`: a few fp32 rows times int8 weights (packed once into 4 x 16 tiles) at
  close to the memory bandwidth;
- `gated_act.cpp`: the gated MLP's act(gate) * up as one op instead of three;
- `int4_linear.cpp`: approximate logits from 4-bit weights on VNNI (the LM head's screen), for a
  row or a batch of rows;
- `w8a8_linear.cpp`: batches of rows times int8 weights on VNNI, the rows rounded to int8 per
  group of 32 inputs on the fly.

Each has an AVX-512 path; `int8_linear` and `w8a8_linear` have AVX2 paths too (w8a8 without
VNNI: u8 x s8 pairs by vpmaddubsw with the sign trick, so no int16 sum saturates), and the
attention kernel widens float16 KV by F16C. On a CPU without VNNI the LM head screens with int8
logits at every batch size (`Int4Screen.supported`). What is left runs a portable scalar path.

The first start compiles them with `-O3 -march=native` into torch's extension cache
(~/.cache/torch_extensions by default, or $TORCH_EXTENSIONS_DIR), under a name that includes this
CPU's feature flags; later starts only load it. If the build fails, one warning is logged and
`load()` returns None, so callers keep their pure-torch paths.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from dataclasses import dataclass
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("paged_attention.cpp", "rms_norm.cpp", "rope.cpp",
                                                           "int8_linear.cpp", "gated_act.cpp",
                                                           "int4_linear.cpp", "w8a8_linear.cpp")]


class DecodeAttention(Protocol):
    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, first_blocks: torch.Tensor, q_pos: torch.Tensor,
                 window: int, scale: float) -> torch.Tensor:
        """q: [D, H, hd]; caches: [num_blocks, block_size, KVH, hd]; block_tables: [D, max_blocks] int64;
        first_blocks, q_pos: [D] int64; window: 0 for none -> [D, H, hd] in q's dtype."""
        ...


class RmsNorm(Protocol):
    def __call__(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [rows, dim] or [a, b, dim], last dim contiguous; scale: float32 [dim] -> x's shape, contiguous."""
        ...


class Rope(Protocol):
    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor,
                 eps: float) -> torch.Tensor:
        """x: [T, heads, dim], last dim contiguous; cos, sin: float32 [T, dim]; scale: float32 [dim] (the
        RMS norm's, applied first) or empty -> [T, heads, dim] contiguous, x's dtype."""
        ...


class Int8Linear(Protocol):
    def __call__(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x: float32 [rows, in] contiguous; packed: int8 [out, in] from pack_int8_tiles; scale: float32
        [out] -> x @ (q * scale).T, float32 [rows, out]. out must be a multiple of 4, in of 16."""
        ...


class GatedAct(Protocol):
    def __call__(self, gate_up: torch.Tensor, act: str) -> torch.Tensor:
        """gate_up: float32 [rows, 2 * width] contiguous, gate then up; act: "gelu_tanh" or "silu"
        -> act(gate) * up, float32 [rows, width]."""
        ...


class Int4Linear(Protocol):
    def __call__(self, x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
        """x: float32 [rows, in] contiguous; packed: uint8 [out, in / 2] from pack_int4_blocks; scales_zeros:
        bfloat16 [out, in / group, 2] -> approximately x @ W.T, float32 [rows, out] (x rounded to int8
        per group). group: a multiple of 128 dividing in."""
        ...


class Int4Gemm(Protocol):
    def __call__(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group: int) -> torch.Tensor:
        """x: float32 [rows, in] contiguous; packed: uint8 [out, in / 2] from pack_int4_batch; scales, zeros:
        float32 [out / 16, in / group, 16] (w = q * scale + zero) -> approximately x @ W.T, float32
        [rows, out] (x rounded to int8 per group). out a multiple of 16, group a multiple of 8 dividing in."""
        ...


def pack_int4_batch(q: torch.Tensor) -> torch.Tensor:
    """q in 0..15, [out, in] (out a multiple of 16, in of 8) -> int4_gemm's layout: per 16 outputs and 8
    inputs, 64 bytes; byte b holds output b / 4's input b % 4 (low nibble) and b % 4 + 4 (high nibble)."""
    out_features, in_features = q.shape
    blocks = q.to(torch.uint8).view(out_features // 16, 16, in_features // 8, 2, 4).permute(0, 2, 3, 1, 4)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).contiguous().view(out_features, in_features // 2)


def pack_by_16_outputs(t: torch.Tensor) -> torch.Tensor:
    """[out, groups] -> [out / 16, groups, 16]: per-group values in int4_gemm's layout."""
    return t.view(t.shape[0] // 16, 16, -1).transpose(1, 2).contiguous()


class W8A8Linear(Protocol):
    def __call__(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
        """x: float32 [rows, in] contiguous; packed: uint8 [out, in] from pack_w8a8; scale: float32 [out]
        -> approximately x @ (q * scale).T (x rounded to int8 per `group` inputs), float32 [rows, out].
        out must be a multiple of 16; group a multiple of 4 dividing in."""
        ...


def pack_w8a8(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] -> the w8a8_linear kernel's layout: q + 128 as uint8, [out / 16][in / 4][16][4]."""
    out_features, in_features = q.shape
    shifted = (q.to(torch.int16) + 128).to(torch.uint8)
    return shifted.view(out_features // 16, 16, in_features // 4, 4).permute(0, 2, 1, 3).contiguous().view(
        out_features, in_features)


def pack_int4_blocks(q: torch.Tensor) -> torch.Tensor:
    """q in 0..15, [out, in] (in a multiple of 128) -> the int4_linear kernel's layout: per 128 inputs,
    64 bytes with q[i] in the low and q[64 + i] in the high nibble of byte i."""
    blocks = q.to(torch.uint8).view(q.shape[0], -1, 2, 64)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.shape[0], q.shape[1] // 2)


def pack_int8_tiles(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] -> the int8_linear kernel's layout: tiles of 4 outputs x 16 inputs, row by row."""
    out_features, in_features = q.shape
    tiles = q.view(out_features // 4, 4, in_features // 16, 16).permute(0, 2, 1, 3)
    return tiles.contiguous().view(out_features, in_features)


@dataclass(frozen=True)
class Kernels:
    decode_attention: DecodeAttention
    rms_norm: RmsNorm
    rope: Rope
    int8_linear: Int8Linear
    gated_act: GatedAct
    int4_linear: Int4Linear
    w8a8_linear: W8A8Linear
    int4_gemm: Int4Gemm


_lock = threading.Lock()


def load() -> Kernels | None:
    """The compiled kernels, built or loaded once per process; None where they cannot be built."""
    with _lock:  # one build at a time, even when prefetch() is still compiling
        return _load_once()


@functools.cache
def _load_once() -> Kernels | None:
    return build()


def prefetch() -> None:
    """Start building the kernels in the background (the compiler runs while weights load)."""
    threading.Thread(target=load, name="rillet-kernel-build", daemon=True).start()


def build() -> Kernels | None:
    """Compile (or load from the extension cache) the kernels; None after one warning on failure."""
    try:
        from torch.utils import cpp_extension

        with _own_ninja_first():
            cpp_extension.load(
                name=f"rillet_cpu_kernels_{_cpu_tag()}",
                sources=[str(source) for source in _SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,  # registers torch.ops.rillet.*
            )
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back, never crash
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        logger.warning("C++ kernels unavailable, using the torch paths: %s", first_line)
        logger.debug("C++ kernel build failure", exc_info=True)
        return None
    ops = torch.ops.rillet
    return Kernels(decode_attention=ops.paged_decode_attention, rms_norm=ops.rms_norm, rope=ops.rope,
                   int8_linear=ops.int8_linear, gated_act=ops.gated_act,
                   int4_linear=ops.int4_linear, w8a8_linear=ops.w8a8_linear, int4_gemm=ops.int4_gemm)


@contextlib.contextmanager
def _own_ninja_first() -> Iterator[None]:
    """Put this environment's scripts folder (where pip put rillet's `ninja`) first on PATH for the build.

    Two ninja versions (a system one, and the environment's when it is activated) keep their build
    logs differently: each then finds the other's log "changed" and rebuilds everything (~50 s), so
    a server started with the environment activated and a script run without it would recompile
    in turn.
    """
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if not (Path(scripts) / "ninja").exists() or path.split(os.pathsep)[0] == scripts:
        yield
        return
    os.environ["PATH"] = scripts + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


@functools.cache
def _flags_line() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return next((line for line in cpuinfo.splitlines() if line.startswith("flags")), platform.processor())


def has_vnni() -> bool:
    """Whether the CPU multiplies u8 x s8 into int32 without saturating (AVX-512 VNNI or AVX-VNNI).

    Without it, int8 GEMMs that feed uint8 activations (oneDNN's u8s8) sum pairs of products in
    int16 and saturate: a product of two int8 matrices can then be far off.
    """
    flags = set(_flags_line().split())
    return bool(flags & {"avx512_vnni", "avx_vnni"})


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags, so a shared extension cache never hands a
    -march=native build to a CPU that lacks its instructions."""
    return hashlib.sha256(f"{platform.machine()} {_flags_line()}".encode()).hexdigest()[:10]
