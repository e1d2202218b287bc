"""Unit tests for ``vllm_s2d2.core.step``: draft, verify, finish and the invariants I3/I4/I5 (``docs/algorithm.md``)."""

from __future__ import annotations

import math
from dataclasses import fields

import torch

from vllm_s2d2.core.params import FamilyRules, SamplingSpec, StepParams
from vllm_s2d2.core.policies import PolicyState
from vllm_s2d2.core.step import BlockState, Draft, align_shifted_logits, draft_step, finish_step, verify_step
from vllm_s2d2.s2d2_config import S2D2Config

M = 99  # mask id
V = 8


def lt(x):
    return torch.tensor(x, dtype=torch.long)


def bt(x):
    return torch.tensor(x, dtype=torch.bool)


def ft(x):
    return torch.tensor(x, dtype=torch.float32)


def peaked(token: int, pmax: float) -> list[float]:
    """Logits (log-probs) of a V-token distribution with ``pmax`` on ``token`` and the rest spread evenly."""
    rest = (1.0 - pmax) / (V - 1)
    return [math.log(pmax) if v == token else math.log(rest) for v in range(V)]


def block_state(tokens, editable=None, region=None, step=None, counter=None):
    tokens = lt(tokens)
    R, B = tokens.shape
    return BlockState(tokens,
                      bt(editable) if editable is not None else torch.ones(R, B, dtype=torch.bool),
                      bt(region) if region is not None else torch.ones(R, B, dtype=torch.bool),
                      lt(step) if step is not None else torch.zeros(R, dtype=torch.long),
                      lt(counter) if counter is not None else torch.zeros(R, dtype=torch.long))


def build(family, ckpt, cfg_kwargs, samplings):
    rules = FamilyRules.for_family(family, M)
    cfgs = [S2D2Config(**kw).resolve(family, ckpt) for kw in cfg_kwargs]
    return StepParams.build(cfgs, samplings, rules), rules


def one_step(logits, q_logits, block, params, rules, state):
    """draft -> verify (verifying rows only, as the engine does) -> finish."""
    draft, state = draft_step(logits, block, params, rules, state)
    R, B = block.tokens.shape
    rows = draft.do_verify.nonzero().flatten()
    v_commit = v_tokens = v_acc = None
    if rows.numel():
        c, t, a = verify_step(draft.index(rows), q_logits[rows], params.index(rows), rules, block.counter[rows])
        v_commit = torch.zeros(R, B, dtype=torch.bool).index_copy(0, rows, c)
        v_tokens = block.tokens.clone().index_copy(0, rows, t)
        v_acc = torch.zeros(R, dtype=torch.long).index_copy(0, rows, a)
    result, state = finish_step(block, draft, v_commit, v_tokens, v_acc, params, state)
    return draft, result, state


# ----------------------------------------------------------------------------------------------------
# align_shifted_logits
# ----------------------------------------------------------------------------------------------------

def test_align_shifted_logits():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    out = align_shifted_logits(logits)
    assert out.shape == logits.shape
    # out[:, i] = logits[:, i - 1]; out[:, 0] = logits[:, 0]
    assert out[:, 0].tolist() == logits[:, 0].tolist()
    for i in range(1, 4):
        assert out[:, i].tolist() == logits[:, i - 1].tolist()
    assert out[0, :, 0].tolist() == [0.0, 0.0, 3.0, 6.0]


# ----------------------------------------------------------------------------------------------------
# params
# ----------------------------------------------------------------------------------------------------

def test_step_params_build_by_hand():
    params, rules = build("sdar", 4, [dict(block_size=10, denoising_steps=4), dict()],
                          [SamplingSpec(0.0, seed=1), SamplingSpec(0.7, top_k=5, seed=2)])
    # quota rows padded with their last value: [3, 3, 2, 2] and [1, 1, 1, 1]
    assert params.quota.tolist() == [[3, 3, 2, 2], [1, 1, 1, 1]]
    assert params.greedy.tolist() == [True, False]
    assert params.top_k.tolist() == [0, 5] and params.top_p is None
    assert params.seed.tolist() == [1, 2]
    llada, _ = build("llada2", 32, [dict()], [SamplingSpec(0.0, seed=0)])
    assert llada.quota.tolist() == [[1]]  # LLaDA2: one token per step
    assert float(llada.editing_threshold[0]) > 1.0  # editing off unless configured


