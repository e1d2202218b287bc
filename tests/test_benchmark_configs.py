"""The benchmark's random-weight checkpoints (``benchmarks/offline_throughput.py``) are valid before any GPU time
is spent: each family's block-diffusion config resolves to an engine with that family's rules, and its AR twin
drops the block-diffusion keys."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import offline_throughput as bench  # noqa: E402

from vllm_s2d2.configs import family_info, register_hf_configs  # noqa: E402
from vllm_s2d2.engine.settings import resolve_engine_settings  # noqa: E402

FAMILY = {"sdar-1.7b": ("sdar", 4), "fast-1.5b": ("fast_dllm_v2", 32), "fast-7b": ("fast_dllm_v2", 32),
          "llada2-mini": ("llada2", 32)}


@pytest.mark.parametrize("name", sorted(bench.FAMILIES))
def test_benchmark_checkpoints(tmp_path, name):
    register_hf_configs()
    paths = bench.write_checkpoints(str(tmp_path), name)
    with open(os.path.join(paths["bd"], "config.json")) as f:
        bd = json.load(f)
    with open(os.path.join(paths["ar"], "config.json")) as f:
        ar = json.load(f)
    fam, block = FAMILY[name]
    info = family_info(bd)
    assert (info.family, info.block_size) == (fam, block)
    for mode in bench.modes_of(name).values():
        if mode["arch"] == "bd":
            cfg = resolve_engine_settings(bd, {k: v for k, v in mode["spec"].items() if k != "method"}).config
            assert cfg.block_size == mode["spec"].get("block_size", block)
    assert not {"block_size", "bd_size", "mask_token_id"} & set(ar)
    assert ar["architectures"][0] in ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "BailingMoeV2ForCausalLM")
