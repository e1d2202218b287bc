"""Unit tests for ``vllm_s2d2.core.acceptance.accept_span`` (docs/algorithm.md, verify)."""

from __future__ import annotations

import math

import torch

from vllm_s2d2.core import rng
from vllm_s2d2.core.acceptance import accept_span
from vllm_s2d2.core.sampling import sample


def ft(x):
    return torch.tensor(x, dtype=torch.float32)


def lt(x):
    return torch.tensor(x, dtype=torch.long)


def bt(x):
    return torch.tensor(x, dtype=torch.bool)


def accept(draft, p, q, span, ua, ur, *, greedy=None, gamma=None, allow=None, thr=None, keep=True):
    draft, p, q, span, ua, ur = (torch.as_tensor(x) for x in (draft, p, q, span, ua, ur))
    R = draft.shape[0]
    full = lambda v, x, dt: torch.as_tensor(x, dtype=dt) if x is not None else torch.full((R,), v, dtype=dt)  # noqa
    return accept_span(draft.long(), p.float(), q.float(), span.bool(), ua.float(), ur.float(),
                       greedy=full(False, greedy, torch.bool), ratio_tempering=full(1.0, gamma, torch.float32),
                       allow_resample=full(True, allow, torch.bool), ratio_threshold=full(-1.0, thr, torch.float32),
                       keep_rejected_draft=keep)


P = [0.5, 0.3, 0.2]
Q = [0.25, 0.5, 0.25]
# Hand numbers for drafted token 0: p = 0.5, q = 0.25 -> r = min(1, 0.25 / 0.5) = 0.5;
# gamma 2 -> 0.25; gamma 0.5 -> sqrt(0.5) = 0.7071.  Residual (q - p)+ = (0, 0.2, 0.05), normalised
# (0, 0.8, 0.2): cdf 0, 0.8, 1.0.  Drafted token 1: q / p = 0.5 / 0.3 > 1 -> r = 1.


def test_ratio_with_tempering_and_u_below_above():
    rows = [
        # (draft, gamma, u_accept, u_resample, ratio, accepted, committed token)
        (0, 1.0, 0.49, 0.7, 0.5, 1, 0),     # u < r: accept the draft
        (0, 1.0, 0.51, 0.7, 0.5, 0, 1),     # u > r: reject; residual cdf 0.8 > 0.7 -> token 1
        (0, 1.0, 0.51, 0.85, 0.5, 0, 2),    # residual, u 0.85 > 0.8 -> token 2
        (0, 2.0, 0.30, 1e-4, 0.25, 0, 1),   # gamma 2: r 0.25 < 0.3 -> reject; tiny u never hits token 0 (mass 0)
        (0, 0.5, 0.70, 0.5, math.sqrt(0.5), 1, 0),  # gamma 0.5: r 0.7071 > 0.7 -> accept
        (1, 1.0, 0.999, 0.5, 1.0, 1, 1),    # q >= p -> r = 1
        (0, 1.0, 0.50, 0.7, 0.5, 0, 1),     # u == r is a rejection (accept iff u < r)
    ]
    R = len(rows)
    v = accept([[r[0]] for r in rows], [[P]] * R, [[Q]] * R, [[True]] * R, [[r[2]] for r in rows],
               [r[3] for r in rows], gamma=[r[1] for r in rows])
    torch.testing.assert_close(v.ratio[:, 0], ft([r[4] for r in rows]), atol=1e-6, rtol=0)
    assert v.num_accepted.tolist() == [r[5] for r in rows]
    assert v.commit[:, 0].tolist() == [True] * R  # a one-token span always commits exactly one token
    assert v.tokens[:, 0].tolist() == [r[6] for r in rows]


def test_first_rejection_prefix_and_no_bonus_token():
    # span = all 4 positions; drafts 0, 1, 0, 1 under p = P, q = Q -> ratios 0.5, 1, 0.5, 1
    draft = [[0, 1, 0, 1]] * 4
    p = [[P] * 4] * 4
    q = [[Q] * 4] * 4
    ua = [[0.1, 0.9, 0.2, 0.9],    # all accepted: a = 4, commits 4 = |span| (no bonus)
          [0.1, 0.9, 0.6, 0.0],    # first rejection at 2: a = 2, commits 3 (pos 3 left masked although u < r)
          [0.9, 0.0, 0.0, 0.0],    # reject at 0: a = 0, commits 1
          [0.1, 0.99, 0.4, 0.9]]   # all accepted again
    v = accept(draft, p, q, [[True] * 4] * 4, ua, [0.7] * 4)
    assert v.num_accepted.tolist() == [4, 2, 0, 4]
    assert v.commit.tolist() == [[True] * 4, [True, True, True, False], [True, False, False, False], [True] * 4]
    assert v.tokens[0].tolist() == [0, 1, 0, 1]
    assert v.tokens[1, :3].tolist() == [0, 1, 1]  # correction at pos 2 = residual draw (u 0.7 -> token 1)
    assert v.tokens[2, 0].item() == 1
    torch.testing.assert_close(v.ratio, ft([[0.5, 1.0, 0.5, 1.0]] * 4))


