"""Open GGUF files with the `gguf` package's reader, faster."""
from __future__ import annotations

import os
import threading
import types
from typing import Any

import numpy as np
from gguf import GGUFReader, gguf_reader

_lock = threading.Lock()


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """A GGUFReader over `path`; `reader.source_path` holds the path.

    NOTE: GGUFReader slices its np.memmap millions of times while parsing a large vocabulary
    (Gemma 3 has 262,144 tokens), and memmap's subclass hooks make that take ~11 s. The reader
    is given a plain ndarray view of the same mapping instead, which parses in ~3 s; only the
    reader module's name `np` is redirected, and only while the header is parsed.
    """
    plain = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    plain.memmap = _plain_memmap
    with _lock:
        original = gguf_reader.np
        gguf_reader.np = plain  # type: ignore[assignment]
        try:
            reader = GGUFReader(path)
        finally:
            gguf_reader.np = original  # type: ignore[attr-defined]
    reader.source_path = os.fspath(path)  # type: ignore[attr-defined]
    return reader


def _plain_memmap(path: Any, mode: str = "r", **kwargs: Any) -> np.ndarray:
    mapped: np.ndarray = np.memmap(path, mode=mode, **kwargs)  # type: ignore[call-overload]
    return mapped.view(np.ndarray)
