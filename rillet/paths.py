"""Where rillet keeps derived artifacts (converted tokenizers, repacked weights)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$RILLET_CACHE_DIR, else $XDG_CACHE_HOME/rillet, else ~/.cache/rillet."""
    root = os.environ.get("RILLET_CACHE_DIR")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rillet"