# ----------------------------------------------------------------------------------------------------
# batch independence (incl. RNG)
# ----------------------------------------------------------------------------------------------------

ROW_CFGS = [
    dict(),  # SDAR Config-A (score_threshold)
    dict(verify_policy="mask_span_length", min_span_length=1),  # always verify
    dict(verify_policy="contextual_bandit_ucb"),
    dict(verify_policy="score_hysteresis", hysteresis_on=0.5, hysteresis_off=-0.5, score_type="difference_dynamic",
         remasking="sequential", denoising_steps=2),
]
ROW_SAMPLING = [SamplingSpec(1.0, seed=11), SamplingSpec(0.0, seed=22), SamplingSpec(0.7, top_k=3, seed=33),
                SamplingSpec(1.3, top_p=0.9, seed=44)]
ROW_TOKENS = [[M, M, M, M], [5, M, M, 3], [M, 2, M, M], [1, M, M, M]]


def _assert_draft_equal(a: Draft, b: Draft, r: int):
    for f in fields(Draft):
        x, y = getattr(a, f.name)[r], getattr(b, f.name)[0]
        if x.dtype.is_floating_point:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=f"{f.name} row {r}")
        else:
            assert torch.equal(x, y), (f.name, r)


def test_draft_verify_finish_batch_equals_single_rows():
    params, rules = build("sdar", 4, ROW_CFGS, ROW_SAMPLING)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 4, V, generator=g) * 2
    q_logits = torch.randn(4, 4, V, generator=g) * 2
    block = block_state(ROW_TOKENS, step=[0, 1, 0, 1], counter=[0, 5, 2, 7])
    state = PolicyState.zeros(4)
    draft, state_b = draft_step(logits, block, params, rules, state)
    commit, tokens, acc = verify_step(draft, q_logits, params, rules, block.counter)
    result, state_f = finish_step(block, draft, commit, tokens, acc, params, state_b)
    assert draft.do_verify[1]  # always-verify row
    for r in range(4):
        p1, _ = build("sdar", 4, [ROW_CFGS[r]], [ROW_SAMPLING[r]])
        b1 = BlockState(*(None if t is None else t[r:r + 1] for t in block))
        d1, s1 = draft_step(logits[r:r + 1], b1, p1, rules, PolicyState.zeros(1))
        _assert_draft_equal(draft, d1, r)
        c1, t1, a1 = verify_step(d1, q_logits[r:r + 1], p1, rules, b1.counter)
        assert torch.equal(commit[r], c1[0]) and torch.equal(tokens[r], t1[0]) and int(acc[r]) == int(a1[0])
        res1, s1 = finish_step(b1, d1, c1, t1, a1, p1, s1)
        for x, y in zip(result, res1):
            assert torch.equal(x[r], y[0])
        for name in ("hysteresis_on", "ucb_t", "ucb_n", "ucb_mu"):
            assert torch.equal(getattr(state_f, name)[r], getattr(s1, name)[0]), name


def test_multi_step_decoding_batch_equals_single_rows():
    """Several steps with state carried over (hysteresis, UCB, counters); verify only on verifying rows."""
    params, rules = build("sdar", 4, ROW_CFGS, ROW_SAMPLING)
    g = torch.Generator().manual_seed(9)
    steps = [(torch.randn(4, 4, V, generator=g) * 2, torch.randn(4, 4, V, generator=g) * 2) for _ in range(5)]
    block = block_state(ROW_TOKENS)
    state = PolicyState.zeros(4)
    singles = []
    for r in range(4):
        p1, _ = build("sdar", 4, [ROW_CFGS[r]], [ROW_SAMPLING[r]])
        singles.append([p1, BlockState(*(None if t is None else t[r:r + 1] for t in block)), PolicyState.zeros(1)])
    for t, (logits, q_logits) in enumerate(steps):
        _, res, state = one_step(logits, q_logits, block, params, rules, state)
        block = BlockState(res.tokens, block.editable, block.region, block.step + 1, block.counter + 1)
        for r in range(4):
            p1, b1, s1 = singles[r]
            _, res1, s1 = one_step(logits[r:r + 1], q_logits[r:r + 1], b1, p1, rules, s1)
            singles[r][1] = BlockState(res1.tokens, b1.editable, b1.region, b1.step + 1, b1.counter + 1)
            singles[r][2] = s1
            assert torch.equal(res.tokens[r], res1.tokens[0]), (t, r)
            assert torch.equal(res.committed[r], res1.committed[0]), (t, r)
            assert torch.equal(state.hysteresis_on[r], s1.hysteresis_on[0])
            assert torch.equal(state.ucb_n[r], s1.ucb_n[0]) and torch.equal(state.ucb_mu[r], s1.ucb_mu[0])
    # every block is complete after 5 steps of quota >= 1 (B = 4)
    assert not (block.tokens == M).any()


