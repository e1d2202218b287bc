"""The skip every GPU test module starts with (``from gpu_skip import require_cuda``; pytest puts this folder on
``sys.path`` for the modules in it)."""

from __future__ import annotations

import pytest


def require_cuda(*modules: str):
    """Skip the calling module at collection unless torch sees a CUDA GPU and ``modules`` import; returns torch."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA", allow_module_level=True)
    for name in modules:
        pytest.importorskip(name)
    return torch
