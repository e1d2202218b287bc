"""GPU: the canvas attention kernel compiled (the CPU suite runs it under Triton's interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpu_skip import require_cuda

pytestmark = pytest.mark.gpu
torch = require_cuda()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_canvas_kernel import CASES, SCRIPT  # noqa: E402


def test_canvas_kernel_compiled_equals_dense():
    env = dict(os.environ, TRITON_F32_DEFAULT="ieee")
    env.pop("TRITON_INTERPRET", None)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES), "cuda"], capture_output=True,
                          text=True, env=env, timeout=600, cwd=repo)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORST=")]
    assert line, proc.stderr[-4000:]
    assert float(line[0][6:]) < 1e-3
