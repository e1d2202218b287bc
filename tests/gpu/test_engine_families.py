"""GPU: Fast-dLLM v2 and LLaDA2.x inside vLLM 0.26 (Engine III) equal the reference decoder token for token.

Tiny random checkpoints of the real formats (``vllm_s2d2.testing.build_tiny_checkpoint``: Qwen2 names with q/k/v
bias for Fast-dLLM v2, Bailing-MoE names with fused QKV, q/k norms, sigmoid-routed experts + shared expert and a
dense first layer for LLaDA2), small vocabulary, ``init_std`` 0.4 so that greedy decisions have clear margins.
Each engine runs in its own process (``engine_worker.py``: fp32, ``TRITON_F32_DEFAULT=ieee``), with CUDA graphs
(FULL_AND_PIECEWISE) and the decode-step graphs on, and serves mixed batches (prompts shorter than a block, one block,
several blocks; mixed ``max_tokens``; policies mixed per request through ``extra_args``).

* Fast-dLLM v2 (block 8 = two sub-blocks of 4): threshold baseline, Config-A (hysteresis), always-verify and UCB
  per request, seeded sampling; the shifted-model invariant: ``cache_ver`` + always verify + greedy acceptance
  equals plain causal greedy decoding of the model (computed here with the dense reference model).
* LLaDA2 (block 4): LLaDA2.0 threshold and S2D2, LLaDA2.1 editing (``editing_threshold``, ``max_post_steps``)
  with and without verification, seeded sampling; per-request statistics equal the reference's.
* FULL graphs against eager for both families (``test_engine_sdar.graphs_vs_eager``): same tokens, equal to the
  reference, every uniform step a FULL graph.
* ``vllm serve CKPT --speculative-config s2d2`` for both families: greedy completions with per-request options equal
  the reference, streaming gives the same tokens, the ``vllm:s2d2_*`` counters move.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from gpu_env import serve_memory_args, worker_port
from gpu_records import write_record
from gpu_skip import require_cuda

pytestmark = pytest.mark.gpu
torch = require_cuda("vllm")

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from engine_helpers import causal_greedy  # noqa: E402
from test_engine_sdar import (  # noqa: E402
    LENS, _sp, compare, graph_jobs, graphs_vs_eager, reference_output, run_engine)

from vllm_s2d2.configs import load_family_info  # noqa: E402
from vllm_s2d2.reference.models import ReferenceModel  # noqa: E402
from vllm_s2d2.testing import build_tiny_checkpoint  # noqa: E402

BLOCK = {"fast_dllm_v2": 8, "llada2": 4}


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 400, (LENS[i % len(LENS)],), generator=g).tolist() for i in range(n)]


def _checkpoint(fam: str, path, tokenizer: bool = False) -> str:
    # vLLM's Triton attention needs head_dim >= 32; the tiny Fast-dLLM v2 recipe (docs/families.md: hidden 64, 4 heads,
    # no head_dim field in Qwen2) gives 16, so that tiny model is twice as wide here.
    wide = {"hidden_size": 128} if fam == "fast_dllm_v2" else {}
    return str(build_tiny_checkpoint(fam, path, small_vocab=True, dtype=torch.float32, init_std=0.4, seed=3,
                                     block_size=BLOCK[fam], tokenizer=tokenizer, **wide))


@pytest.fixture(scope="module")
def fam_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam_ckpts")
    return {f: _checkpoint(f, root / f) for f in BLOCK}


@pytest.fixture(scope="module")
def fam_models(fam_ckpts):
    return {k: (ReferenceModel.load(p, device="cuda", dtype=torch.float32), load_family_info(p))
            for k, p in fam_ckpts.items()}


def _mixed_job(name, seed, policies, n=24, temperature=0.0, stats=False, align=0):
    """``n`` prompts of mixed lengths, mixed ``max_tokens``, policies cycled per request.  With ``align`` = B, every
    other request's ``max_tokens`` is raised so that prompt + output ends on a block boundary (``_check_stats``
    compares only those: the reference completes a block the engine may stop in the middle of)."""
    prompts = _prompts(n, seed)
    max_tokens = [1 + (7 * i) % 24 for i in range(n)]
    if align:
        max_tokens = [m + (-(len(p) + m) % align if i % 2 else 0)
                      for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    return {"name": name, "mode": "batch", "prompts": prompts, "stats": stats,
            "sampling": [_sp(m, temperature=temperature, top_k=20 if temperature else 0,
                             seed=seed * 100 + i, extra={"s2d2": policies[i % len(policies)]})
                         for i, m in enumerate(max_tokens)]}


def _check_stats(fam_models, fam, s2d2, job, outs):
    B = BLOCK[fam]
    checked = 0
    for prompt, kw, o in zip(job["prompts"], job["sampling"], outs):
        if (len(prompt) + len(o["token_ids"])) % B:  # ends mid-block: the reference completes the block first
            continue
        ref = reference_output(fam_models, fam, s2d2, prompt, kw).stats
        got = o["s2d2_stats"]
        assert (got["verify_steps"], got["proposed_tokens"], got["accepted_tokens"]) == (
            ref.verify_steps, ref.proposed_tokens, ref.accepted_tokens), (kw, got, ref)
        checked += 1
    assert checked > 0


FAST_POLICIES = [{}, {"verify": False}, {"verify_policy": "mask_span_length"},
                 {"verify_policy": "contextual_bandit_ucb"}, {"verify_policy": "mask_span_length",
                                                              "min_span_length": 2}]


def test_fast_dllm_v2_engine_equals_reference(fam_ckpts, fam_models, tmp_path):
    fam = "fast_dllm_v2"
    s2d2 = {"method": "s2d2"}  # family default: Config-A
    greedy = _mixed_job("greedy", 41, FAST_POLICIES, stats=True, align=BLOCK[fam])
    sampled = _mixed_job("sampled", 42, FAST_POLICIES, n=12, temperature=1.0)
    single = {"name": "single", "mode": "single", "prompts": _prompts(3, 43),
              "sampling": [_sp(m, seed=m) for m in (5, 17, 9)]}
    res = run_engine({"model": fam_ckpts[fam], "speculative_config": s2d2, "enforce_eager": False,
                      "jobs": [greedy, sampled, single]}, tmp_path, timeout=400)
    assert "FULL_AND_PIECEWISE" in res["cudagraph_mode"]
    for job in (greedy, sampled, single):
        compare(fam_models, fam, s2d2, job, res[job["name"]])
    _check_stats(fam_models, fam, s2d2, greedy, res["greedy"])


def test_fast_dllm_v2_always_verify_greedy_is_causal_greedy(fam_ckpts, fam_models, tmp_path):
    fam = "fast_dllm_v2"
    s2d2 = {"method": "s2d2", "cache_ver": True, "verify_policy": "mask_span_length", "acceptance": "greedy"}
    job = {"name": "i1", "mode": "batch", "prompts": _prompts(16, 44),
           "sampling": [_sp(1 + (5 * i) % 20, seed=i) for i in range(16)], "stats": True}
    res = run_engine({"model": fam_ckpts[fam], "speculative_config": s2d2, "enforce_eager": False, "jobs": [job]},
                     tmp_path, timeout=300)
    model, info = fam_models[fam]
    for prompt, o in zip(job["prompts"], res["i1"]):
        assert o["token_ids"] == causal_greedy(model, info.mask_token_id, prompt, len(o["token_ids"]))
    assert sum(o["s2d2_stats"]["accepted_tokens"] for o in res["i1"]) > 0


EDIT = {"editing_threshold": 0.5, "max_post_steps": 2}
LLADA_POLICIES = [{}, {"verify": False}, dict(EDIT, verify=False, confidence_threshold=0.7),
                  dict(EDIT, verify_policy="mask_span_length", confidence_threshold=0.7),
                  dict(EDIT, verify_policy="score_hysteresis", score_type="difference_dynamic")]


def test_llada2_engine_equals_reference(fam_ckpts, fam_models, tmp_path):
    fam = "llada2"
    s2d2 = {"method": "s2d2"}  # family default: LLaDA2.1 "conservative" routing, no editing unless asked
    greedy = _mixed_job("greedy", 51, LLADA_POLICIES, stats=True)
    sampled = _mixed_job("sampled", 52, LLADA_POLICIES, n=12, temperature=1.0)
    res = run_engine({"model": fam_ckpts[fam], "speculative_config": s2d2, "enforce_eager": False,
                      "jobs": [greedy, sampled]}, tmp_path, timeout=400)
    assert "FULL_AND_PIECEWISE" in res["cudagraph_mode"]
    for job in (greedy, sampled):
        compare(fam_models, fam, s2d2, job, res[job["name"]])
    _check_stats(fam_models, fam, s2d2, greedy, res["greedy"])


@pytest.mark.parametrize("fam", list(BLOCK))
def test_family_full_graphs_equal_eager(fam, fam_ckpts, fam_models, tmp_path, request):
    policies = {"fast_dllm_v2": FAST_POLICIES, "llada2": LLADA_POLICIES}[fam]
    jobs = graph_jobs(_prompts, 2 * BLOCK[fam], policies, 71, 400)
    graphs_vs_eager(fam_ckpts[fam], {"method": "s2d2"}, jobs, tmp_path, f"full_graphs_{fam}", request.node.nodeid,
                    refs=fam_models, variant=fam)


# -- vllm serve ---------------------------------------------------------------------------------------------
SERVE_POLICIES = {"fast_dllm_v2": [{}, {"verify": False}, {"verify_policy": "mask_span_length"}],
                  "llada2": [{}, dict(EDIT, verify_policy="mask_span_length", confidence_threshold=0.7),
                             dict(EDIT, verify=False)]}


@pytest.mark.parametrize("fam", list(BLOCK))
def test_family_served_by_vllm_serve_with_s2d2(fam, tmp_path):
    """``vllm serve CKPT --speculative-config s2d2`` for each family (tiny checkpoint with its synthetic byte
    tokenizer): greedy completions of token-id prompts with per-request options (``vllm_xargs``) equal the
    reference decoder's tokens (``return_token_ids``), streaming gives the same tokens, and the ``vllm:s2d2_*``
    counters move."""
    import openai

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks"))
    from serve_bench import s2d2_counters, start_server, stop_server

    path = _checkpoint(fam, tmp_path / fam, tokenizer=True)
    models = {fam: (ReferenceModel.load(path, device="cuda", dtype=torch.float32), load_family_info(path))}
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # fp32 attention, as the reference (inherited)
    port = worker_port(8031 + list(BLOCK).index(fam))
    log_dir = os.environ.get("S2D2_GPU_LOG_DIR") or str(tmp_path)
    proc = start_server(path, "s2d2", port, Path(log_dir) / f"serve_{fam}.log",
                        ["--dtype", "float32", "--max-model-len", "512", *serve_memory_args(0.3),
                         "--max-num-seqs", "16"])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        before = s2d2_counters(port)
        checked = []
        for i, (prompt, pol) in enumerate(zip(_prompts(6, 61), SERVE_POLICIES[fam] * 2)):
            kw = _sp(6 + 3 * i, seed=i, extra={"s2d2": pol})
            body = {"ignore_eos": True, "return_token_ids": True, "vllm_xargs": {"s2d2": json.dumps(pol)}}
            r = client.completions.create(model="bench", prompt=prompt, max_tokens=kw["max_tokens"],
                                          temperature=0.0, seed=kw["seed"], extra_body=body).model_dump()
            got = r["choices"][0]["token_ids"]
            assert got == reference_output(models, fam, {"method": "s2d2"}, prompt, kw).token_ids, (i, pol)
            chunks = client.completions.create(model="bench", prompt=prompt, max_tokens=kw["max_tokens"],
                                               temperature=0.0, seed=kw["seed"], stream=True, extra_body=body)
            streamed = [t for c in chunks for ch in c.model_dump()["choices"] for t in (ch.get("token_ids") or [])]
            assert streamed == got, (i, pol)  # (random byte tokens: compare ids, not partial UTF-8 text)
            checked.append({"policy": pol, "tokens": got, "usage": r["usage"]})
        time.sleep(2.5)  # the counters follow at vLLM's stats interval (1 s for these servers)
        after = s2d2_counters(port)
        assert after["draft_steps"] > before.get("draft_steps", 0) and after["verify_steps"] > before.get(
            "verify_steps", 0), (before, after)
        write_record(f"serve_{fam}", f"test_engine_families.py::test_family_served_by_vllm_serve_with_s2d2[{fam}]",
                     {"requests": checked, "s2d2_counters": [before, after]})
    finally:
        stop_server(proc)