# ----------------------------------------------------------------------------------------------------
# I4: a non-verify step is the baseline step
# ----------------------------------------------------------------------------------------------------

def test_non_verify_step_commits_exactly_the_baseline_rule():
    # Greedy drafts (T = 0): x0 = argmax, p0 = its softmax probability.  Position 0 is already committed.
    # p0 at positions 1, 2, 3 = 0.9, 0.6, 0.95 with tokens 2, 3, 4.  tau = 0.85, quota 1 (B = S = 4).
    pos_logits = [peaked(0, 0.99), peaked(2, 0.9), peaked(3, 0.6), peaked(4, 0.95)]
    low = [peaked(0, 0.99), peaked(2, 0.5), peaked(3, 0.6), peaked(4, 0.3)]
    cfgs = [dict(verify=False),                                  # dynamic: all > 0.85 -> {1, 3}
            dict(score_threshold=100.0),                         # routed but declines -> same baseline {1, 3}
            dict(verify=False, remasking="low_confidence_static"),  # top-1 -> {3}
            dict(verify=False, remasking="sequential"),          # first mask -> {1}
            dict(verify=False),                                  # (low logits) none > 0.85 -> top-1 = {2}
            dict(verify=False, block_size=4, denoising_steps=2)]  # quota 2, dynamic: 2 above -> {1, 3}
    R = len(cfgs)
    params, rules = build("sdar", 4, cfgs, [SamplingSpec(0.0, seed=r) for r in range(R)])
    logits = ft([pos_logits] * 4 + [low] + [pos_logits])
    block = block_state([[7, M, M, M]] * R)
    state = PolicyState.zeros(R)
    draft, res, state = one_step(logits, logits, block, params, rules, state)
    assert draft.do_verify.tolist() == [False] * R
    assert draft.routed.tolist() == [False, True, False, False, False, False]
    expected_commit = [[0, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1]]
    assert res.committed.int().tolist() == expected_commit
    assert torch.equal(res.committed, draft.baseline_commit)
    assert res.tokens.tolist() == [[7, 2, M, 4], [7, 2, M, 4], [7, M, M, 4], [7, 2, M, M], [7, M, 3, M],
                                   [7, 2, M, 4]]
    assert res.num_accepted.tolist() == [0] * R
    torch.testing.assert_close(draft.p0[0, 1:], ft([0.9, 0.6, 0.95]))
    # the verify step of the same block with always-verify would differ: this really was the baseline
    assert res.num_committed.tolist() == [2, 2, 1, 1, 1, 2]


def test_non_verify_fast_threshold_rule_in_sub_block():
    # Fast-dLLM v2 (B = 8, sub-block 4): {p0 > 0.9} + argmax, only inside the current sub-block (positions 0-3);
    # positions 4-7 are very confident but outside the region.  No quota top-up.
    rules = FamilyRules.for_family("fast_dllm_v2", M)
    cfgs = [S2D2Config(verify=False, sub_block_size=4).resolve("fast_dllm_v2", 8)] * 2
    params = StepParams.build(cfgs, [SamplingSpec(0.0, seed=0)] * 2, rules)
    row0 = [peaked(1, 0.99), peaked(2, 0.95), peaked(3, 0.5), peaked(4, 0.92)] + [peaked(5, 0.999)] * 4
    row1 = [peaked(1, 0.99), peaked(2, 0.3), peaked(3, 0.5), peaked(4, 0.4)] + [peaked(5, 0.999)] * 4
    block = block_state([[6, M, M, M, M, M, M, M]] * 2, region=[[1, 1, 1, 1, 0, 0, 0, 0]] * 2)
    draft, res, _ = one_step(ft([row0, row1]), ft([row0, row1]), block, params, rules, PolicyState.zeros(2))
    assert res.committed.int().tolist() == [[0, 1, 0, 1, 0, 0, 0, 0],   # 0.95, 0.92 > 0.9
                                            [0, 0, 1, 0, 0, 0, 0, 0]]   # none above: argmax 0.5 @2
    assert res.tokens.tolist() == [[6, 2, M, 4, M, M, M, M], [6, M, 3, M, M, M, M, M]]
    assert draft.span_length.tolist() == [3, 3]  # span restricted to the sub-block


