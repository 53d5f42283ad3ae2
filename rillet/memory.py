"""Large tensors in memory of their own: zero until written, in 4 KiB pages."""
from __future__ import annotations

import math
import mmap

import torch


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose memory is committed as it is first written: the pages of a private
    anonymous mapping read as zero until then (torch.zeros writes every byte: ~1.5 s of each start
    for Gemma 3's 2 GiB KV cache, and all of it resident at once).

    NOTE: in 4 KiB pages, not huge pages: on the VM of docs/PERFORMANCE.md a fresh huge page took
    ~20x longer to fault in per byte (4.5 s a GiB against 0.2-1 s). The KV cache is first written
    while requests run, so a decode step of 32 streams paid for it every few steps as their blocks
    grew; a weight copied at load paid for it in the start time."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps `buf` alive


def resident_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` copied into memory of its own (see `lazy_zeros`)."""
    return lazy_zeros(tuple(t.shape), t.dtype).copy_(t)
