"""A repacked copy of a GGUF model (config + dequantized weights as safetensors, q/k/v and gate/up
already stacked), so the second start skips GGUF parsing and dequantization. Keyed by the file's
path, size and mtime.

A start maps the file and copies out only what is read at every step (the embedding, the norms):
the decoder's weight matrices are read only when their derived formats (int8 copies, in
`format_cache`) are not cached yet. Copying all of it (1.07 GB for Gemma 3 270M) into fresh huge
pages took 1-6 s of each start. What is read while serving must not stay mapped: clean file pages
not touched for a while may be dropped (this VM's kernel pages out what was idle for 60 s) and
are then read from disk again in the middle of a step."""
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
from rillet.memory import resident_copy
from rillet.paths import cache_root, mark_used, prune

logger = logging.getLogger(__name__)

# Bump when the repacked layout changes.
_VERSION = 2


def entry_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = f"{_VERSION}:{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return cache_root() / "models" / hashlib.sha256(key.encode()).hexdigest()[:24]


def has_entry(gguf_path: Path) -> bool:
    return (entry_dir(gguf_path) / "done").exists()


def load(gguf_path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]] | None:
    if not has_entry(gguf_path):
        return None
    d = entry_dir(gguf_path)
    raw = json.loads((d / "config.json").read_text())
    mark_used(d)
    weights = load_file(str(d / "model.safetensors"))
    return config_from_dict(raw), {k: v if _decoder_matrix(k, v) else resident_copy(v) for k, v in weights.items()}


def _decoder_matrix(name: str, t: torch.Tensor) -> bool:
    return name.startswith("model.layers.") and t.dim() == 2


def load_resident(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, copied out of its memory mapping into memory of their own
    (`resident_copy`: 4 KiB pages, which a step reads as fast as huge pages: 106.7 against 107.1 ms
    at 32 streams, the formats' 471 MB swapped every 5 steps): mapped file pages may be dropped and
    read again, which made the first minute of serving measurably slower."""
    return {k: resident_copy(v) for k, v in load_file(str(path)).items()}


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

