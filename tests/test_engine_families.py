"""Engine III on CPU: Fast-dLLM v2 and LLaDA2.x through the engine's real sampler / stepper / attention ranges,
against the reference decoder (the emulation of ``tests/engine_emulator.py``, as for SDAR in
``test_engine_emulation.py``).

* Fast-dLLM v2 (shift-aligned): sub-block decoding inside the block, logits read one row back, the first token of
  a block from the previous forward's last logit (the prefill's, then each commit's), causal verification.
  Invariant: with token-causal committed KV (``cache_ver``), always-verify + greedy acceptance + greedy drafts is
  plain causal greedy decoding of the model, computed here directly.
* LLaDA2.x (position-aligned, 2L verification): one token per step + threshold, LLaDA2.1 token editing during
  and after the block (``editing_threshold``, ``max_post_steps``), with and without verification.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("vllm")

sys.path.insert(0, os.path.dirname(__file__))
from engine_emulator import sampling_params  # noqa: E402
from engine_helpers import causal_greedy  # noqa: E402
from test_engine_emulation import MAX_TOKENS, PROMPT_LENS, check, emulate, reference_output  # noqa: E402

from vllm_s2d2.configs import load_family_info  # noqa: E402
from vllm_s2d2.core.sampling import exclude_token  # noqa: E402
from vllm_s2d2.reference.models import ReferenceModel  # noqa: E402
from vllm_s2d2.testing import build_tiny_checkpoint  # noqa: E402


def _family(tmp_path_factory, family: str, block_size: int):
    # init_std 0.4: peaked distributions (threshold rules commit several tokens, greedy has clear margins) and
    # outputs that depend on the context (position bugs show)
    path = build_tiny_checkpoint(family, tmp_path_factory.mktemp(family), small_vocab=True, dtype=torch.float32,
                                 init_std=0.4, seed=3, block_size=block_size, tokenizer=False)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 400, (n,), generator=g).tolist() for n in PROMPT_LENS]
    return ReferenceModel.load(str(path)), load_family_info(str(path)), hf, prompts


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    return _family(tmp_path_factory, "fast_dllm_v2", 8)  # block 8 = two sub-blocks of 4 (Config-A)


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return _family(tmp_path_factory, "llada2", 4)


def greedy(seed=None):
    return [sampling_params(max_tokens=m, seed=seed) for m in MAX_TOKENS]


def seeded(base=0, **kw):
    return [sampling_params(max_tokens=m, temperature=1.0, seed=base + i, **kw) for i, m in enumerate(MAX_TOKENS)]


# -- Fast-dLLM v2 -------------------------------------------------------------------------------------------
FAST_CASES = {
    "threshold": {"verify": False},
    "threshold-0.5": {"verify": False, "confidence_threshold": 0.5},
    "config-a": {},  # family default = Config-A (hysteresis, difference_dynamic)
    "always": {"verify_policy": "mask_span_length"},
    "ucb": {"verify_policy": "contextual_bandit_ucb"},
    "sub-8": {"verify_policy": "mask_span_length", "min_span_length": 2, "sub_block_size": 8},
}


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_fast_dllm_greedy_matches_reference(fast, case):
    _, emu = check(fast, FAST_CASES[case], greedy(seed=5))
    if FAST_CASES[case].get("verify", True) and case != "config-a":
        assert emu.verify_forwards > 0


def test_fast_dllm_sampled_mixed_policies_and_truncation(fast):
    policies = [{"verify_policy": "mask_span_length"}, {"verify": False}, {"verify_policy": "score_hysteresis"},
                {"verify_policy": "contextual_bandit_ucb"}, {"acceptance": "greedy"}, {}]
    sps = [sampling_params(max_tokens=m, temperature=1.0, top_k=20, seed=30 + i, extra_args={"s2d2": pol})
           for i, (m, pol) in enumerate(zip(MAX_TOKENS, policies))]
    _, emu = check(fast, {}, sps)
    assert emu.verify_forwards > 0
    check(fast, {}, sps, budget=21)  # chunked prefill (first token from the last chunk) and cut canvases (W = 16)
    check(fast, {}, sps, static=True)  # the CUDA-graph step path


def test_fast_dllm_first_token_of_each_block_comes_from_the_previous_forward(fast):
    """The token after the prompt is the argmax of the prefill's last logit, whatever the config; requests of
    one token therefore finish without any decision of the sampler."""
    model, info, _, prompts = fast
    reqs, _ = emulate(fast, {"verify": False}, [sampling_params(max_tokens=1) for _ in prompts])
    for r in reqs:
        n = len(r.prompt)
        from vllm_s2d2.core import masks

        vis = masks.committed_kv(n, info.block_size, False, n)
        logits = model.logits(torch.tensor(r.prompt), torch.arange(n), vis)[-1:]
        assert r.output == [int(exclude_token(logits, info.mask_token_id).argmax())]


@pytest.mark.parametrize("cfg", [{"verify_policy": "mask_span_length"}, {}, {"verify": False}])
def test_fast_dllm_prompt_one_short_of_a_block(fast, cfg):
    """A prompt of k*B - 1 tokens: its block is full once the prefill's last logit gave the next token, so the
    block is committed at once -- no draft step (found on the GPU: a draft there also advanced the request's
    random-number counter, and stochastic acceptance then differed from the reference)."""
    model, info, hf, _ = fast
    B = info.block_size
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (B - 1, 2 * B - 1, 3 * B - 1, B, 1, 2)]
    # outputs that end on a block boundary (the reference completes a block the engine may leave early), and
    # one request of a single token
    sps = [sampling_params(max_tokens=1 if i == 1 else (B - len(p) % B) % B + B, seed=70 + i)
           for i, p in enumerate(prompts)]
    reqs, _ = check((model, info, hf, prompts), cfg, sps)
    for r in reqs[:1] + reqs[2:]:
        ref = reference_output(fast, cfg, r.prompt, r.sampling)
        assert (r.stats["draft_steps"], r.stats["verify_steps"], r.stats["accepted_tokens"]) == (
            ref.stats.draft_forwards, ref.stats.verify_steps, ref.stats.accepted_tokens), (len(r.prompt), r.stats)


def test_fast_dllm_always_verify_greedy_is_causal_greedy_decoding(fast):
    """Shifted-model invariant: token-causal committed KV + always verify + greedy acceptance + greedy drafts
    commits exactly the causal (AR) greedy continuation, in the engine and in the reference decoder."""
    model, info, _, _ = fast
    cfg = {"verify_policy": "mask_span_length", "acceptance": "greedy", "cache_ver": True}
    reqs, emu = check(fast, cfg, greedy())
    for r in reqs:
        assert r.output == causal_greedy(model, info.mask_token_id, r.prompt, len(r.output))
    t = emu.stepper.host_totals()
    assert t["verify_steps"] > 0 and t["accepted_tokens"] > 0


def test_fast_dllm_preemption_and_statistics(fast):
    B = fast[1].block_size
    sps = [sampling_params(max_tokens=(B - n % B) % B + 2 * B, seed=40 + i)
           for i, n in enumerate(PROMPT_LENS)]
    cfg = {"verify_policy": "mask_span_length"}
    reqs, _ = emulate(fast, cfg, sps)
    for r in reqs:
        ref = reference_output(fast, cfg, r.prompt, r.sampling)
        assert r.output == ref.token_ids
        assert (r.stats["verify_steps"], r.stats["proposed_tokens"], r.stats["accepted_tokens"]) == (
            ref.stats.verify_steps, ref.stats.proposed_tokens, ref.stats.accepted_tokens)
    # preempted mid-block (vLLM re-prefills prompt + outputs; the snapshot continues the block, its first token
    # included): exact without verification; a verification interrupted by preemption redraws its draft
    check(fast, {"verify": False}, seeded(50), preempt=({3, 7}, (1, 5)))
    reqs, _ = emulate(fast, cfg, seeded(50), preempt=({3, 7}, (1, 5)))
    assert [len(r.output) for r in reqs] == list(MAX_TOKENS)


# -- LLaDA2.x -----------------------------------------------------------------------------------------------
EDIT = {"editing_threshold": 0.5, "max_post_steps": 2}
LLADA_CASES = {
    "2.0-threshold": {"verify": False},
    "2.0-s2d2": {"verify_policy": "score_threshold", "score_threshold": 0.0},
    "2.1-editing": dict(EDIT, verify=False, confidence_threshold=0.7),
    "2.1-editing-s2d2": dict(EDIT, verify_policy="mask_span_length", confidence_threshold=0.7),
    "2.1-hysteresis": dict(EDIT, verify_policy="score_hysteresis", score_type="difference_dynamic"),
    "2.1-post-only": {"editing_threshold": 0.3, "max_post_steps": 3, "verify": False,
                      "confidence_threshold": 0.99},
}


@pytest.mark.parametrize("case", list(LLADA_CASES))
def test_llada2_greedy_matches_reference(llada, case):
    check(llada, LLADA_CASES[case], greedy(seed=9))


def test_llada2_editing_sampled_and_static_path(llada):
    cfg = dict(EDIT, verify_policy="mask_span_length", confidence_threshold=0.7)
    sps = seeded(60)
    reqs, emu = check(llada, cfg, sps)
    assert emu.verify_forwards > 0
    check(llada, cfg, sps, static=True)
    check(llada, cfg, sps, budget=9)


def test_llada2_editing_really_edits_and_costs_post_steps(llada):
    """Editing changes outputs (some committed tokens are rewritten) and the post-steps are extra draft steps."""
    edit = dict(EDIT, verify=False, confidence_threshold=0.7)
    plain = {"verify": False, "confidence_threshold": 0.7}
    sps = [sampling_params(max_tokens=16) for _ in PROMPT_LENS]
    e_reqs, e_emu = emulate(llada, edit, sps)
    p_reqs, p_emu = emulate(llada, plain, sps)
    edited = sum(reference_output(llada, edit, r.prompt, r.sampling).stats.edited_tokens for r in e_reqs)
    assert edited > 0
    assert [r.output for r in e_reqs] != [r.output for r in p_reqs]
    assert e_emu.stepper.host_totals()["draft_steps"] > p_emu.stepper.host_totals()["draft_steps"]


def test_llada2_stop_tokens_with_editing(llada):
    reqs, _ = emulate(llada, dict(EDIT, verify=False), [sampling_params(max_tokens=12) for _ in PROMPT_LENS])
    from collections import Counter

    stop = Counter(t for r in reqs for t in r.output).most_common(1)[0][0]
    sps = [sampling_params(max_tokens=12, stop_token_ids=[stop], seed=i) for i in range(len(PROMPT_LENS))]
    reqs, _ = check(llada, dict(EDIT, verify_policy="mask_span_length"), sps)
    assert any(r.finish_reason == "stop" for r in reqs)
