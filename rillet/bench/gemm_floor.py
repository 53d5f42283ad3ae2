"""The matmul floor of one decode step: only the GEMMs of the embedded model, per weight format.

    python -m rillet.bench.gemm_floor [--rows 1 32]

For each batch size (rows) and format, times every linear layer of Gemma 3 270M at its real shape
(18 x [q|k|v 640->1536, o 1024->640, gate|up 640->4096, down 2048->640]) and the 262,144 x 640 LM
head, with random weights, and prints the step time and the tokens/s it would allow if nothing but
these GEMMs ran ("default" is the engine's default: fp32 blocks, int8-screened LM head). The
engine's own step time (attention, norms, sampling, Python) comes on top.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from rillet.models.weight_formats import InputMajorLinear, Int8Linear, PackedLinear, RescoredHead, W8A8Linear

LAYER_SHAPES = [(640, 1536), (1024, 640), (640, 4096), (2048, 640)]  # (in, out)
NUM_LAYERS = 18
HEAD = (640, 262144)


def _linear(fmt: str, in_f: int, out_f: int, head: bool) -> nn.Module:
    lin = nn.Linear(in_f, out_f, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    lin.requires_grad_(False)
    if fmt == "fp32":
        return lin if head else InputMajorLinear(lin)
    if fmt == "bf16-packed":
        return PackedLinear(lin.to(torch.bfloat16))
    if fmt == "int8":
        return Int8Linear(lin.to(torch.bfloat16))
    return RescoredHead(lin) if head else W8A8Linear(lin)


def _time(mods: list[tuple[nn.Module, int]], x_by_in: dict[int, torch.Tensor], repeats: int) -> float:
    """Seconds for one pass over `mods` (module, input width), averaged over `repeats`."""
    with torch.inference_mode():
        for _ in range(2):
            for m, in_f in mods:
                m(x_by_in[in_f])
        start = time.perf_counter()
        for _ in range(repeats):
            for m, in_f in mods:
                m(x_by_in[in_f])
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'rows':>4} {'format':>12} {'layers ms':>10} {'LM head ms':>11} {'step ms':>8} {'tok/s bound':>12}")
    for rows in args.rows:
        for fmt in ("fp32", "default", "bf16-packed", "int8", "w8a8"):
            dtype = torch.bfloat16 if fmt in ("bf16-packed", "int8") else torch.float32
            layer_fmt = "fp32" if fmt == "default" else fmt
            layer_mods = [(_linear(layer_fmt, i, o, False), i) for i, o in LAYER_SHAPES]
            head_fmt = "w8a8" if fmt in ("default", "int8", "w8a8") else fmt
            head = [(_linear(head_fmt, *HEAD, head=True), HEAD[0])]
            xs = {i: torch.randn(rows, i, dtype=dtype) for i in (640, 1024, 2048)}
            head_x = {640: xs[640] if head_fmt != "w8a8" else xs[640].float()}
            layers_s = _time(layer_mods, xs, args.repeats * 4) * NUM_LAYERS
            head_s = _time(head, head_x, args.repeats)
            step = layers_s + head_s
            print(f"{rows:>4} {fmt:>12} {layers_s * 1e3:>10.1f} {head_s * 1e3:>11.1f} {step * 1e3:>8.1f} "
                  f"{rows / step:>12.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