# ----------------------------------------------------------------------------------------------------
# I3 on full steps: quota 1, always verify
# ----------------------------------------------------------------------------------------------------

def test_verify_step_commits_between_one_and_span_span_tokens():
    R, B = 64, 4
    cfg = dict(verify_policy="mask_span_length", min_span_length=1)
    params, rules = build("sdar", 4, [cfg] * R, [SamplingSpec(1.0, seed=1000 + r) for r in range(R)])
    g = torch.Generator().manual_seed(3)
    patterns = [[M, M, M, M], [5, M, M, 3], [M, 2, M, M], [1, 2, M, M], [M, M, M, 4], [1, M, 2, M]]
    tokens = [patterns[r % len(patterns)] for r in range(R)]
    total_accepted = 0
    for trial in range(3):
        logits = torch.randn(R, B, V, generator=g)
        q_logits = torch.randn(R, B, V, generator=g)
        block = block_state(tokens, counter=[trial] * R)
        draft, res, _ = one_step(logits, q_logits, block, params, rules, PolicyState.zeros(R))
        assert draft.do_verify.all()
        span_commits = (res.committed & draft.span).sum(1)
        assert bool((span_commits >= 1).all())
        assert bool((span_commits <= draft.span_length).all())
        assert torch.equal(span_commits, torch.minimum(res.num_accepted + 1, draft.span_length))
        # committed span positions are a prefix of the span; accepted ones carry the draft
        for r in range(R):
            s0 = int(draft.span[r].int().argmax())
            n = int(span_commits[r])
            assert res.committed[r, s0:s0 + n].all()
            a = int(res.num_accepted[r])
            assert torch.equal(res.tokens[r, s0:s0 + a], draft.x0[r, s0:s0 + a])
        # I5: only masks are filled; committed tokens are final
        was = lt(tokens)
        assert not (res.committed & (was != M)).any()
        assert torch.equal(res.tokens[was != M], was[was != M])
        total_accepted += int(res.num_accepted.sum())
    assert total_accepted > 0  # some drafts were accepted


def test_verify_step_with_quota_met_commits_no_fallback():
    # With quota 1 a verifying step commits only the accepted prefix + correction (no fallback when the
    # quota is met, not even the "all above tau" dynamic rule).  Regression test for the k_left = 0 fallback
    # (fixed in b32ca9c).  Block [M, 7, M, M]: span = {0}; masks 2, 3 have p0 = 0.99 > 0.85 outside the span.
    cfg = dict(verify_policy="mask_span_length", min_span_length=1)
    params, rules = build("sdar", 4, [cfg], [SamplingSpec(0.0, seed=0)])
    logits = ft([[peaked(1, 0.6), peaked(2, 0.99), peaked(3, 0.99), peaked(4, 0.99)]])
    block = block_state([[M, 7, M, M]])
    draft, res, _ = one_step(logits, logits, block, params, rules, PolicyState.zeros(1))
    assert draft.do_verify.tolist() == [True] and draft.quota.tolist() == [1]
    assert res.committed.int().tolist() == [[1, 0, 0, 0]]


def test_verify_step_tops_up_to_quota_when_short():
    # B = 8, S = 4 -> quota 2 at step 0.  Span = {0} (1 commit), so one more from the dynamic rule:
    # remaining masks 2..7 with p0 0.5, 0.7, 0.6, 0.55, 0.52, 0.51: none > 0.85 -> top-1 = position 3.
    cfg = dict(verify_policy="mask_span_length", min_span_length=1, block_size=8, denoising_steps=4)
    params, rules = build("sdar", 4, [cfg], [SamplingSpec(0.0, seed=0)])
    ps = [0.6, 0.99, 0.5, 0.7, 0.6, 0.55, 0.52, 0.51]
    logits = ft([[peaked(i % V, p) for i, p in enumerate(ps)]])
    block = block_state([[M, 7, M, M, M, M, M, M]])
    draft, res, _ = one_step(logits, logits, block, params, rules, PolicyState.zeros(1))
    assert draft.quota.tolist() == [2] and draft.do_verify.tolist() == [True]
    assert res.committed.int().tolist() == [[1, 0, 0, 1, 0, 0, 0, 0]]
    assert res.num_committed.tolist() == [2]


