"""A repacked copy of a GGUF model (config + dequantized weights as safetensors, q/k/v and gate/up
already stacked), so the second start skips GGUF parsing and dequantization. Keyed by the file's
path, size and mtime.

A start maps the file rather than copying it: the decoder's float weights are read only when
their derived formats (int8 copies, in `format_cache`) are not cached yet, and the embedding
only where rows are looked up. Copying all of it into fresh memory took 1-6 s of each start
(1.07 GB for Gemma 3 270M; fresh transparent huge pages are slow to come by on this VM)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rillet.config import ModelConfig, RopeConfig
from rillet.paths import cache_root, mark_used, prune

logger = logging.getLogger(__name__)

# Bump when the repacked layout changes.
_VERSION = 2


def entry_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = f"{_VERSION}:{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return cache_root() / "models" / hashlib.sha256(key.encode()).hexdigest()[:24]


def load(gguf_path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]] | None:
    d = entry_dir(gguf_path)
    if not (d / "done").exists():
        return None
    raw = json.loads((d / "config.json").read_text())
    mark_used(d)
    return config_from_dict(raw), load_file(str(d / "model.safetensors"))


def load_resident(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, copied out of its memory mapping into the process's own memory:
    mapped file pages are faulted in on first use, in 4 KiB pages, and may be dropped and faulted
    in again under memory pressure, which made the first minute of serving measurably slower."""
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def save(gguf_path: Path, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """Best effort: a full disk or a read-only home only costs the next start its speed."""
    d = entry_dir(gguf_path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        (d / "done").touch()
        prune(d.parent)
    except OSError as e:
        logger.warning("could not cache repacked weights in %s: %s", d, e)


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    def rope(r: dict[str, Any] | None) -> RopeConfig | None:
        if r is None:
            return None
        factors = r.get("freq_factors")
        return RopeConfig(**{**r, "freq_factors": tuple(factors) if factors else None})

    return ModelConfig(**{**raw, "rope": rope(raw["rope"]), "local_rope": rope(raw.get("local_rope")),
                          "layer_types": tuple(raw.get("layer_types", ()))})

