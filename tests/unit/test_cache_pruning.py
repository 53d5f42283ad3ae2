"""Cache folders keep their most recently used entries only."""
from __future__ import annotations

import os
from pathlib import Path

from rillet.paths import mark_used, prune


def _entries(folder: Path, count: int) -> list[Path]:
    made = []
    for i in range(count):  # entry i last used at t = 1000 + i
        entry = folder / f"e{i}"
        if i % 2:
            entry.mkdir()
            (entry / "model.safetensors").write_bytes(b"x")
        else:
            entry.write_bytes(b"x")
        os.utime(entry, (1000 + i, 1000 + i))
        made.append(entry)
    return made


def test_prune_keeps_the_most_recently_used_entries(tmp_path: Path) -> None:
    entries = _entries(tmp_path, 6)
    writing = tmp_path / "e9.1234.tmp"  # another process is still writing it
    writing.write_bytes(b"x")
    os.utime(writing, (1, 1))
    mark_used(entries[0])  # the oldest, used again now
    prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0", "e4", "e5", "e9.1234.tmp"]


def test_prune_of_a_missing_folder_does_nothing(tmp_path: Path) -> None:
    prune(tmp_path / "absent", keep=1)
    assert not (tmp_path / "absent").exists()