# Regression (Fast-dLLM v2 verification, ``docs/algorithm.md``): a verification that commits nothing falls back to
# the threshold rule, as the Fast-dLLM v2 reference code does to avoid stalling without resampling.  Found by
# this suite.
def test_fast_no_resample_nothing_accepted_falls_back_to_threshold_rule():
    rules = FamilyRules.for_family("fast_dllm_v2", M)
    cfg = S2D2Config(verify_policy="mask_span_length", min_span_length=1, allow_resample=False,
                     sub_block_size=4).resolve("fast_dllm_v2", 8)
    params = StepParams.build([cfg], [SamplingSpec(0.0, seed=0)], rules)
    draft_logits = ft([[peaked(1, 0.99), peaked(2, 0.95), peaked(3, 0.5), peaked(4, 0.92)] + [peaked(5, 0.9)] * 4])
    # the verifier gives the drafted token at position 1 (token 2) essentially zero probability -> r ~ 0
    q = [peaked(1, 0.99), peaked(6, 0.999999), peaked(3, 0.5), peaked(4, 0.92)] + [peaked(5, 0.9)] * 4
    q[1][2] = -1e4
    block = block_state([[6, M, M, M, M, M, M, M]], region=[[1, 1, 1, 1, 0, 0, 0, 0]])
    draft, res, _ = one_step(draft_logits, ft([q]), block, params, rules, PolicyState.zeros(1))
    assert draft.do_verify.tolist() == [True]
    assert res.num_accepted.tolist() == [0]
    assert torch.equal(res.committed, draft.baseline_commit)  # {1, 3}
    assert res.num_committed.tolist() == [2]


def test_fast_no_resample_partial_accept_leaves_rejected_masked():
    rules = FamilyRules.for_family("fast_dllm_v2", M)
    cfg = S2D2Config(verify_policy="mask_span_length", min_span_length=1, allow_resample=False,
                     sub_block_size=4).resolve("fast_dllm_v2", 8)
    params = StepParams.build([cfg], [SamplingSpec(0.0, seed=0)], rules)
    draft_logits = ft([[peaked(1, 0.99), peaked(2, 0.95), peaked(3, 0.5), peaked(4, 0.92)] + [peaked(5, 0.9)] * 4])
    q = [peaked(1, 0.99), peaked(2, 0.99), peaked(6, 0.9), peaked(4, 0.92)] + [peaked(5, 0.9)] * 4
    q[2][3] = -1e4  # drafted token 3 at position 2 impossible under q -> rejected there
    block = block_state([[6, M, M, M, M, M, M, M]], region=[[1, 1, 1, 1, 0, 0, 0, 0]])
    draft, res, _ = one_step(draft_logits, ft([q]), block, params, rules, PolicyState.zeros(1))
    # position 1: q(2) = 0.99 >= p(2) = 0.95 -> r = 1, accepted; position 2 rejected and left masked;
    # no threshold top-up after a verification (position 3 stays masked although p0 = 0.92 > 0.9)
    assert res.num_accepted.tolist() == [1]
    assert res.committed.int().tolist() == [[0, 1, 0, 0, 0, 0, 0, 0]]
    assert res.tokens.tolist() == [[6, 2, M, M, M, M, M, M]]


# Regression: always_check_high_confidence commits count toward the quota before the fallback runs
# (the order of the SDAR reference code).  Found by this suite.
def test_always_check_high_confidence_counts_toward_quota():
    # quota 2 (B 8, S 4); span {0} commits 1; remaining: pos 5 has p0 0.99 > 0.85 -> high-confidence commit
    # brings the step to 2 = quota, so the sequential fallback (which would pick position 2) must not run.
    cfg = dict(verify_policy="mask_span_length", min_span_length=1, block_size=8, denoising_steps=4,
               remasking="sequential", always_check_high_confidence=True)
    params, rules = build("sdar", 4, [cfg], [SamplingSpec(0.0, seed=0)])
    ps = [0.6, 0.99, 0.5, 0.5, 0.5, 0.99, 0.5, 0.5]
    logits = ft([[peaked(i % V, p) for i, p in enumerate(ps)]])
    block = block_state([[M, 7, M, M, M, M, M, M]])
    draft, res, _ = one_step(logits, logits, block, params, rules, PolicyState.zeros(1))
    assert res.committed.int().tolist() == [[1, 0, 0, 0, 0, 1, 0, 0]]


