"""The package type-checks."""
import subprocess
import sys
from pathlib import Path


def test_mypy_is_clean() -> None:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "mypy", "rillet", "--ignore-missing-imports"],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
