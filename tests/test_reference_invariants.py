"""S2D2 invariants (``docs/algorithm.md``) checked end to end on the reference decoder with tiny random models.

All runs are fp32 on CPU, so equalities are exact: the reference model computes every row with the same
kernels whatever the mask, and random weights with std 0.5 in the head give top-2 logit gaps far above
fp32 rounding.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vllm_s2d2.configs import load_family_info
from vllm_s2d2.core import masks
from vllm_s2d2.core.params import SamplingSpec
from vllm_s2d2.reference import generate
from vllm_s2d2.reference.models import ReferenceModel
from vllm_s2d2.s2d2_config import S2D2Config
from vllm_s2d2.testing.checkpoints import build_tiny_checkpoint

GREEDY = SamplingSpec(temperature=0.0, seed=0)
# Prompt lengths: shorter than a block, exactly one block (4), several blocks, unaligned.
PROMPTS = [[5, 17, 42], [7, 8, 9, 10], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], list(range(20, 33))]


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    path = build_tiny_checkpoint("sdar", tmp_path_factory.mktemp("sdar"), small_vocab=True, dtype=torch.float32,
                                 init_std=0.5, seed=1)
    return ReferenceModel.load(path), load_family_info(path)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    out = {}
    for fam in ("sdar_moe", "fast_dllm_v2", "llada2"):
        path = build_tiny_checkpoint(fam, tmp_path_factory.mktemp(fam), small_vocab=True, dtype=torch.float32,
                                     init_std=0.5, seed=2)
        out[fam] = (ReferenceModel.load(path), load_family_info(path), path)
    return out


def ar_config(**kw) -> S2D2Config:
    return S2D2Config(block_size=1, denoising_steps=1, verify=False, **kw)


def always_verify_greedy(block: int, **kw) -> S2D2Config:
    base = dict(block_size=block, denoising_steps=block, verify_policy="mask_span_length", min_span_length=1,
                acceptance="greedy", cache_ver=True, always_check_high_confidence=False)
    base.update(kw)
    return S2D2Config(**base)


# -- I1: greedy S2D2 = AR greedy decoding ------------------------------------------------------------------
@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("draft_ver", [True, False])
def test_i1_always_verify_greedy_equals_ar(sdar, block, draft_ver):
    model, info = sdar
    ar = generate(model, info, PROMPTS, ar_config(cache_ver=True), GREEDY, max_tokens=24, ignore_eos=True)
    s2 = generate(model, info, PROMPTS, always_verify_greedy(block, draft_ver=draft_ver), GREEDY,
                  max_tokens=24, ignore_eos=True)
    for a, s in zip(ar, s2):
        assert s.token_ids == a.token_ids
        assert s.stats.verify_steps == s.stats.steps  # every step verified
        assert s.stats.accepted_tokens <= s.stats.proposed_tokens
    # Not vacuous: AR mode is one token per draft step; S2D2 accepted some drafts across the batch.
    assert sum(s.stats.accepted_tokens for s in s2) > 0


def test_i1_holds_with_stochastic_acceptance_at_one_hot_q_only(sdar):
    """Stochastic acceptance with sampled drafts is *not* AR-greedy in general: the invariant needs (c)."""
    model, info = sdar
    ar = generate(model, info, PROMPTS, ar_config(cache_ver=True), GREEDY, max_tokens=24, ignore_eos=True)
    s2 = generate(model, info, PROMPTS, always_verify_greedy(4, acceptance="stochastic"),
                  SamplingSpec(temperature=1.0, seed=3), max_tokens=24, ignore_eos=True)
    assert any(a.token_ids != s.token_ids for a, s in zip(ar, s2))


# -- I4: a step that does not verify equals the baseline step ----------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("remasking", ["low_confidence_dynamic", "low_confidence_static", "sequential"])
def test_i4_never_verifying_policy_equals_baseline(sdar, temperature, remasking):
    model, info = sdar
    spec = SamplingSpec(temperature=temperature, seed=11)
    base = generate(model, info, PROMPTS, S2D2Config(block_size=4, verify=False, remasking=remasking), spec,
                    max_tokens=20, ignore_eos=True)
    never = S2D2Config(block_size=4, remasking=remasking, verify_policy="score_threshold",
                       score_threshold=1e9)
    s2 = generate(model, info, PROMPTS, never, spec, max_tokens=20, ignore_eos=True)
    for b, s in zip(base, s2):
        assert s.token_ids == b.token_ids
        assert s.stats.verify_steps == 0
        assert s.stats.forwards == b.stats.forwards


# -- I3 / I6: commits per verify, forward accounting --------------------------------------------------------
@pytest.mark.parametrize("policy", ["mask_span_length", "score_threshold", "score_hysteresis",
                                    "contextual_bandit_ucb"])
def test_i3_i6_accounting(sdar, policy):
    model, info = sdar
    cfg = S2D2Config(block_size=8, denoising_steps=8, verify_policy=policy, score_threshold=0.0)
    outs = generate(model, info, PROMPTS, cfg, SamplingSpec(temperature=1.0, seed=5), max_tokens=32,
                    ignore_eos=True)
    for o in outs:
        st = o.stats
        assert len(o.token_ids) == 32
        # I6: 1 forward per skip step, 2 per verify step, +1 per committed block, +1 prefill.
        assert st.draft_forwards == st.steps and st.verify_forwards == st.verify_steps
        assert st.prefill_forwards == 1
        # I3 (B = S, quota 1): a verify step commits >= 1 and at most |span| tokens, all from the span.
        assert st.verify_steps <= st.verify_committed_tokens <= st.proposed_tokens
        assert st.accepted_tokens <= st.verify_committed_tokens


def test_forward_counts_of_baselines(sdar):
    model, info = sdar
    prompt = [list(range(1, 9))]  # 8 tokens: block-aligned for B = 4
    static = generate(model, info, prompt, S2D2Config(block_size=4, denoising_steps=2, verify=False,
                                                     remasking="low_confidence_static"), GREEDY,
                      max_tokens=16, ignore_eos=True)[0]
    # 4 blocks x 2 steps (quota 2 each) + 3 commit forwards (the last block is never stored) + prefill.
    assert static.stats.draft_forwards == 8 and static.stats.commit_forwards == 3
    assert static.stats.forwards == 12 and len(static.token_ids) == 16
    ar = generate(model, info, prompt, ar_config(), GREEDY, max_tokens=5, ignore_eos=True)[0]
    assert ar.stats.draft_forwards == 5 and ar.stats.commit_forwards == 4


# -- I7: verifier locality ----------------------------------------------------------------------------------
def test_i7_verifier_row_ignores_later_drafts(sdar):
    model, info = sdar
    torch.manual_seed(0)
    C, L = 6, 4
    cache = torch.randint(0, 400, (C,))
    drafts = torch.randint(0, 400, (L,))
    pos = torch.arange(C, C + L)
    n = C + 2 * L
    vis = torch.zeros(n, n, dtype=torch.bool)
    vis[:C, :C] = masks.causal(C)
    vis[C:] = masks.verifier_2l(C, L)
    mask_half = torch.full((L,), info.mask_token_id)

    def q(d):
        ids = torch.cat([cache, d, mask_half])
        return model.logits(ids, torch.cat([torch.arange(C), pos, pos]), vis, rows=torch.arange(C + L, n))

    base = q(drafts)
    for i in range(L):
        perturbed = drafts.clone()
        perturbed[i:] = (perturbed[i:] + 7) % 400
        out = q(perturbed)
        torch.testing.assert_close(out[:i + 1], base[:i + 1], rtol=0, atol=1e-5)  # q_<=i unchanged
        if i + 1 < L:
            assert not torch.allclose(out[i + 1:], base[i + 1:])


# -- reproducibility and batch independence -----------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_batch_independent(sdar):
    model, info = sdar
    cfg = S2D2Config(block_size=4)
    specs = [SamplingSpec(temperature=0.8, top_k=50, top_p=0.9, seed=100 + i) for i in range(len(PROMPTS))]
    batch = generate(model, info, PROMPTS, cfg, specs, max_tokens=16, ignore_eos=True)
    again = generate(model, info, PROMPTS, cfg, specs, max_tokens=16, ignore_eos=True)
    alone = [generate(model, info, [p], cfg, s, max_tokens=16, ignore_eos=True)[0]
             for p, s in zip(PROMPTS, specs)]
    assert [o.token_ids for o in batch] == [o.token_ids for o in again] == [o.token_ids for o in alone]
    other_seed = generate(model, info, PROMPTS[:1], cfg, SamplingSpec(temperature=0.8, seed=999),
                          max_tokens=16, ignore_eos=True)[0]
    assert other_seed.token_ids != batch[0].token_ids


def test_stop_tokens_and_max_tokens(sdar):
    model, info = sdar
    free = generate(model, info, PROMPTS[:1], ar_config(), GREEDY, max_tokens=12, ignore_eos=True)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    out = generate(model, info, PROMPTS[:1], ar_config(), GREEDY, max_tokens=12, stop_token_ids=[stop])[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first + 1]


def test_bad_inputs(sdar):
    model, info = sdar
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, info, [[]], S2D2Config(), GREEDY)
    with pytest.raises(ValueError, match="mask token"):
        generate(model, info, [[1, info.mask_token_id]], S2D2Config(), GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        generate(model, info, [[1]], S2D2Config(), GREEDY, max_tokens=0)
    with pytest.raises(ValueError, match="denoising_steps"):
        generate(model, info, [[1]], S2D2Config(block_size=4, denoising_steps=8), GREEDY)


# -- the other families -------------------------------------------------------------------------------------
PRESET_OF = {"sdar_moe": "sdar-a", "fast_dllm_v2": "fast-a", "llada2": "llada2-quality"}


@pytest.mark.parametrize("fam", ["sdar_moe", "fast_dllm_v2", "llada2"])
def test_family_presets_decode(family_models, fam):
    model, info, _ = family_models[fam]
    cfg = S2D2Config.from_dict({"preset": PRESET_OF[fam]})
    if fam == "llada2":
        cfg = cfg.replace(block_size=8)  # keep the CPU run short
    spec = SamplingSpec(temperature=0.0, seed=1)
    outs = generate(model, info, PROMPTS[:2], cfg, spec, max_tokens=20, ignore_eos=True)
    again = generate(model, info, PROMPTS[:2], cfg, spec, max_tokens=20, ignore_eos=True)
    for o, a in zip(outs, again):
        assert len(o.token_ids) == 20 and o.token_ids == a.token_ids
        assert info.mask_token_id not in o.token_ids
        assert o.stats.steps > 0 and o.stats.forwards == o.stats.as_dict()["forwards"]


def test_sdar_moe_always_verify_equals_ar(family_models):
    model, info, _ = family_models["sdar_moe"]
    ar = generate(model, info, PROMPTS, ar_config(cache_ver=True), GREEDY, max_tokens=16, ignore_eos=True)
    s2 = generate(model, info, PROMPTS, always_verify_greedy(4), GREEDY, max_tokens=16, ignore_eos=True)
    assert [a.token_ids for a in ar] == [s.token_ids for s in s2]


def test_fast_dllm_threshold_baseline_vs_s2d2_first_token_known(family_models):
    """Fast-dLLM v2: the token after the prompt is the argmax of the prefill's last logit, for every config."""
    model, info, _ = family_models["fast_dllm_v2"]
    spec = SamplingSpec(temperature=1.0, seed=4)
    base = generate(model, info, PROMPTS, S2D2Config(verify=False), spec, max_tokens=8, ignore_eos=True)
    s2 = generate(model, info, PROMPTS, S2D2Config(verify_policy="mask_span_length"), spec, max_tokens=8,
                  ignore_eos=True)
    for p, b, s in zip(PROMPTS, base, s2):
        n = len(p)
        vis = masks.committed_kv(n, info.block_size, False, n)
        expect = int(model.logits(torch.tensor(p), torch.arange(n), vis)[-1].argmax())
        assert b.token_ids[0] == s.token_ids[0] == expect
    assert sum(s.stats.verify_steps for s in s2) > 0


