"""The scheduler, block manager and prefix cache must not need torch."""
import os
import subprocess
import sys
from pathlib import Path


def test_unit_tests_pass_without_torch() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RILLET_NO_TORCH": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"],
                          cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