def test_greedy_acceptance_step_commits_ar_prefix():
    # acceptance="greedy": accept while draft == argmax q; correction = argmax q (I1 (c)).
    cfg = dict(verify_policy="mask_span_length", min_span_length=1, acceptance="greedy")
    params, rules = build("sdar", 4, [cfg], [SamplingSpec(0.0, seed=0)])
    d = ft([[peaked(1, 0.9), peaked(2, 0.9), peaked(3, 0.9), peaked(4, 0.9)]])
    q = ft([[peaked(1, 0.6), peaked(2, 0.6), peaked(5, 0.6), peaked(4, 0.6)]])
    draft, res, _ = one_step(d, q, block_state([[M, M, M, M]]), params, rules, PolicyState.zeros(1))
    assert res.num_accepted.tolist() == [2]
    assert res.tokens.tolist() == [[1, 2, 5, M]]
    assert res.committed.int().tolist() == [[1, 1, 1, 0]]


def test_ucb_reward_recorded_on_routed_steps():
    cfg = dict(verify_policy="contextual_bandit_ucb")
    params, rules = build("sdar", 4, [cfg], [SamplingSpec(0.0, seed=0)])
    d = ft([[peaked(1, 0.9), peaked(2, 0.9), peaked(3, 0.9), peaked(4, 0.9)]])
    draft, res, state = one_step(d, d, block_state([[M, M, M, M]]), params, rules, PolicyState.zeros(1))
    # first decision: untried arms -> verify; q == p -> all 4 accepted -> reward 4 / 2 = 2
    assert draft.do_verify.tolist() == [True]
    assert res.num_committed.tolist() == [4]
    b = int(draft.bucket[0])
    assert state.ucb_t.tolist() == [1.0]
    assert state.ucb_n[0, b].tolist() == [0.0, 1.0]
    assert state.ucb_mu[0, b].tolist() == [0.0, 2.0]


def test_hysteresis_state_updated_on_non_verify_steps():
    # hysteresis on 5 / off 0: K-hat <= 4 for B = 4 so s > 5 is impossible -> stays off, state stays False
    cfg = dict(verify_policy="score_hysteresis", hysteresis_on=5.0, hysteresis_off=0.0)
    params, rules = build("sdar", 4, [cfg], [SamplingSpec(0.0, seed=0)])
    state = PolicyState.zeros(1)
    state.hysteresis_on = bt([True])  # currently on: s = K-hat - 1 >= 0 keeps it on
    d = ft([[peaked(1, 0.99)] * 4])
    draft, res, state = one_step(d, d, block_state([[M, M, M, M]]), params, rules, state)
    assert draft.do_verify.tolist() == [True] and state.hysteresis_on.tolist() == [True]
    # a flat draft: alpha small, K-hat - 1 < 0 -> turns off on this (non-verify) step
    flat = ft([[[0.0] * V] * 4])
    draft, res, state = one_step(flat, flat, block_state([[M, M, M, M]]), params, rules, state)
    assert draft.do_verify.tolist() == [False] and state.hysteresis_on.tolist() == [False]
    assert torch.equal(res.committed, draft.baseline_commit)


# ----------------------------------------------------------------------------------------------------
# LLaDA2.1 editing
# ----------------------------------------------------------------------------------------------------

