"""GPU: S2D2 verification inside vLLM 0.26 (Engine II) equals the reference decoder token for token.

One engine (PIECEWISE CUDA graphs on, fp32, ``TRITON_F32_DEFAULT=ieee`` as in ``test_engine_sdar.py``) serves
every job; policies differ *per request* through ``SamplingParams.extra_args["s2d2"]``, so each batch mixes
draft, 2L-verify and commit steps of requests with different policies.  Acceptance is random even with greedy
drafts, so requests are seeded; the counter-based RNG (``core.rng``) makes the engine and the reference draw
the same numbers, so equality is exact, sampled decoding included.

* I1 in the engine: always verify + greedy acceptance + ``cache_ver`` reproduces the reference's AR mode
  (block size 1) token for token, at batch 1 and 32 concurrent prompts.
* Every routing policy (score_threshold = paper Config-A, hysteresis, UCB, span length) and the baseline, mixed
  in one batch of 40 prompts of mixed lengths and ``max_tokens``; seeded sampling (temperature 1, top-k).
* Per-request statistics (``vllm_s2d2.request_stats``) of that batch equal the reference decoder's verify steps,
  proposed and accepted span tokens (for outputs ending on a block boundary: a request ending mid-block
  finishes in the engine as soon as its last token is final, the reference completes the block first).
"""

from __future__ import annotations

import os
import sys

import pytest

from gpu_records import write_record
from gpu_skip import require_cuda

pytestmark = pytest.mark.gpu
torch = require_cuda("vllm")

sys.path.insert(0, os.path.dirname(__file__))
from test_engine_sdar import (  # noqa: E402,F401
    _prompts, _sp, ckpts, compare, ref_models, reference, reference_output, run_engine)

POLICIES = [
    {},  # engine default: SDAR Config-A (score_threshold 0, difference_static, c = 1)
    {"verify_policy": "score_hysteresis", "score_type": "difference_dynamic"},
    {"verify_policy": "contextual_bandit_ucb"},
    {"verify_policy": "mask_span_length", "min_span_length": 2},
    {"verify_policy": "mask_span_length", "acceptance": "greedy"},
    {"verify": False},
]
ALWAYS_GREEDY = {"s2d2": {"verify_policy": "mask_span_length", "acceptance": "greedy"}}


def test_s2d2_engine_equals_reference(ckpts, ref_models, tmp_path):
    s2d2 = {"method": "s2d2"}
    i1_batch = {"name": "i1_batch", "mode": "batch", "prompts": _prompts(32, 31),
                "sampling": [_sp(1 + (5 * i) % 20, seed=i, extra=ALWAYS_GREEDY) for i in range(32)]}
    i1_single = {"name": "i1_single", "mode": "single", "prompts": _prompts(3, 32),
                 "sampling": [_sp(m, seed=0, extra=ALWAYS_GREEDY) for m in (13, 6, 19)]}
    mixed = {"name": "mixed", "mode": "batch", "prompts": _prompts(40, 33),
             "sampling": [_sp(1 + (7 * i) % 24, seed=1000 + i, extra={"s2d2": POLICIES[i % len(POLICIES)]})
                          for i in range(40)], "stats": True}
    sampled = {"name": "sampled", "mode": "batch", "prompts": _prompts(12, 34),
               "sampling": [_sp(12, temperature=1.0, top_k=20, seed=200 + i,
                                extra={"s2d2": POLICIES[i % 4]}) for i in range(12)]}
    spec = {"model": ckpts["sdar"], "speculative_config": s2d2, "enforce_eager": False,
            "jobs": [i1_batch, i1_single, mixed, sampled]}
    res = run_engine(spec, tmp_path, timeout=400)
    assert "PIECEWISE" in res["cudagraph_mode"], res["cudagraph_mode"]
    for job in (i1_batch, i1_single, mixed, sampled):
        compare(ref_models, "sdar", s2d2, job, res[job["name"]])
    # I1: the same outputs are the reference's AR mode (block size 1, token-causal KV)
    ar = {"method": "s2d2", "verify": False, "block_size": 1, "denoising_steps": 1}
    for job in (i1_batch, i1_single):
        for prompt, kw, o in zip(job["prompts"], job["sampling"], res[job["name"]]):
            kw_ar = {k: v for k, v in kw.items() if k != "extra_args"}
            assert o["token_ids"] == reference(ref_models, "sdar", ar, prompt, kw_ar)

    check_request_stats(ref_models, s2d2, mixed, res["mixed"])


