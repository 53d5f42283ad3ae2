"""The derived weight formats (int8 and 4-bit copies, in the kernels' packed layouts) saved after the
first start and loaded at the next, instead of computed again (~4 s of each start for Gemma 3).

`weight_formats` asks for each derived tensor group through `derived(name, make)`. Within one
`cached(...)` scope the n-th request of a name maps to the n-th entry of that name, so the
same model, formats and code ask for the same entries in the same order. The file's key covers
the model file(s), the formats, the dtype, torch's version and the source of every module that
decides a layout, so any change to them starts a new entry.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from rillet.loaders.weight_cache import load_resident
from rillet.paths import cache_root, mark_used, prune

logger = logging.getLogger(__name__)

_SOURCES = ("models/weight_formats.py", "kernels/cpu.py", "kernels/int4_linear.cpp", "kernels/int8_linear.cpp",
            "kernels/w8a8_linear.cpp")


class _Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved: dict[str, torch.Tensor] = {}
        if path.exists():
            try:
                self.saved = load_resident(path)
                mark_used(path)
            except Exception as e:  # a damaged file: compute again and replace it
                logger.warning("ignoring the cached weight formats in %s: %s", path, e)
        self.made: dict[str, torch.Tensor] = {}
        self.calls: collections.Counter[str] = collections.Counter()

    def get(self, name: str, make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        key = f"{name}.{self.calls[name]}"
        self.calls[name] += 1
        found = [self.saved[k] for k in _part_keys(key, self.saved)]
        if found:
            return tuple(found)
        parts = make()
        self.made.update({f"{key}.{i}": t.contiguous() for i, t in enumerate(parts)})
        return parts

    def save(self) -> None:
        """Best effort: a full disk or a read-only home only costs the next start its speed."""
        if not self.made:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # starts at once each write their own
            save_file({**self.saved, **self.made}, str(tmp))
            tmp.replace(self.path)
            prune(self.path.parent)
        except OSError as e:
            logger.warning("could not cache the weight formats in %s: %s", self.path, e)


def _part_keys(key: str, saved: dict[str, torch.Tensor]) -> list[str]:
    keys: list[str] = []
    while f"{key}.{len(keys)}" in saved:
        keys.append(f"{key}.{len(keys)}")
    return keys


_store: _Store | None = None


def entry_path(model_path: Path, *options: str) -> Path:
    files = sorted(model_path.glob("*.safetensors")) if model_path.is_dir() else [model_path]
    h = hashlib.sha256(f"{model_path.resolve()}:{options}:{torch.__version__}".encode())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    package = Path(__file__).resolve().parents[1]
    for source in _SOURCES:
        h.update((package / source).read_bytes())
    return cache_root() / "formats" / f"{h.hexdigest()[:24]}.safetensors"


@contextlib.contextmanager
def cached(path: Path | None) -> Iterator[None]:
    """Serve `derived` from the file at `path` (None: compute everything) and save what was new."""
    global _store
    store = _Store(path) if path is not None else None
    _store = store
    try:
        yield
    finally:
        _store = None
    if store is not None:
        store.save()


def derived(name: str, make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """`make()`'s tensors, from the cache when this entry is there."""
    return make() if _store is None else _store.get(name, make)
