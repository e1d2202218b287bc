"""GPU: the canvas attention kernel and the backend's row dispatch compiled (the CPU suite runs the same
script under Triton's interpreter, ``tests/test_canvas_kernel.py``)."""

from __future__ import annotations

import os
import sys

import pytest

from gpu_skip import require_cuda

pytestmark = pytest.mark.gpu
torch = require_cuda()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_canvas_kernel import run_script  # noqa: E402


def test_canvas_kernel_compiled_equals_dense():
    env = dict(os.environ, TRITON_F32_DEFAULT="ieee")
    env.pop("TRITON_INTERPRET", None)
    result = run_script("cuda", env)
    assert result["problems"] == [] and result["dispatch"]
    assert result["worst"] < 1e-3
