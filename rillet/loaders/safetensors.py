"""Load a model from a Hugging Face folder: config.json plus *.safetensors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from rillet.config import ModelConfig, RopeConfig

_FAMILIES = {"gemma3_text": "gemma3", "gemma3": "gemma3", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def read_config(model_dir: Path) -> ModelConfig:
    raw = json.loads((model_dir / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type == "gemma3" and "text_config" in raw:
        raw = {**raw["text_config"], "tie_word_embeddings": raw.get("tie_word_embeddings", True)}
    family = _FAMILIES.get(model_type or "")
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not supported; rillet runs {', '.join(sorted(_FAMILIES))}")
    heads = raw["num_attention_heads"]
    common: dict[str, Any] = dict(
        family=family, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"], num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), max_position=raw.get("max_position_embeddings", 8192))
    if family == "gemma3":
        return _gemma3(raw, common)
    return ModelConfig(rope=_rope(_rope_params(raw, None)), tie_word_embeddings=raw.get("tie_word_embeddings", False),
                       attention_bias=family == "qwen2" or raw.get("attention_bias", False),
                       qk_norm=family == "qwen3", **common)


def _gemma3(raw: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    n = common["num_layers"]
    pattern = raw.get("sliding_window_pattern", 6)
    layer_types = raw.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    glob = _rope_params(raw, "full_attention") or {"rope_theta": raw.get("rope_theta", 1e6)}
    local = _rope_params(raw, "sliding_attention") or {"rope_theta": raw.get("rope_local_base_freq", 1e4)}
    return ModelConfig(
        rope=_rope(glob), local_rope=_rope(local), sliding_window=raw.get("sliding_window", 512),
        layer_types=tuple("sliding" if t == "sliding_attention" else "full" for t in layer_types),
        tie_word_embeddings=raw.get("tie_word_embeddings", True), qk_norm=True,
        query_pre_attn_scalar=raw.get("query_pre_attn_scalar"), **common)


def _rope_params(raw: dict[str, Any], layer_type: str | None) -> dict[str, Any]:
    """Rotary settings under either transformers 5 (`rope_parameters`) or 4 (`rope_scaling`) names."""
    params = raw.get("rope_parameters")
    if params is not None:
        return dict(params.get(layer_type, {}) if layer_type else params)
    if layer_type is not None:
        return {}
    return {**(raw.get("rope_scaling") or {}), "rope_theta": raw.get("rope_theta", 10000.0)}


def _rope(p: dict[str, Any]) -> RopeConfig:
    kind = p.get("rope_type") or p.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rotary scaling {kind!r} is not supported")
    return RopeConfig(theta=p.get("rope_theta", 10000.0), scaling_type=kind, factor=p.get("factor", 1.0),
                      low_freq_factor=p.get("low_freq_factor", 1.0), high_freq_factor=p.get("high_freq_factor", 4.0),
                      original_max_position=p.get("original_max_position_embeddings", 8192))


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in tqdm(files, desc="Loading weights", unit="file", leave=False):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                weights[name.removeprefix("language_model.")] = f.get_tensor(name).float()
    return weights
