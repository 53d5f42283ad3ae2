"""Greedy agreement of the fast weight formats with the exact fp32 path, on a fixed prompt set.

    python -m rillet.bench.accuracy [--model PATH] [--max-tokens 64] [--formats ...]

For each format, every prompt is generated greedily and compared with fp32's output: the share
of prompts whose whole continuation is identical, and the mean share of tokens generated before
the first difference.
"""
from __future__ import annotations

import argparse
import json

from rillet.config import EngineConfig
from rillet.llm import LLM
from rillet.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
    "The three primary colors are", "import numpy as np\n\n# compute the mean of each row\n",
    "Q: What is the boiling point of water at sea level?\nA:", "Les trois couleurs du drapeau français sont",
    "The mitochondria is", "In 1969, the first humans", "A recipe for pancakes:\n1.",
    "SELECT name, COUNT(*) FROM users", "The quick brown fox", "Dear hiring manager,\n\n",
    "Photosynthesis converts", "The theory of relativity states that", "My favourite book is",
    "东京是日本的", "To install the package, run", "The stock market today", "Rivers flow toward",
]
# (dtype, decoder quantization, LM-head quantization, KV-cache dtype)
FORMATS = [("float32", "auto", "w8a8", "auto"), ("float32", "auto", "w8a8", "float32"),
           ("float32", "none", "w8a8", "auto"), ("float32", "none", "w8a8", "float32"),
           ("bfloat16", "none", "none", "auto"), ("bfloat16", "none", "w8a8", "auto"),
           ("float32", "int8", "w8a8", "auto"), ("float32", "w8a8", "w8a8", "auto")]


def generate(model: str | None, dtype: str, quantization: str, lm_head: str, max_tokens: int,
             kv_cache_dtype: str = "auto") -> list[list[int]]:
    llm = LLM(model, dtype=dtype, quantization=quantization, lm_head_quantization=lm_head,
              kv_cache_dtype=kv_cache_dtype, num_kv_tokens=32768)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    # One prompt at a time: "auto" switches weights by batch size, and a single stream is where it
    # uses the int8 ones (and the head its 4-bit screen); the other formats give the same either way.
    return [llm.generate(prompt, params)[0].token_ids for prompt in PROMPTS]


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    prefixes = []
    for a, b in zip(reference, other):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(n / len(a))
    return {"identical": sum(p == 1.0 for p in prefixes) / len(prefixes),
            "mean_prefix": sum(prefixes) / len(prefixes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file or HF folder (default: the embedded model)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--formats", default=None,
                        help="comma-separated dtype/decoder/head/kv quadruples, e.g. float32/auto/w8a8/auto "
                             "(default: all)")
    args = parser.parse_args()
    reference = generate(args.model, "float32", "none", "none", args.max_tokens, kv_cache_dtype="float32")
    results = {}
    formats = [tuple(f.split("/")) for f in args.formats.split(",")] if args.formats else FORMATS
    for dtype, quant, head, kv in formats:
        name = f"{dtype}/{quant}/{head}/{kv}"
        results[name] = r = agreement(reference, generate(args.model, dtype, quant, head, args.max_tokens, kv))
        print(f"{dtype:>9} layers {quant:>5} head {head:>5} kv {kv:>8}: identical {r['identical']:.0%} of prompts, "
              f"mean agreeing prefix {r['mean_prefix']:.0%} of {args.max_tokens} tokens", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
