"""Unit tests for ``vllm_s2d2.core.estimators`` and ``vllm_s2d2.core.policies`` (docs/algorithm.md)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_s2d2.core.estimators import (HARD_ENTROPY_THRESHOLD, HARD_MARGIN_THRESHOLD, SOFT_CLIPPED_LINEAR_MARGIN,
                                       SOFT_CONFIDENCE_POWER, SOFT_ENTROPY_NEGEXP, SOFT_RENYI_2_ENTROPY,
                                       acceptance_estimate, draft_stats, expected_accepted)
from vllm_s2d2.core.policies import (CONTEXTUAL_BANDIT_UCB, DIFFERENCE_DYNAMIC, DIFFERENCE_STATIC,
                                     MASK_SPAN_LENGTH, SCORE_HYSTERESIS, SCORE_THRESHOLD, UCB_BUCKETS,
                                     PolicyState, route, score, ucb_bucket, ucb_update)
from vllm_s2d2.s2d2_config import ESTIMATORS, POLICIES, SCORES


def ft(x):
    return torch.tensor(x, dtype=torch.float32)


def lt(x):
    return torch.tensor(x, dtype=torch.long)


def bt(x):
    return torch.tensor(x, dtype=torch.bool)


# Hand-computed reference numbers for p = (0.7, 0.2, 0.1) and p = (0.5, 0.25, 0.25), V = 3:
#   H(0.7,0.2,0.1) = -(0.7 ln 0.7 + 0.2 ln 0.2 + 0.1 ln 0.1) = 0.24967 + 0.32189 + 0.23026 = 0.801819 nats
#   H / ln 3 = 0.801819 / 1.098612 = 0.729847; exp(-0.729847) = 0.481983
#   margin 0.7 - 0.2 = 0.5; Renyi-2 sum p^2 = 0.49 + 0.04 + 0.01 = 0.54
#   H(0.5,0.25,0.25) = 1.5 ln 2 = 1.039721; / ln 3 = 0.946395; margin 0.25; sum p^2 = 0.375
H1 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
H1N = H1 / math.log(3)
H2N = 1.5 * math.log(2) / math.log(3)


def test_hand_numbers_are_what_the_comment_says():
    assert H1 == pytest.approx(0.801819, abs=1e-6)
    assert H1N == pytest.approx(0.729847, abs=1e-6)
    assert math.exp(-H1N) == pytest.approx(0.481983, abs=1e-6)
    assert H2N == pytest.approx(0.946395, abs=1e-6)


def test_estimator_codes_follow_config_order():
    assert ESTIMATORS[SOFT_ENTROPY_NEGEXP] == "soft_entropy_negexp"
    assert ESTIMATORS[HARD_MARGIN_THRESHOLD] == "hard_margin_threshold"
    assert ESTIMATORS[SOFT_RENYI_2_ENTROPY] == "soft_renyi_2_entropy"
    assert ESTIMATORS[SOFT_CONFIDENCE_POWER] == "soft_confidence_power"
    assert ESTIMATORS[HARD_ENTROPY_THRESHOLD] == "hard_entropy_threshold"
    assert ESTIMATORS[SOFT_CLIPPED_LINEAR_MARGIN] == "soft_clipped_linear_margin"
    assert POLICIES[MASK_SPAN_LENGTH] == "mask_span_length"
    assert POLICIES[SCORE_THRESHOLD] == "score_threshold"
    assert POLICIES[SCORE_HYSTERESIS] == "score_hysteresis"
    assert POLICIES[CONTEXTUAL_BANDIT_UCB] == "contextual_bandit_ucb"
    assert SCORES[DIFFERENCE_STATIC] == "difference_static" and SCORES[DIFFERENCE_DYNAMIC] == "difference_dynamic"


def test_draft_stats_by_hand():
    probs = ft([[[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
    st = draft_stats(probs)
    torch.testing.assert_close(st.entropy, ft([[H1N, H2N, 0.0, 1.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.margin, ft([[0.5, 0.25, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(st.renyi2, ft([[0.54, 0.375, 1.0, 1 / 3]]), atol=1e-6, rtol=0)


def test_entropy_normalised_by_ln_of_last_dim():
    # the same distribution padded with zero-probability tokens to V = 6 is normalised by ln 6
    probs = ft([[[0.7, 0.2, 0.1, 0.0, 0.0, 0.0]]])
    st = draft_stats(probs)
    assert float(st.entropy[0, 0]) == pytest.approx(H1 / math.log(6), abs=1e-5)  # 0.447503


def _alpha(est_codes, probs, p0, **over):
    R = len(est_codes)
    kw = dict(entropy_temperature=ft([1.0] * R), margin_threshold=ft([0.05] * R),
              entropy_threshold=ft([0.1] * R), confidence_power=ft([0.8] * R), margin_coef=ft([1.0] * R))
    kw.update({k: ft(v) for k, v in over.items()})
    return acceptance_estimate(lt(est_codes), draft_stats(probs), p0, **kw)


def test_each_estimator_on_hand_distribution():
    codes = [SOFT_ENTROPY_NEGEXP, HARD_MARGIN_THRESHOLD, SOFT_RENYI_2_ENTROPY, SOFT_CONFIDENCE_POWER,
             HARD_ENTROPY_THRESHOLD, SOFT_CLIPPED_LINEAR_MARGIN]
    probs = ft([[[0.7, 0.2, 0.1]]] * 6)
    p0 = ft([[0.7]] * 6)  # drafted token = the 0.7 one
    a = _alpha(codes, probs, p0, entropy_threshold=[0.1, 0.1, 0.1, 0.1, 0.8, 0.1],
               margin_coef=[1, 1, 1, 1, 1, 1.5])
    expected = [
        math.exp(-H1N),  # 0.481983
        1.0,  # margin 0.5 > 0.05
        0.54,
        0.7 ** 0.8,  # 0.751759
        1.0,  # 0.7298 < 0.8
        0.75,  # 1.5 * 0.5
    ]
    torch.testing.assert_close(a[:, 0], ft(expected), atol=1e-5, rtol=0)


def test_estimator_parameters_and_strictness():
    probs = ft([[[0.7, 0.2, 0.1]]] * 4 + [[[0.5, 0.25, 0.25]]] * 2)
    p0 = ft([[0.7]] * 4 + [[0.25]] * 2)
    codes = [SOFT_ENTROPY_NEGEXP, HARD_ENTROPY_THRESHOLD, SOFT_CONFIDENCE_POWER, HARD_MARGIN_THRESHOLD,
             HARD_MARGIN_THRESHOLD, HARD_MARGIN_THRESHOLD]
    a = _alpha(codes, probs, p0, entropy_temperature=[2.0] * 6, entropy_threshold=[0.5] * 6,
               confidence_power=[1.0] * 6, margin_threshold=[0.05, 0.05, 0.05, 0.6, 0.25, 0.2499])
    expected = [
        math.exp(-2 * H1N),  # gamma_H = 2: 0.232310
        0.0,  # 0.7298 is not < 0.5
        0.7,  # p0 ** 1
        0.0,  # margin 0.5 not > 0.6
        0.0,  # margin exactly 0.25 is not > 0.25 (strict)
        1.0,  # 0.25 > 0.2499
    ]
    torch.testing.assert_close(a[:, 0], ft(expected), atol=1e-5, rtol=0)


def test_estimators_clamped_to_unit_interval():
    probs = ft([[[0.7, 0.2, 0.1]], [[0.5, 0.25, 0.25]]])
    a = _alpha([SOFT_CLIPPED_LINEAR_MARGIN] * 2, probs, ft([[0.7], [0.5]]), margin_coef=[4.0, 3.0])
    # 4 * 0.5 = 2 -> 1; 3 * 0.25 = 0.75 stays
    torch.testing.assert_close(a[:, 0], ft([1.0, 0.75]))
    # random distributions, every estimator: always inside [0, 1]
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(6, 5, 9, generator=g) * 3, dim=-1)
    p0 = probs.max(-1).values
    a = _alpha(list(range(6)), probs, p0, margin_coef=[50.0] * 6, entropy_temperature=[0.01] * 6)
    assert bool((a >= 0).all()) and bool((a <= 1).all())


# ----------------------------------------------------------------------------------------------------
# expected_accepted / score
# ----------------------------------------------------------------------------------------------------

def test_expected_accepted_by_hand():
    alpha = ft([[0.2, 0.9, 0.5, 0.1],      # span = positions 1, 2: 0.9 + 0.9 * 0.5 = 1.35
                [0.9, 0.5, 0.3, 0.7],      # span = 0..2: 0.9 + 0.45 + 0.135 = 1.485
                [0.9, 0.5, 0.3, 0.7],      # empty span
                [1.0, 1.0, 1.0, 1.0]])     # span 4: 4
    span = bt([[0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    k = expected_accepted(alpha, span)
    torch.testing.assert_close(k, ft([1.35, 1.485, 0.0, 4.0]), atol=1e-6, rtol=0)


def test_score_static_dynamic_and_empty_span():
    st = lt([DIFFERENCE_STATIC, DIFFERENCE_DYNAMIC, DIFFERENCE_DYNAMIC, DIFFERENCE_STATIC])
    s = score(st, k_hat=ft([1.35, 3.0, 2.5, 0.0]), n_high_conf=lt([5, 2, 0, 3]),
              penalty=ft([1.0, 1.0, 4.0, 1.0]), span_length=lt([2, 3, 3, 0]))
    # static: 1.35 - 1 = 0.35; dynamic: 3 - 1 * 2 = 1; 2.5 - 4 * 0 = 2.5; empty -> -inf
    assert s[:3].tolist() == pytest.approx([0.35, 1.0, 2.5], abs=1e-6)
    assert s[3].item() == -math.inf


# ----------------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------------

def _route(policy, s, state=None, *, active=None, span=None, bucket=None, min_span=None, thr=None,
           on=None, off=None, beta=None):
    R = len(policy)
    state = state if state is not None else PolicyState.zeros(R)
    return route(lt(policy), bt(active if active is not None else [True] * R),
                 lt(span if span is not None else [2] * R), ft(s), lt(bucket if bucket is not None else [0] * R),
                 state, min_span=lt(min_span if min_span is not None else [1] * R),
                 threshold=ft(thr if thr is not None else [0.0] * R),
                 hysteresis_on=ft(on if on is not None else [0.0] * R),
                 hysteresis_off=ft(off if off is not None else [-1.0] * R),
                 ucb_beta=ft(beta if beta is not None else [1.0] * R))


def test_route_mask_span_length():
    d, _ = _route([MASK_SPAN_LENGTH] * 4, [0.0] * 4, span=[1, 2, 3, 8], min_span=[2, 2, 4, 8])
    assert d.tolist() == [False, True, False, True]


def test_route_score_threshold_non_strict():
    d, _ = _route([SCORE_THRESHOLD] * 5, [0.0, -0.01, 5.0, -4.0, -math.inf], thr=[0.0, 0.0, 5.0, -5.0, -5.0])
    assert d.tolist() == [True, False, True, True, False]


def test_route_empty_span_never_verifies():
    d, _ = _route([MASK_SPAN_LENGTH, SCORE_THRESHOLD, SCORE_HYSTERESIS, CONTEXTUAL_BANDIT_UCB], [9.0] * 4,
                  span=[0, 0, 0, 0], min_span=[1] * 4, thr=[-9.0] * 4, on=[-9.0] * 4, off=[-10.0] * 4)
    assert d.tolist() == [False] * 4


def test_route_hysteresis_sequence_and_state_persistence():
    # tau_on = 1, tau_off = -5 (Fast Config-A).  Starts OFF.
    seq = [(1.0, False),    # off: 1.0 is not > 1 (strict)
           (1.01, True),    # off -> on
           (-5.0, True),    # on: -5 >= -5 stays on
           (0.0, True),
           (-5.01, False),  # on -> off
           (0.5, False),    # off: 0.5 not > 1 even though >= tau_off
           (2.0, True)]
    state = PolicyState.zeros(1)
    assert state.hysteresis_on.tolist() == [False]
    for s, expected in seq:
        d, state = _route([SCORE_HYSTERESIS], [s], state, on=[1.0], off=[-5.0])
        assert d.tolist() == [expected], s
        assert state.hysteresis_on.tolist() == [expected]


def test_route_hysteresis_per_row_state_in_batch():
    state = PolicyState.zeros(2)
    state.hysteresis_on = bt([True, False])
    d, new = _route([SCORE_HYSTERESIS] * 2, [0.0, 0.0], state, on=[1.0, 1.0], off=[-5.0, -5.0])
    assert d.tolist() == [True, False]
    assert new.hysteresis_on.tolist() == [True, False]


def test_route_inactive_rows_never_verify_and_keep_state():
    state = PolicyState.zeros(4)
    state.hysteresis_on = bt([True, True, False, False])
    state.ucb_t = ft([3.0, 3.0, 5.0, 5.0])
    d, new = _route([SCORE_HYSTERESIS, SCORE_HYSTERESIS, CONTEXTUAL_BANDIT_UCB, CONTEXTUAL_BANDIT_UCB],
                    [-100.0, -100.0, 0.0, 0.0], state, active=[False, True, False, True],
                    on=[1.0] * 4, off=[-5.0] * 4)
    # row 0 inactive: False, state stays on; row 1 active: -100 < -5 -> off
    # row 2 inactive UCB: no decision, t unchanged; row 3 active: t 5 -> 6, untried arms -> verify
    assert d.tolist() == [False, False, False, True]
    assert new.hysteresis_on.tolist() == [True, False, False, False]
    assert new.ucb_t.tolist() == [3.0, 3.0, 5.0, 6.0]
    # mask_span_length / score_threshold rows that are inactive do not verify either
    d, _ = _route([MASK_SPAN_LENGTH, SCORE_THRESHOLD], [10.0, 10.0], active=[False, False])
    assert d.tolist() == [False, False]


def test_route_non_hysteresis_rows_leave_hysteresis_state_alone():
    state = PolicyState.zeros(2)
    state.hysteresis_on = bt([True, False])
    _, new = _route([SCORE_THRESHOLD, MASK_SPAN_LENGTH], [-10.0, 10.0], state)
    assert new.hysteresis_on.tolist() == [True, False]
    assert new.ucb_t.tolist() == [0.0, 0.0]  # t counts UCB decisions only


# ----------------------------------------------------------------------------------------------------
# UCB
# ----------------------------------------------------------------------------------------------------

def test_ucb_bucket_by_hand():
    # span bin over [1, capacity]: int(2 * (len - 1) / (cap - 1)) clipped to 1
    # progress bin over [0, 1], entropy bin over [0, 1]; bucket = (span * 2 + prog) * 2 + ent
    cases = [
        # (span_len, capacity, progress, entropy, bucket)
        (3, 4, 0.25, 0.6, (1 * 2 + 0) * 2 + 1),  # span 2*(2/3)=1.33 -> 1; prog 0.5 -> 0; ent 1.2 -> 1 => 5
        (1, 4, 0.5, 0.49, (0 * 2 + 1) * 2 + 0),  # span 0; prog 1.0 -> 1; ent 0.98 -> 0 => 2
        (4, 4, 1.0, 1.0, 7),                     # everything at the top edge -> last bin
        (2, 4, 0.0, 0.0, 0),                     # span 2*(1/3) = 0.67 -> 0
        (1, 1, 0.75, 0.5, (0 * 2 + 1) * 2 + 1),  # degenerate span range -> bin 0; 0.5 -> bin 1 => 3
        (17, 32, 0.4, 0.2, (1 * 2 + 0) * 2 + 0),  # 2*16/31 = 1.03 -> 1 => 4
    ]
    got = ucb_bucket(lt([c[0] for c in cases]), lt([c[1] for c in cases]), ft([c[2] for c in cases]),
                     ft([c[3] for c in cases]))
    assert got.tolist() == [c[4] for c in cases]
    assert UCB_BUCKETS == 8


def test_ucb_sequence_by_hand():
    """One request, one bucket (3), beta = 1.  Rewards = committed / (1 + verified).

    t=1: both arms untried (+inf, +inf) -> tie -> verify; commits 3 -> reward 1.5 (verify: n 1, mu 1.5)
    t=2: skip untried (+inf) > 1.5 + sqrt(ln 2) = 2.33 -> skip; commits 1 -> reward 1 (skip: n 1, mu 1)
    t=3: verify 1.5 + sqrt(ln 3) = 2.548 >= skip 1 + 1.048 = 2.048 -> verify; commits 1 -> reward 0.5
         (verify: n 2, mu (1.5 + 0.5) / 2 = 1.0)
    t=4: verify 1 + sqrt(ln 4 / 2) = 1.833 < skip 1 + sqrt(ln 4) = 2.177 -> skip
    """
    state = PolicyState.zeros(1)
    b = 3
    steps = [(True, 3), (False, 1), (True, 1)]
    for t, (expected, committed) in enumerate(steps, start=1):
        d, state = _route([CONTEXTUAL_BANDIT_UCB], [0.0], state, bucket=[b])
        assert d.tolist() == [expected], t
        assert state.ucb_t.tolist() == [float(t)]
        state = ucb_update(state, lt([CONTEXTUAL_BANDIT_UCB]), bt([True]), lt([b]), d, lt([committed]))
    assert state.ucb_n[0, b].tolist() == [1.0, 2.0]
    torch.testing.assert_close(state.ucb_mu[0, b], ft([1.0, 1.0]))
    d, state = _route([CONTEXTUAL_BANDIT_UCB], [0.0], state, bucket=[b])
    assert d.tolist() == [False]
    assert state.ucb_t.tolist() == [4.0]
    # other buckets untouched
    assert float(state.ucb_n[0].sum()) == 3.0
    # beta = 0: pure means 1.0 vs 1.0 -> tie -> verify
    d, _ = _route([CONTEXTUAL_BANDIT_UCB], [0.0], state, bucket=[b], beta=[0.0])
    assert d.tolist() == [True]
    # a fresh bucket is untried again -> verify
    d, _ = _route([CONTEXTUAL_BANDIT_UCB], [0.0], state, bucket=[5])
    assert d.tolist() == [True]


def test_ucb_update_mean_and_masking():
    state = PolicyState.zeros(3)
    pol = lt([CONTEXTUAL_BANDIT_UCB, CONTEXTUAL_BANDIT_UCB, SCORE_THRESHOLD])
    bucket = lt([2, 6, 2])
    # rewards: verify 4 committed / 2 = 2; skip 3 / 1 = 3; then verify 1 / 2 = 0.5
    state = ucb_update(state, pol, bt([True, False, True]), bucket, bt([True, True, True]), lt([4, 4, 4]))
    state = ucb_update(state, pol, bt([True, True, True]), bucket, bt([False, False, False]), lt([3, 3, 3]))
    state = ucb_update(state, pol, bt([True, True, True]), bucket, bt([True, True, True]), lt([1, 1, 1]))
    # row 0: verify arm n 2, mu (2 + 0.5) / 2 = 1.25; skip arm n 1, mu 3
    assert state.ucb_n[0, 2].tolist() == [1.0, 2.0]
    torch.testing.assert_close(state.ucb_mu[0, 2], ft([3.0, 1.25]))
    # row 1: first update inactive -> verify n 1 (mu 0.5), skip n 1 (mu 3)
    assert state.ucb_n[1, 6].tolist() == [1.0, 1.0]
    torch.testing.assert_close(state.ucb_mu[1, 6], ft([3.0, 0.5]))
    # row 2 does not use UCB: nothing recorded
    assert float(state.ucb_n[2].abs().sum()) == 0.0 and float(state.ucb_mu[2].abs().sum()) == 0.0
    assert float(state.ucb_n[0].sum()) == 3.0 and float(state.ucb_n[1].sum()) == 2.0


def test_policy_state_index_and_scatter():
    state = PolicyState.zeros(3)
    state.hysteresis_on = bt([False, True, False])
    state.ucb_t = ft([1.0, 2.0, 3.0])
    sub = state.index(lt([2, 1]))
    assert sub.hysteresis_on.tolist() == [False, True] and sub.ucb_t.tolist() == [3.0, 2.0]
    sub.hysteresis_on = bt([True, False])
    sub.ucb_t = ft([7.0, 8.0])
    state.scatter_(lt([2, 1]), sub)
    assert state.hysteresis_on.tolist() == [False, False, True]
    assert state.ucb_t.tolist() == [1.0, 8.0, 7.0]
