"""Unit tests of the pure-Python core. With RILLET_NO_TORCH=1, torch cannot be imported."""
import os
import sys

if os.environ.get("RILLET_NO_TORCH") == "1":
    sys.modules["torch"] = None  # type: ignore[assignment]