def check_request_stats(ref_models, s2d2, job, outs) -> None:
    B = ref_models["sdar"][1].block_size
    compared = verified = 0
    for prompt, kw, o in zip(job["prompts"], job["sampling"], outs):
        st = o["s2d2_stats"]
        assert st is not None, "no per-request stats returned"
        assert st["accepted_tokens"] <= st["proposed_tokens"] and st["verify_steps"] <= st["draft_steps"]
        opts = kw["extra_args"]["s2d2"]
        if opts.get("verify") is False:
            assert st["verify_steps"] == 0
        verified += st["verify_steps"]
        if (len(prompt) + len(o["token_ids"])) % B or o["finish_reason"] != "length":
            continue
        ref = reference_output(ref_models, "sdar", s2d2, prompt, kw).stats
        assert (st["verify_steps"], st["proposed_tokens"], st["accepted_tokens"]) == (
            ref.verify_steps, ref.proposed_tokens, ref.accepted_tokens), (opts, st, ref)
        compared += 1
    assert verified > 0 and compared >= 3, (verified, compared)


N_STAT = 200
ACC_TOL = 0.02  # absolute tolerance on the aggregate acceptance rate and tokens per forward


def test_stochastic_acceptance_statistics_over_200_prompts(ckpts, ref_models, tmp_path):
    """Stochastic acceptance (temperature 1, min(1, q/p), residual resampling) over 200 seeded prompts: the
    engine's aggregate acceptance rate and tokens per forward lie within ``ACC_TOL`` of the reference decoder's
    (the counter-based RNG makes them equal request by request: that is checked and reported too).  Outputs end
    on a block boundary so that both decoders run the same steps (see ``check_request_stats``)."""
    B = ref_models["sdar"][1].block_size
    prompts = _prompts(N_STAT, 35)
    pols = [{"verify_policy": "mask_span_length"}, {}]  # always verify / Config-A
    sampling = [_sp((B - len(p) % B) % B + 3 * B, temperature=1.0, seed=5000 + i, extra={"s2d2": pols[i % 2]})
                for i, p in enumerate(prompts)]
    job = {"name": "stat", "mode": "batch", "prompts": prompts, "sampling": sampling, "stats": True}
    s2d2 = {"method": "s2d2"}
    res = run_engine({"model": ckpts["sdar"], "speculative_config": s2d2, "enforce_eager": False,
                      "max_num_seqs": 128, "jobs": [job]}, tmp_path, timeout=400)
    eng = {"tokens": 0, "forwards": 0, "proposed": 0, "accepted": 0}
    ref = dict(eng)
    same_tokens = same_counts = 0
    for prompt, kw, o in zip(prompts, sampling, res["stat"]):
        st = o["s2d2_stats"]
        r = reference_output(ref_models, "sdar", s2d2, prompt, kw)
        for acc, tokens, fwd, prop, accd in (
                (eng, len(o["token_ids"]), st["draft_steps"] + st["verify_steps"], st["proposed_tokens"],
                 st["accepted_tokens"]),
                (ref, len(r.token_ids), r.stats.draft_forwards + r.stats.verify_forwards, r.stats.proposed_tokens,
                 r.stats.accepted_tokens)):
            acc["tokens"] += tokens
            acc["forwards"] += fwd
            acc["proposed"] += prop
            acc["accepted"] += accd
        same_tokens += o["token_ids"] == r.token_ids
        same_counts += (st["verify_steps"], st["proposed_tokens"], st["accepted_tokens"]) == (
            r.stats.verify_steps, r.stats.proposed_tokens, r.stats.accepted_tokens)
    rate = {k: (v["accepted"] / max(1, v["proposed"]), v["tokens"] / max(1, v["forwards"]))
            for k, v in (("engine", eng), ("reference", ref))}
    print(f"S2D2 stochastic statistics over {N_STAT} prompts: engine acceptance {rate['engine'][0]:.4f}, "
          f"tokens/forward {rate['engine'][1]:.4f}; reference {rate['reference'][0]:.4f}, "
          f"{rate['reference'][1]:.4f}; identical outputs {same_tokens}/{N_STAT}, identical counters "
          f"{same_counts}/{N_STAT}; proposed {eng['proposed']} / {ref['proposed']}")
    # the record ($S2D2_GPU_LOG_DIR; on the device tool a folder under $OUT), with device, versions and commit
    write_record("s2d2_stochastic_200", "test_engine_s2d2.py::test_stochastic_acceptance_statistics_over_200_prompts",
                 {"prompts": N_STAT, "engine": eng, "reference": ref, "identical_outputs": same_tokens,
                  "identical_counters": same_counts, "acceptance_and_tokens_per_forward": rate,
                  "tolerance": ACC_TOL})
    assert eng["proposed"] > 200, eng  # verification really ran
    assert abs(rate["engine"][0] - rate["reference"][0]) <= ACC_TOL, rate
    assert abs(rate["engine"][1] - rate["reference"][1]) <= ACC_TOL, rate