def test_llada2_editing(family_models):
    model, info, _ = family_models["llada2"]
    spec = SamplingSpec(temperature=1.0, seed=9)
    cfg = S2D2Config(block_size=8, verify=False, confidence_threshold=0.0, editing_threshold=0.0,
                     max_post_steps=2)
    edited = generate(model, info, PROMPTS[:2], cfg, spec, max_tokens=16, ignore_eos=True)
    plain = generate(model, info, PROMPTS[:2], cfg.replace(editing_threshold=None, max_post_steps=0), spec,
                     max_tokens=16, ignore_eos=True)
    assert sum(o.stats.edited_tokens for o in edited) > 0
    assert sum(o.stats.edited_tokens for o in plain) == 0
    for p, o in zip(PROMPTS[:2], edited):
        assert o.prompt_token_ids == p and len(o.token_ids) == 16


# -- the CLI ------------------------------------------------------------------------------------------------
def test_reference_cli(family_models):
    _, _, path = family_models["sdar_moe"]
    out = subprocess.run([sys.executable, "-m", "vllm_s2d2.reference", "--model", str(path), "--prompt-ids",
                          "1,2,3,4,5", "--max-tokens", "8", "--s2d2-config", '{"preset": "sdar-a"}'],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "forwards" in out.stdout and "accepted" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "vllm_s2d2.reference", "--model", str(path), "--prompt-ids", "1",
                          "--s2d2-config", '{"verify_policy": "nope"}'], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "verify_policy" in bad.stderr
