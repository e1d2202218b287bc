"""Two GPUs: tensor parallel 2 gives the same tokens and per-request statistics as one GPU, for every family.

Each family's tiny checkpoint (heads, KV heads and experts divisible by 2) runs the same mixed jobs -- greedy and
seeded sampling, policies per request, FULL CUDA graphs on -- once with ``tensor_parallel_size=1`` and once with 2
(vLLM's own distributed executor).  S2D2's decisions depend only on the logits (all-gathered, the same on every
rank) and on counter-based random numbers keyed by each request's seed, so every rank must decide alike and the
outputs must be equal token for token; the statistics must count each request once, not once per rank.  Runs only
where two CUDA devices are visible (a kind such as ``nvidia-h100-x2``); the record goes to ``tp2.json``.
"""

from __future__ import annotations

import os
import sys

import pytest

from gpu_records import write_record
from gpu_skip import require_cuda

pytestmark = pytest.mark.gpu
torch = require_cuda("vllm")
if torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA devices", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
from test_engine_families import _mixed_job  # noqa: E402
from test_engine_sdar import run_engine  # noqa: E402

from vllm_s2d2.testing import build_tiny_checkpoint  # noqa: E402

# family -> (block size, widening so that head_dim >= 32 where the tiny recipe is narrower, policies per request)
CASES = {
    "sdar": (4, {}, [{}, {"verify": False}, {"verify_policy": "score_hysteresis"},
                     {"verify_policy": "contextual_bandit_ucb"}]),
    "sdar_moe": (4, {}, [{}, {"verify_policy": "mask_span_length"}]),
    "fast_dllm_v2": (8, {"hidden_size": 128}, [{}, {"verify": False}, {"verify_policy": "mask_span_length"}]),
    "llada2": (4, {}, [{}, {"verify": False}, {"editing_threshold": 0.5, "max_post_steps": 2}]),
    "d2f_llada": (4, {"d_model": 128}, [{}, {"verify": False}, {"verify_policy": "score_threshold"}]),
    "d2f_dream": (4, {"hidden_size": 128}, [{}, {"verify": False}, {"allow_resample": False}]),
}
RECORD: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _record():
    yield
    write_record("tp2", "tests/gpu/test_tp2.py", RECORD)


@pytest.mark.parametrize("family", list(CASES))
def test_tensor_parallel_2_equals_one_gpu(family, tmp_path):
    block, wide, policies = CASES[family]
    moe = {"moe": True} if family == "sdar_moe" else {}
    path = str(build_tiny_checkpoint("sdar" if moe else family, tmp_path / family, small_vocab=True,
                                     dtype=torch.float32, init_std=0.4, seed=3, block_size=block, tokenizer=False,
                                     **moe, **wide))
    s2d2 = {"method": "s2d2", "max_active_blocks": 3} if family.startswith("d2f") else {"method": "s2d2"}
    jobs = [_mixed_job("greedy", 91, policies, stats=True), _mixed_job("sampled", 92, policies, n=12,
                                                                         temperature=1.0, stats=True)]
    out = {}
    for tp in (1, 2):
        d = tmp_path / f"tp{tp}"
        d.mkdir()
        out[tp] = run_engine({"model": path, "speculative_config": s2d2, "enforce_eager": False, "jobs": jobs,
                              "llm_kwargs": {"tensor_parallel_size": tp}}, d, timeout=500)
    differing = []
    for job in jobs:
        for i, (a, b) in enumerate(zip(out[1][job["name"]], out[2][job["name"]])):
            if a["token_ids"] != b["token_ids"] or a.get("s2d2_stats") != b.get("s2d2_stats"):
                differing.append({"job": job["name"], "request": i, "tp1": a, "tp2": b})
    RECORD[family] = {"requests": sum(len(out[1][j["name"]]) for j in jobs), "differing": len(differing),
                      "examples": differing[:3]}
    assert not differing, differing[:3]
