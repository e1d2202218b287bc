"""GPU: D2F (Dream and LLaDA-8B + a merged D2F LoRA) inside vLLM 0.26 equals the D2F reference decoder.

Tiny random merged checkpoints of both bases (``vllm_s2d2.testing.build_tiny_checkpoint``: Dream with Qwen2 names,
LLaDA with its OLMo names; widened so that head_dim is 32, which vLLM's Triton attention needs), block 4, a window
of 3 blocks.  Each engine runs in its own process (``engine_worker.py``: fp32, ``TRITON_F32_DEFAULT=ieee``) with
CUDA graphs for the model (the window step itself runs eagerly):

* mixed batches (prompts shorter than a block, one block, several; mixed ``max_tokens``; policies and D2F knobs
  per request), greedy and seeded sampling: token for token the reference's;
* the lossless mode (always verify, greedy acceptance, ``cache_ver``, ``decoded_token_threshold`` 1) equals AR
  mode (block size 1) of the same model;
* FULL graphs against eager (``test_engine_sdar.graphs_vs_eager``);
* ``vllm serve CKPT --speculative-config s2d2``: completions equal the reference, streaming gives the same tokens.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from gpu_env import serve_memory_args, worker_port
from gpu_records import write_record
from gpu_skip import require_cuda

pytestmark = pytest.mark.gpu
torch = require_cuda("vllm")

sys.path.insert(0, os.path.dirname(__file__))
from test_engine_families import _mixed_job, _prompts  # noqa: E402
from test_engine_sdar import _sp, compare, graph_jobs, graphs_vs_eager, reference_output, run_engine  # noqa: E402

from vllm_s2d2.configs import load_family_info  # noqa: E402
from vllm_s2d2.reference.models import ReferenceModel  # noqa: E402
from vllm_s2d2.testing import build_tiny_checkpoint  # noqa: E402

FAMILIES = ("d2f_llada", "d2f_dream")
B, A = 4, 3
S2D2 = {"method": "s2d2", "max_active_blocks": A, "block_add_threshold": 0.25}
WIDE = {"d2f_llada": {"d_model": 128}, "d2f_dream": {"hidden_size": 128}}
POLICIES = [{}, {"verify": False}, {"verify_policy": "score_threshold", "score_threshold": -1.0},
            {"verify_policy": "contextual_bandit_ucb"}, {"allow_resample": False, "accept_min_draft_confidence": 0.3},
            {"min_tokens_per_step": 2, "partial_accept_run": 2}]


def _checkpoint(fam: str, path, tokenizer: bool = False) -> str:
    return str(build_tiny_checkpoint(fam, path, small_vocab=True, dtype=torch.float32, init_std=0.4, seed=3,
                                     block_size=B, tokenizer=tokenizer, **WIDE[fam]))


@pytest.fixture(scope="module")
def d2f_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2f_ckpts")
    return {f: _checkpoint(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def d2f_models(d2f_ckpts):
    return {k: (ReferenceModel.load(p, device="cuda", dtype=torch.float32), load_family_info(p))
            for k, p in d2f_ckpts.items()}


@pytest.mark.parametrize("fam", FAMILIES)
def test_d2f_engine_equals_reference(fam, d2f_ckpts, d2f_models, tmp_path):
    greedy = _mixed_job("greedy", 81, POLICIES)
    sampled = _mixed_job("sampled", 82, POLICIES, n=12, temperature=1.0)
    res = run_engine({"model": d2f_ckpts[fam], "speculative_config": S2D2, "enforce_eager": False,
                      "jobs": [greedy, sampled]}, tmp_path, timeout=400)
    assert "FULL_AND_PIECEWISE" in res["cudagraph_mode"]
    for job in (greedy, sampled):
        compare(d2f_models, fam, S2D2, job, res[job["name"]])


@pytest.mark.parametrize("fam", FAMILIES)
def test_d2f_lossless_mode_equals_ar_mode(fam, d2f_ckpts, d2f_models, tmp_path):
    lossless = dict(S2D2, verify_policy="mask_span_length", min_span_length=1, acceptance="greedy", cache_ver=True,
                    decoded_token_threshold=1.0)
    ar = {"method": "s2d2", "block_size": 1, "verify": False, "cache_ver": True, "block_add_threshold": 1.0}
    job = {"name": "lossless", "mode": "batch", "prompts": _prompts(16, 83),
           "sampling": [_sp(1 + (5 * i) % 20, seed=i) for i in range(16)]}
    res = run_engine({"model": d2f_ckpts[fam], "speculative_config": lossless, "enforce_eager": False,
                      "jobs": [job]}, tmp_path, timeout=300)
    for prompt, kw, o in zip(job["prompts"], job["sampling"], res["lossless"]):
        assert o["token_ids"] == reference_output(d2f_models, fam, ar, prompt, kw).token_ids


@pytest.mark.parametrize("fam", FAMILIES)
def test_d2f_full_graphs_equal_eager(fam, d2f_ckpts, d2f_models, tmp_path, request):
    W = A * B * (1 if fam == "d2f_dream" else 2)
    jobs = graph_jobs(_prompts, W, POLICIES, 84, 400)
    graphs_vs_eager(d2f_ckpts[fam], S2D2, jobs, tmp_path, f"full_graphs_{fam}", request.node.nodeid,
                    refs=d2f_models, variant=fam)


@pytest.mark.parametrize("fam", FAMILIES)
def test_d2f_served_by_vllm_serve_with_s2d2(fam, tmp_path):
    """``vllm serve CKPT --speculative-config s2d2`` (window 3, per-request options through ``vllm_xargs``): greedy
    completions of token-id prompts equal the reference decoder's, and streaming gives the same tokens."""
    import openai

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks"))
    from serve_bench import start_server, stop_server

    path = _checkpoint(fam, tmp_path / fam, tokenizer=True)
    models = {fam: (ReferenceModel.load(path, device="cuda", dtype=torch.float32), load_family_info(path))}
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    port = worker_port(8051 + FAMILIES.index(fam))
    log_dir = os.environ.get("S2D2_GPU_LOG_DIR") or str(tmp_path)
    proc = start_server(path, json.dumps(S2D2), port, Path(log_dir) / f"serve_{fam}.log",
                        ["--dtype", "float32", "--max-model-len", "512", *serve_memory_args(0.3),
                         "--max-num-seqs", "16"])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        checked = []
        for i, (prompt, pol) in enumerate(zip(_prompts(6, 85), POLICIES)):
            kw = _sp(6 + 3 * i, seed=i, extra={"s2d2": pol})
            body = {"ignore_eos": True, "return_token_ids": True, "vllm_xargs": {"s2d2": json.dumps(pol)}}
            r = client.completions.create(model="bench", prompt=prompt, max_tokens=kw["max_tokens"],
                                          temperature=0.0, seed=kw["seed"], extra_body=body).model_dump()
            got = r["choices"][0]["token_ids"]
            assert got == reference_output(models, fam, S2D2, prompt, kw).token_ids, (i, pol)
            chunks = client.completions.create(model="bench", prompt=prompt, max_tokens=kw["max_tokens"],
                                               temperature=0.0, seed=kw["seed"], stream=True, extra_body=body)
            streamed = [t for c in chunks for ch in c.model_dump()["choices"] for t in (ch.get("token_ids") or [])]
            assert streamed == got, (i, pol)
            checked.append({"policy": pol, "tokens": got, "usage": r["usage"]})
        write_record(f"serve_{fam}", f"test_engine_d2f_gpu.py::test_d2f_served_by_vllm_serve_with_s2d2[{fam}]",
                     {"requests": checked})
    finally:
        stop_server(proc)
