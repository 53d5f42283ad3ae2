"""Load a model from a GGUF file: hyper-parameters from its metadata, weights dequantized to fp32.

GGUF files follow llama.cpp's converter, which changes some tensors on the way in; the
changes are undone here so that every family keeps Hugging Face's layout:
- Llama q/k projections are permuted into GGML's interleaved rotary layout;
- Gemma norm weights are stored as (1 + w).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize
from tqdm import tqdm

from rillet.config import ModelConfig, RopeConfig

_ARCHS = {"gemma3": "gemma3", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_FFN_NORM = {True: "pre_feedforward_layernorm", False: "post_attention_layernorm"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader: GGUFReader) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; rillet runs {', '.join(_ARCHS)}")

    def get(key: str, default: Any = None) -> Any:
        return field(reader, f"{arch}.{key}", default)

    num_heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", hidden // num_heads)
    num_layers = get("block_count")
    names = {t.name for t in reader.tensors}
    rope = RopeConfig(theta=get("rope.freq_base", 10000.0))
    if get("rope.scaling.type") == "linear":
        rope = RopeConfig(theta=rope.theta, scaling_type="linear", factor=get("rope.scaling.factor", 1.0))
    if "rope_freqs.weight" in names:
        factors = _tensor(next(t for t in reader.tensors if t.name == "rope_freqs.weight"))
        rope = RopeConfig(theta=rope.theta, freq_factors=tuple(float(x) for x in factors))
    common = dict(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields
        else _shape(reader, "token_embd.weight")[0],
        hidden_size=hidden, intermediate_size=get("feed_forward_length"), num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=get("attention.head_count_kv", num_heads), head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6), max_position=get("context_length", 8192),
        rope=rope, tie_word_embeddings="output.weight" not in names)
    if arch == "gemma3":
        # NOTE: llama.cpp does not store Gemma 3's layer pattern, and older files lack the
        # local rotary base; both are fixed for the family (5 local : 1 global; base 10k).
        window = get("attention.sliding_window", 512)
        types = tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(num_layers))
        local = RopeConfig(theta=get("rope.freq_base_swa", 10000.0))
        return ModelConfig(family="gemma3", local_rope=local, sliding_window=window,
                           layer_types=types, qk_norm=True, **common)
    return ModelConfig(family=arch, attention_bias="blk.0.attn_q.bias" in names,
                       qk_norm="blk.0.attn_q_norm.weight" in names, **common)


def _shape(reader: GGUFReader, name: str) -> tuple[int, ...]:
    t = next(t for t in reader.tensors if t.name == name)
    return tuple(int(x) for x in reversed(t.shape))


def _tensor(t: Any) -> np.ndarray:
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        data = dequantize(t.data, t.tensor_type) if t.tensor_type == GGMLQuantizationType.BF16 else t.data
        return np.asarray(data, dtype=np.float32)
    return dequantize(t.data, t.tensor_type)


def _hf_name(name: str, family: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        layer, part, kind = m.groups()
        if part == "ffn_norm":  # the norm before the MLP has a different name per family
            return f"model.layers.{layer}.{_FFN_NORM[family == 'gemma3']}.{kind}"
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    base, _, kind = name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    # Undo llama.cpp's permute: rows (head, rot_half_pair, 2) -> (head, 2, rot_half_pair).
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_weights(reader: GGUFReader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Dequantized fp32 weights under Hugging Face names."""
    weights = {}
    for t in tqdm(reader.tensors, desc="Loading weights", unit="tensor", leave=False):
        name = _hf_name(t.name, cfg.family)
        if name is None:
            continue
        w = _tensor(t).reshape(tuple(int(x) for x in reversed(t.shape)))
        if cfg.family == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0
        if cfg.family == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = _unpermute(w, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        weights[name] = torch.from_numpy(w if w.flags.writeable else w.copy())
    return weights

