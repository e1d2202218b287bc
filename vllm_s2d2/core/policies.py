"""Routing policies: verify this step or not (docs/algorithm.md, routing policies).

Per-request state (hysteresis switch, UCB statistics) lives in :class:`PolicyState` and persists across
blocks of a request.  All requests are decided at once; each row uses its own policy index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_s2d2.s2d2_config import POLICIES, SCORES

MASK_SPAN_LENGTH, SCORE_THRESHOLD, SCORE_HYSTERESIS, CONTEXTUAL_BANDIT_UCB = range(len(POLICIES))
DIFFERENCE_STATIC, DIFFERENCE_DYNAMIC = range(len(SCORES))

UCB_BINS = 2  # bins per context feature: span length, block progress, span entropy
UCB_BUCKETS = UCB_BINS ** 3
SKIP_ARM, VERIFY_ARM = 0, 1


@dataclass
class PolicyState:
    """Per-request routing state; rows are requests."""

    hysteresis_on: torch.Tensor  # [R] bool, starts False
    ucb_t: torch.Tensor  # [R] float, decisions made so far
    ucb_n: torch.Tensor  # [R, buckets, 2] pulls per (bucket, arm)
    ucb_mu: torch.Tensor  # [R, buckets, 2] mean reward per (bucket, arm)

    @classmethod
    def zeros(cls, num_requests: int, device: torch.device | str = "cpu") -> "PolicyState":
        z = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        return cls(torch.zeros(num_requests, dtype=torch.bool, device=device), z(num_requests),
                   z(num_requests, UCB_BUCKETS, 2), z(num_requests, UCB_BUCKETS, 2))

    def index(self, rows: torch.Tensor) -> "PolicyState":
        return PolicyState(self.hysteresis_on[rows], self.ucb_t[rows], self.ucb_n[rows], self.ucb_mu[rows])

    def scatter_(self, rows: torch.Tensor, other: "PolicyState") -> None:
        self.hysteresis_on[rows] = other.hysteresis_on
        self.ucb_t[rows] = other.ucb_t
        self.ucb_n[rows] = other.ucb_n
        self.ucb_mu[rows] = other.ucb_mu


def score(score_type: torch.Tensor, k_hat: torch.Tensor, n_high_conf: torch.Tensor, penalty: torch.Tensor,
          span_length: torch.Tensor) -> torch.Tensor:
    """s = K-hat - c (static) or K-hat - c * N_hc (dynamic); -inf for an empty span."""
    s = torch.where(score_type == DIFFERENCE_STATIC, k_hat - penalty, k_hat - penalty * n_high_conf.float())
    return torch.where(span_length > 0, s, torch.full_like(s, -torch.inf))


def _bin(value: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float) -> torch.Tensor:
    """min(n - 1, int(n * (v - lo) / (hi - lo))) with n = 2 bins; a degenerate range gives bin 0."""
    hi = hi.float() if isinstance(hi, torch.Tensor) else torch.full_like(value, hi, dtype=torch.float32)
    width = hi - lo  # (a Python float becomes a device tensor without a host-to-device copy)
    frac = torch.where(width > 0, (value.float() - lo) / width.clamp_min(1e-12), torch.zeros_like(value.float()))
    return (UCB_BINS * frac).floor().clamp(0, UCB_BINS - 1).long()


def ucb_bucket(span_length: torch.Tensor, span_capacity: torch.Tensor, progress: torch.Tensor,
               entropy: torch.Tensor) -> torch.Tensor:
    """Context bucket: (span_bin * P + progress_bin) * E + entropy_bin.

    span length over [1, capacity] (block, or sub-block for Fast-dLLM v2), block progress (committed / B)
    over [0, 1], mean normalised entropy over [0, 1]."""
    return ((_bin(span_length, 1.0, span_capacity.float()) * UCB_BINS + _bin(progress, 0.0, 1.0)) * UCB_BINS
            + _bin(entropy, 0.0, 1.0))


def route(policy: torch.Tensor, active: torch.Tensor, span_length: torch.Tensor, s: torch.Tensor,
          bucket: torch.Tensor, state: PolicyState, *, min_span: torch.Tensor, threshold: torch.Tensor,
          hysteresis_on: torch.Tensor, hysteresis_off: torch.Tensor,
          ucb_beta: torch.Tensor) -> tuple[torch.Tensor, PolicyState]:
    """Decide for every request whose row is ``active`` (a draft step with a non-empty span).

    * ``mask_span_length``: verify iff |span| >= tau_span
    * ``score_threshold``: verify iff s >= tau
    * ``score_hysteresis``: on -> verify iff s >= tau_off; off -> verify iff s > tau_on; then on = verify
    * ``contextual_bandit_ucb``: t += 1; arm score = +inf if untried else mu + beta * sqrt(ln t / n);
      verify iff score(verify) >= score(skip)

    Returns the decision ``[R]`` (False on inactive rows) and the new state (changed on active rows only;
    ``draft_step`` marks a row active only when it has a span, so a step with an empty span keeps the
    hysteresis switch, where the LLaDA2 reference turns it off: docs/deviations.md).
    """
    by_span = span_length >= min_span
    by_threshold = s >= threshold
    by_hysteresis = torch.where(state.hysteresis_on, s >= hysteresis_off, s > hysteresis_on)

    t = state.ucb_t + active.float()
    n = state.ucb_n.gather(1, bucket[:, None, None].expand(-1, 1, 2)).squeeze(1)  # [R, 2]
    mu = state.ucb_mu.gather(1, bucket[:, None, None].expand(-1, 1, 2)).squeeze(1)
    bonus = ucb_beta[:, None] * torch.sqrt(torch.log(t.clamp_min(1.0))[:, None] / n.clamp_min(1.0))
    arm_score = torch.where(n > 0, mu + bonus, torch.full_like(mu, torch.inf))
    by_ucb = arm_score[:, VERIFY_ARM] >= arm_score[:, SKIP_ARM]

    decision = torch.stack([by_span, by_threshold, by_hysteresis, by_ucb]).gather(0, policy[None, :]).squeeze(0)
    decision = decision & active & (span_length > 0)
    uses_hysteresis = active & (policy == SCORE_HYSTERESIS)
    new_on = torch.where(uses_hysteresis, decision, state.hysteresis_on)
    uses_ucb = active & (policy == CONTEXTUAL_BANDIT_UCB)
    new_t = torch.where(uses_ucb, t, state.ucb_t)
    return decision, PolicyState(new_on, new_t, state.ucb_n, state.ucb_mu)


def ucb_update(state: PolicyState, policy: torch.Tensor, active: torch.Tensor, bucket: torch.Tensor,
               verified: torch.Tensor, committed: torch.Tensor) -> PolicyState:
    """Reward = tokens committed this step (fallback included) / cost (2 forwards if verified, else 1)."""
    upd = active & (policy == CONTEXTUAL_BANDIT_UCB)
    arm = verified.long()
    reward = committed.float() / (1.0 + verified.float())
    flat = bucket * 2 + arm  # [R]
    n = state.ucb_n.flatten(1)
    mu = state.ucb_mu.flatten(1)
    n_old = n.gather(1, flat[:, None]).squeeze(1)
    mu_old = mu.gather(1, flat[:, None]).squeeze(1)
    n_new = n_old + 1.0
    mu_new = mu_old + (reward - mu_old) / n_new
    n = n.scatter(1, flat[:, None], torch.where(upd, n_new, n_old)[:, None])
    mu = mu.scatter(1, flat[:, None], torch.where(upd, mu_new, mu_old)[:, None])
    return PolicyState(state.hysteresis_on, state.ucb_t, n.view_as(state.ucb_n), mu.view_as(state.ucb_mu))