def test_llada2_edits_only_editable_non_mask_positions():
    rules = FamilyRules.for_family("llada2", M)
    assert rules.fixed_quota == 1 and not rules.shifted
    cfgs = [S2D2Config(verify=False, editing_threshold=0.9, block_size=8).resolve("llada2", 8),
            S2D2Config(editing_threshold=0.9, block_size=8, verify_policy="mask_span_length",
                       min_span_length=1).resolve("llada2", 8),
            S2D2Config(verify=False, block_size=8).resolve("llada2", 8)]  # editing off
    params = StepParams.build(cfgs, [SamplingSpec(0.0, seed=s) for s in range(3)], rules)
    # block: prompt 10, 11 | generated 12, 13, 14 | masks.  Draft argmax differs everywhere.
    tokens = [[10, 11, 12, 13, 14, M, M, M]] * 3
    editable = [[0, 0, 1, 1, 1, 1, 1, 1]] * 3
    row = [peaked(1, 0.99), peaked(2, 0.99),   # prompt: never edited
           peaked(3, 0.95),                    # 0.95 > 0.9, differs -> edit
           peaked(4, 0.5),                     # too unsure -> kept
           peaked(14 % V, 0.99),               # (token 6 != 14) -> edit
           peaked(5, 0.97), peaked(6, 0.3), peaked(7, 0.3)]
    logits = ft([row] * 3)
    block = block_state(tokens, editable=editable)
    draft, res, _ = one_step(logits, logits, block, params, rules, PolicyState.zeros(3))
    assert draft.edits.int().tolist() == [[0, 0, 1, 0, 1, 0, 0, 0]] * 2 + [[0] * 8]
    # the verifier's first half carries the edits and the drafts of every mask
    assert draft.first_half[0].tolist() == [10, 11, 3, 13, 6, 5, 6, 7]
    assert draft.first_half[2].tolist() == [10, 11, 12, 13, 14, 5, 6, 7]
    # row 0 (no verify): quota 1, dynamic tau 0.95: 0.97 @5 above -> fill 5; edits applied
    assert res.tokens[0].tolist() == [10, 11, 3, 13, 6, 5, M, M]
    # row 1 (verify, q == p): span 5..7 all accepted; edits applied too
    assert draft.do_verify.tolist() == [False, True, False]
    assert res.tokens[1].tolist() == [10, 11, 3, 13, 6, 5, 6, 7]
    # row 2: no editing
    assert res.tokens[2].tolist() == [10, 11, 12, 13, 14, 5, M, M]
    # commits are mask positions only (I5); edits never touch the prompt
    was = lt(tokens)
    assert not (res.committed & (was != M)).any()
    assert torch.equal(res.tokens[:, :2], was[:, :2])


def test_llada2_post_step_edit_without_masks():
    rules = FamilyRules.for_family("llada2", M)
    cfg = S2D2Config(editing_threshold=0.5, block_size=4).resolve("llada2", 4)
    params = StepParams.build([cfg], [SamplingSpec(0.0, seed=0)], rules)
    logits = ft([[peaked(1, 0.99), peaked(2, 0.6), peaked(3, 0.4), peaked(4 % V, 0.99)]])
    block = block_state([[1, 5, 6, 4]], editable=[[1, 1, 1, 1]])
    draft, res, _ = one_step(logits, logits, block, params, rules, PolicyState.zeros(1))
    assert draft.span_length.tolist() == [0] and draft.do_verify.tolist() == [False]
    assert res.num_committed.tolist() == [0]
    assert res.tokens.tolist() == [[1, 2, 6, 4]]  # only position 1 (0.6 > 0.5, differs) is edited


# ----------------------------------------------------------------------------------------------------
# UCB context bucket as computed by draft_step (``docs/algorithm.md``, policies)
# ----------------------------------------------------------------------------------------------------
# Entropy of peaked(t, 0.99) with V = 8: H = -(0.99 ln 0.99 + 0.01 ln(0.01 / 7)) = 0.0755 nats, / ln 8 = 0.036
# (entropy bin 0); a flat row (all logits 0) has normalised entropy 1 (bin 1).

def test_ucb_bucket_in_draft_step_sdar():
    params, rules = build("sdar", 4, [dict(verify_policy="contextual_bandit_ucb")] * 3,
                          [SamplingSpec(0.0, seed=0)] * 3)
    sharp = [peaked(1, 0.99)] * 4
    flat = [[0.0] * V] * 4
    logits = ft([sharp, sharp, flat])
    block = block_state([[10, 7, M, M], [M, M, M, M], [10, 7, M, M]])
    draft, _ = draft_step(logits, block, params, rules, PolicyState.zeros(3))
    # row 0: span 2 of [1, 4] -> 2 * 1/3 = 0.67 -> 0; progress 2/4 -> 1; entropy 0.036 -> 0 => (0*2+1)*2+0 = 2
    # row 1: span 4 -> 1; progress 0 -> 0; entropy -> 0 => (1*2+0)*2+0 = 4
    # row 2: as row 0 but entropy 1 -> 1 => 3
    assert draft.bucket.tolist() == [2, 4, 3]


