"""Where rillet keeps derived artifacts (converted tokenizers, repacked weights)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

# Entries kept in each cache folder (repacked models, derived weight formats): a model's entry is
# replaced whenever the file, the options or rillet's kernels change, so old ones are dropped.
KEEP_ENTRIES = 8


def cache_root() -> Path:
    """$RILLET_CACHE_DIR, else $XDG_CACHE_HOME/rillet, else ~/.cache/rillet."""
    root = os.environ.get("RILLET_CACHE_DIR")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rillet"


def mark_used(entry: Path) -> None:
    """Note that a cache entry was just used (its mtime orders `prune`)."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def prune(folder: Path, keep: int = KEEP_ENTRIES) -> None:
    """Delete all but the `keep` most recently used entries of a cache folder (best effort).

    Files still being written (`*.tmp`) are left alone; an entry another process has mapped stays
    readable by it after the delete."""
    with contextlib.suppress(OSError):
        entries = sorted((p for p in folder.iterdir() if not p.name.endswith(".tmp")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[keep:]:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