def test_positions_outside_span_never_committed():
    # span = positions 1, 2 of 5; everything outside has r = 1 and u = 0 (would be accepted)
    draft = [[1, 1, 0, 1, 1], [1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    span = [[False, True, True, False, False]] * 3
    v = accept(draft, [[P] * 5] * 3, [[Q] * 5] * 3, span,
               [[0.0, 0.1, 0.1, 0.0, 0.0], [0.0, 0.9, 0.1, 0.0, 0.0], [0.0] * 5], [0.7] * 3,
               thr=[0.0, 0.0, -1.0])
    assert v.commit.tolist() == [[False, True, True, False, False],
                                 [False, True, True, False, False],  # rejected at 1; thr 0 commits 2
                                 [False, True, True, False, False]]
    assert v.num_accepted.tolist() == [2, 0, 2]
    # ratio is reported on the span only
    assert v.ratio[:, 0].tolist() == [0.0] * 3 and v.ratio[:, 3:].abs().sum().item() == 0.0


def test_empty_span_commits_nothing():
    v = accept([[0, 0]], [[P, P]], [[Q, Q]], [[False, False]], [[0.9, 0.9]], [0.5])
    assert not v.commit.any()
    assert v.num_accepted.tolist() == [0]


def test_zero_residual_falls_back_to_q():
    # p == q -> r = 1; u = 1.0 (outside [0, 1), forced here by hand) rejects; (q - p)+ = 0 -> draw from q.
    # q = P: cdf 0.5, 0.8, 1.0
    v = accept([[0], [0], [0]], [[P]] * 3, [[P]] * 3, [[True]] * 3, [[1.0]] * 3, [0.6, 0.9, 0.1])
    assert v.num_accepted.tolist() == [0, 0, 0]
    assert v.commit[:, 0].tolist() == [True] * 3
    assert v.tokens[:, 0].tolist() == [1, 2, 0]


def test_residual_uses_full_draft_distribution_at_the_rejected_position():
    # two positions with different p: the residual must use p at the *rejected* position (pos 1).
    p = [[[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]]]
    q = [[[0.9, 0.05, 0.05], [0.5, 0.25, 0.25]]]
    # pos 0: draft 0, r = 1 (accepted); pos 1: draft 2, r = 0.25 / 0.8 = 0.3125, u 0.5 -> reject.
    # residual at pos 1 = (0.4, 0.15, 0) / 0.55 -> cdf 0.727, 1.0.  u 0.7 -> 0; u 0.75 -> 1.
    for ur, tok in ((0.7, 0), (0.75, 1)):
        v = accept([[0, 2]], p, q, [[True, True]], [[0.5, 0.5]], [ur])
        torch.testing.assert_close(v.ratio, ft([[1.0, 0.3125]]))
        assert v.num_accepted.tolist() == [1]
        assert v.commit.tolist() == [[True, True]]
        assert v.tokens.tolist() == [[0, tok]]


def test_greedy_acceptance():
    # q argmax per position: 1, 1, 0, 2.  Drafts 1, 1, 2, 2 -> accept 2, correction argmax q_2 = 0.
    q = [[[0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.1, 0.1, 0.8]]] * 2
    p = [[[0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]] * 2
    v = accept([[1, 1, 2, 2]] * 2, p, q, [[True] * 4] * 2, [[0.0] * 4, [0.99] * 4], [0.99, 0.01],
               greedy=[True, True], allow=[True, False])
    # u values are irrelevant in greedy mode; allow_resample=False does not matter either
    assert v.num_accepted.tolist() == [2, 2]
    assert v.commit.tolist() == [[True, True, True, False]] * 2
    assert v.tokens[:, :3].tolist() == [[1, 1, 0]] * 2
    # draft != argmax is rejected even when q(draft) >= p(draft) (ratio 1)
    q2 = [[[0.5, 0.4, 0.1]]]
    p2 = [[[0.8, 0.1, 0.1]]]
    v = accept([[1]], p2, q2, [[True]], [[0.0]], [0.5], greedy=[True])
    assert v.ratio[0, 0].item() == 1.0
    assert v.num_accepted.tolist() == [0] and v.tokens[0, 0].item() == 0


def test_no_resample_keep_or_leave_rejected_draft():
    draft = [[0, 0, 1]] * 2
    p, q = [[P] * 3] * 2, [[Q] * 3] * 2
    ua = [[0.1, 0.9, 0.0], [0.9, 0.0, 0.0]]  # first rejection at 1 / at 0
    # SDAR --no_resample: commit the rejected draft itself
    v = accept(draft, p, q, [[True] * 3] * 2, ua, [0.7] * 2, allow=[False, False], keep=True)
    assert v.num_accepted.tolist() == [1, 0]
    assert v.commit.tolist() == [[True, True, False], [True, False, False]]
    assert v.tokens[0, :2].tolist() == [0, 0] and v.tokens[1, 0].item() == 0  # drafts, not residual draws
    # Fast-dLLM v2: leave the rejected position masked (0 commits when the first token is rejected)
    v = accept(draft, p, q, [[True] * 3] * 2, ua, [0.7] * 2, allow=[False, False], keep=False)
    assert v.num_accepted.tolist() == [1, 0]
    assert v.commit.tolist() == [[True, False, False], [False, False, False]]
    # allow_resample=True in the same batch as allow_resample=False
    v = accept(draft, p, q, [[True] * 3] * 2, ua, [0.7] * 2, allow=[True, False], keep=False)
    assert v.commit.tolist() == [[True, True, False], [False, False, False]]
    assert v.tokens[0, 1].item() == 1  # residual draw


def test_ratio_threshold_commits_later_span_tokens():
    # drafts 0, 1, 0, 1, 0 -> ratios 0.5, 1, 0.5, 1, 0.5; reject at 0 (u 0.9)
    draft = [[0, 1, 0, 1, 0]] * 4
    p, q = [[P] * 5] * 4, [[Q] * 5] * 4
    ua = [[0.9, 0.9, 0.9, 0.9, 0.9]] * 4
    span = [[True, True, True, True, False]] * 4  # position 4 outside the span
    v = accept(draft, p, q, span, ua, [0.7] * 4, thr=[-1.0, 0.6, 0.5, 0.0])
    assert v.commit.tolist() == [
        [True, False, False, False, False],  # off
        [True, True, False, True, False],    # r >= 0.6: positions with r = 1
        [True, True, True, True, False],     # r >= 0.5 (boundary inclusive)
        [True, True, True, True, False],     # thr 0 -> every later span token, still never pos 4
    ]
    assert v.tokens[1].tolist()[:4] == [1, 1, 0, 1]  # later ones keep their drafts; pos 0 resampled
    # still at most |span| commits
    assert int(v.commit.sum(1).max()) <= 4


def test_invariant_i3_random_cases():
    g = torch.Generator().manual_seed(1234)
    R, B, V = 3000, 6, 5
    p = torch.softmax(torch.randn(R, B, V, generator=g) * 2, dim=-1)
    q = torch.softmax(torch.randn(R, B, V, generator=g) * 2, dim=-1)
    draft = torch.multinomial(p.view(-1, V), 1, generator=g).view(R, B)
    start = torch.randint(0, B + 1, (R,), generator=g)
    length = (torch.rand(R, generator=g) * (B - start + 1)).long().clamp(max=B - start)
    pos = torch.arange(B)
    span = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    ua = torch.rand(R, B, generator=g)
    ur = torch.rand(R, generator=g)
    for allow, keep in ((True, True), (False, True), (False, False)):
        v = accept(draft, p, q, span, ua, ur, allow=[allow] * R, keep=keep)
        assert not (v.commit & ~span).any()
        for r in range(R):
            s0, n = int(start[r]), int(length[r])
            a = 0
            while a < n:
                i = s0 + a
                ratio = min(1.0, float(q[r, i, draft[r, i]]) / max(float(p[r, i, draft[r, i]]), 1e-12))
                if not float(ua[r, i]) < ratio:
                    break
                a += 1
            expected = min(a + 1, n) if (allow or keep) else a
            assert int(v.num_accepted[r]) == a, r
            assert int(v.commit[r].sum()) == expected, r
            # committed positions form a prefix of the span
            assert v.commit[r].tolist() == [s0 <= i < s0 + expected for i in range(B)]
            # accepted positions carry the draft
            assert torch.equal(v.tokens[r, s0:s0 + a], draft[r, s0:s0 + a])
        if allow:
            assert bool((v.commit.sum(1) >= (length > 0).long()).all())


# ----------------------------------------------------------------------------------------------------
# Speculative-sampling correctness: the first committed token is distributed as q_0 (statistical)
# ----------------------------------------------------------------------------------------------------

FALSE_ALARM = 1e-3  # per chi-square test; seeds are fixed so the outcome is deterministic


def chi2_critical_even_df(df: int, alpha: float) -> float:
    """Upper-alpha critical value of chi-square with even df, by bisection on the closed-form survival
    function sf(x) = exp(-x/2) * sum_{i < df/2} (x/2)^i / i!."""
    assert df % 2 == 0
    def sf(x):
        return math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(df // 2))
    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sf(mid) > alpha else (lo, mid)
    return (lo + hi) / 2


def chi2_stat(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


V = 5
P0 = ft([0.4, 0.3, 0.15, 0.1, 0.05])
Q0 = ft([0.1, 0.2, 0.3, 0.25, 0.15])
P1 = ft([0.05, 0.05, 0.3, 0.3, 0.3])
Q1 = ft([0.3, 0.25, 0.2, 0.15, 0.1])
CRIT = chi2_critical_even_df(V - 1, FALSE_ALARM)  # df = 4


def test_chi2_critical_value_matches_table():
    assert abs(CRIT - 18.467) < 1e-3  # chi2(4) upper 0.1% point from tables
    assert abs(chi2_critical_even_df(2, 1e-3) - 2 * math.log(1000)) < 1e-9


def _run_i2(draft, ua, ur, allow=True, keep=True):
    R = draft.shape[0]
    p = torch.stack([P0, P1])[None].expand(R, 2, V)
    q = torch.stack([Q0, Q1])[None].expand(R, 2, V)
    return accept(draft, p, q, torch.ones(R, 2, dtype=torch.bool), ua, ur, allow=[allow] * R, keep=keep)


def test_i2_first_committed_token_distributed_as_q0_torch_rng():
    R = 40000
    g = torch.Generator().manual_seed(2024)
    draft = torch.stack([torch.multinomial(P0, R, replacement=True, generator=g),
                         torch.multinomial(P1, R, replacement=True, generator=g)], dim=1)
    ua = torch.rand(R, 2, generator=g)
    ur = torch.rand(R, generator=g)
    v = _run_i2(draft, ua, ur)
    assert bool(v.commit[:, 0].all())
    assert chi2_stat(v.tokens[:, 0], Q0) < CRIT
    # the second span token, when committed (position 0 accepted), is distributed as q_1
    second = v.tokens[v.commit[:, 1], 1]
    assert second.numel() > 5000
    assert chi2_stat(second, Q1) < CRIT
    # power check: SDAR --no_resample commits the rejected draft, so the first token follows p_0 -> rejected
    v_bad = _run_i2(draft, ua, ur, allow=False, keep=True)
    assert chi2_stat(v_bad.tokens[:, 0], Q0) > 10 * CRIT


def test_i2_with_library_rng_and_sampler():
    # drafts drawn by core.sampling.sample with core.rng uniforms (the engine path), seeds = row ids
    R = 30000
    seeds = torch.arange(R, dtype=torch.long) + 77
    counter = torch.zeros(R, dtype=torch.long)
    p = torch.stack([P0, P1])[None].expand(R, 2, V).contiguous()
    draft, p0 = sample(p, torch.zeros(R, dtype=torch.bool), rng.uniform(seeds, counter, rng.STREAM_DRAFT, 2))
    torch.testing.assert_close(p0, p.gather(-1, draft[..., None]).squeeze(-1))
    assert chi2_stat(draft[:, 0], P0) < CRIT  # the sampler itself draws from p
    v = _run_i2(draft, rng.uniform(seeds, counter, rng.STREAM_ACCEPT, 2),
                rng.uniform(seeds, counter, rng.STREAM_RESAMPLE, 1)[:, 0])
    assert chi2_stat(v.tokens[:, 0], Q0) < CRIT
    assert chi2_stat(v.tokens[v.commit[:, 1], 1], Q1) < CRIT