def test_ucb_progress_excludes_prompt_tail():
    params, rules = build("sdar", 4, [dict(verify_policy="contextual_bandit_ucb")],
                          [SamplingSpec(0.0, seed=0)])
    logits = ft([[peaked(1, 0.99)] * 4])
    # positions 0, 1 are prompt (not editable): nothing decoded yet -> progress 0 -> bin 0; span 2 -> 0;
    # entropy -> 0  => bucket 0
    block = block_state([[10, 11, M, M]], editable=[[0, 0, 1, 1]])
    draft, _ = draft_step(logits, block, params, rules, PolicyState.zeros(1))
    assert draft.bucket.tolist() == [0]


def test_ucb_context_fast_uses_sub_block_window():
    rules = FamilyRules.for_family("fast_dllm_v2", M)
    cfgs = [S2D2Config(verify_policy="contextual_bandit_ucb", sub_block_size=4).resolve("fast_dllm_v2", 8),
            S2D2Config(verify_policy="contextual_bandit_ucb", sub_block_size=4,
                       ucb_entropy_source="masked").resolve("fast_dllm_v2", 8)]
    params = StepParams.build(cfgs, [SamplingSpec(0.0, seed=0)] * 2, rules)
    sharp, flat = peaked(1, 0.99), [0.0] * V
    # row 0: second sub-block, nothing decoded in it yet: span 4 of [1, 4] -> 1; progress 0/4 -> 0;
    #        span entropy 0.036 -> 0  => (1*2+0)*2+0 = 4   (whole-block progress 4/8 would give bin 1 -> 6)
    # row 1: first sub-block, position 0 filled: span 3 -> 2*(2/3) -> 1; progress 1/4 -> 0; "masked" entropy
    #        over the sub-block's masks (1..3, sharp) -> 0  => 4   (all 7 block masks: (3*0.036+4)/7 -> bin 1 -> 5)
    logits = ft([[flat] * 4 + [sharp] * 4, [sharp] * 4 + [flat] * 4])
    block = block_state([[6, 1, 2, 3, M, M, M, M], [6, M, M, M, M, M, M, M]],
                        region=[[0, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]])
    draft, _ = draft_step(logits, block, params, rules, PolicyState.zeros(2))
    assert draft.bucket.tolist() == [4, 4]


def test_unrouted_draft_skips_routing_and_the_bandit_update_without_changing_anything():
    """``route_any=False`` (a batch where no request may verify) gives the draft, commits and policy state of a
    full step whose requests have verification off: UCB statistics from earlier steps stay as they were."""
    cfgs = [dict(verify=False, verify_policy="contextual_bandit_ucb"), dict(verify=False)]
    params, rules = build("sdar", 4, cfgs, [SamplingSpec(0.0, seed=0), SamplingSpec(0.7, seed=3)])
    d = ft([[peaked(1, 0.9), peaked(2, 0.6), peaked(3, 0.95), peaked(4, 0.3)]] * 2)
    block = block_state([[M, M, M, M], [5, M, M, M]])
    state = PolicyState.zeros(2)
    state.ucb_n[0, 1] = ft([2.0, 3.0])
    state.ucb_mu[0, 1] = ft([0.5, 1.5])
    full_draft, full_state = draft_step(d, block, params, rules, state)
    full, full_state = finish_step(block, full_draft, None, None, None, params, full_state)
    fast_draft, fast_state = draft_step(d, block, params, rules, state, route_any=False)
    fast, fast_state = finish_step(block, fast_draft, None, None, None, params, fast_state, route_any=False)
    assert not full_draft.routed.any() and not fast_draft.routed.any()
    assert torch.equal(full.tokens, fast.tokens) and torch.equal(full.committed, fast.committed)
    for f in fields(PolicyState):
        assert torch.equal(getattr(full_state, f.name), getattr(fast_state, f.name)), f.name
        assert torch.equal(getattr(fast_state, f.name), getattr(state, f.name)), f.name
