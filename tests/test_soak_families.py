"""The family soaks (``tests/gpu/test_soak.py``, ``tests/gpu/soak_families.py``) on CPU: for the engine each soak
server builds, every policy ``benchmarks/soak.py`` sends resolves to a request config, and every bad input of the
option kind is refused with the text the soak looks for -- so a soak of a tiny Fast-dLLM v2 (block 8), LLaDA2 or
D2F checkpoint tests the server, not a plan that does not fit the engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests" / "gpu"))
import soak  # noqa: E402
from soak_families import D2F_S2D2, FAMILY_SOAKS  # noqa: E402

from vllm_s2d2.configs import load_family_info  # noqa: E402
from vllm_s2d2.engine.settings import request_config, resolve_engine_settings  # noqa: E402
from vllm_s2d2.testing import build_tiny_checkpoint  # noqa: E402

# the demo checkpoint's soak (SDAR, block 4, the server's default S2D2 settings) beside the family soaks, and
# D2F on its LLaDA base (not soaked on the GPU: the Dream base stands for D2F there)
SOAKS = {"sdar": {"block": 4, "speculative_config": {"method": "s2d2"}, "config": {}}, **FAMILY_SOAKS,
         "d2f_llada": {"block": 4, "speculative_config": D2F_S2D2, "config": {"d_model": 128}}}


def _engine(family: str, tmp_path):
    spec = SOAKS[family]
    path = build_tiny_checkpoint(family, tmp_path / family, small_vocab=True, dtype=torch.float32, seed=3,
                                 block_size=spec["block"], tokenizer=False, **spec["config"])
    info = load_family_info(path)
    assert (info.family, info.block_size) == (family, spec["block"])
    options = {k: v for k, v in spec["speculative_config"].items() if k != "method"}
    hf_config = json.loads((path / "config.json").read_text())  # family_info reads a mapping as vLLM's config
    return resolve_engine_settings(hf_config, options).config, info


@pytest.mark.parametrize("family", list(SOAKS))
def test_every_soak_policy_and_bad_option_fits_the_family_engine(family, tmp_path):
    engine, info = _engine(family, tmp_path)
    kept = soak.policies_for(family)
    assert "server_default" in kept and len(kept) >= 6, kept
    for name in soak.POLICIES:
        xargs = soak.POLICIES[name] or {}
        if name in kept:
            cfg = request_config(engine, xargs, info.family, info.block_size)  # raises on a plan the engine refuses
            assert cfg.block_size == engine.block_size, name
        else:  # left out only where the server would refuse it (no policy dropped without need)
            with pytest.raises(ValueError):
                request_config(engine, xargs, info.family, info.block_size)
    matrix = soak.bad_inputs(SOAKS[family]["block"])
    for name, (extra, needle) in matrix.items():
        if "vllm_xargs" not in extra:
            continue  # n, logprobs, length and max_tokens are refused before the S2D2 options are read
        with pytest.raises(ValueError) as err:
            request_config(engine, extra["vllm_xargs"], info.family, info.block_size)
        assert needle in str(err.value), (name, str(err.value))


def test_the_serve_tests_matrix_is_the_block_4_one():
    assert soak.bad_inputs() == soak.BAD_INPUTS == soak.bad_inputs(4)
    assert soak.bad_inputs(8)["block size vs engine"][0] == {"vllm_xargs": {"s2d2.block_size": 16}}
