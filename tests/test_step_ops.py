"""``benchmarks/step_ops.py`` counts what the README's operation counts say: every decode step of a static
request issues the same operations, the stages add up to the step, and most of a static step is the integer
stages the engine compiles on a GPU (``engine/compiled_step.py``)."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("vllm")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
sys.path.insert(0, os.path.dirname(__file__))
import step_ops  # noqa: E402
from engine_helpers import build_tiny_checkpoint  # noqa: E402


def test_step_ops_by_stage(tmp_path):
    from vllm_s2d2.engine.stepper import S2D2Stepper
    step_fn = S2D2Stepper.__dict__["step_fn"]
    model = build_tiny_checkpoint(str(tmp_path / "sdar"), "sdar")
    static = step_ops.count_mode(model, *step_ops.MODES["static"], max_tokens=8)
    verify = step_ops.count_mode(model, *step_ops.MODES["verify"], max_tokens=8)
    for rec in (static, verify):
        assert rec["steps"] > 0 and sum(rec["by_stage"].values()) == rec["ops_per_step"]
    assert static["min"] == static["max"]  # one request, static remasking: the same step every time
    assert static["by_stage"]["prepare"] + static["by_stage"]["settle"] > static["by_stage"]["core"]
    # verification adds model math and its random numbers, not lifecycle bookkeeping
    assert verify["by_stage"]["settle"] == static["by_stage"]["settle"]
    assert verify["by_stage"]["core"] > static["by_stage"]["core"]
    assert verify["by_stage"]["prepare"] > static["by_stage"]["prepare"]
    assert S2D2Stepper.__dict__["step_fn"] is step_fn  # the counting wrapper is gone (later tests step for real)


def test_step_ops_refuses_unknown_modes(capsys):
    with pytest.raises(SystemExit) as e:
        step_ops.main(["--modes", "static,fast"])
    assert e.value.code == 2 and "--modes" in capsys.readouterr().err
