"""Token-acceptance estimators alpha_i and the expected accepted length K-hat (docs/algorithm.md).

Every quantity comes from the *draft* distribution of each position (the same sampling transform as the
verifier's q), never from the verifier.  ``probs``: fp32 ``[R, B, V]``; V is the full vocabulary size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from vllm_s2d2.core import reductions
from vllm_s2d2.s2d2_config import ESTIMATORS

(SOFT_ENTROPY_NEGEXP, HARD_MARGIN_THRESHOLD, SOFT_RENYI_2_ENTROPY, SOFT_CONFIDENCE_POWER,
 HARD_ENTROPY_THRESHOLD, SOFT_CLIPPED_LINEAR_MARGIN) = range(len(ESTIMATORS))


class DraftStats(NamedTuple):
    entropy: torch.Tensor  # [R, B] H / ln V in [0, 1]
    margin: torch.Tensor  # [R, B] p_(1) - p_(2)
    renyi2: torch.Tensor  # [R, B] sum_v p^2


def draft_stats(probs: torch.Tensor) -> DraftStats:
    """Entropy, top-2 margin and Renyi-2 sum of every position.  Each is a pass over the full vocabulary, so each
    is one op with at most one ``[R, B, V]`` temporary (``entr`` is -p ln p, 0 at p = 0; ``vecdot`` reduces
    without one)."""
    V = probs.shape[-1]
    entropy, collision = reductions.entropy_and_collision(probs)
    top2 = probs.topk(2, dim=-1).values
    return DraftStats(entropy / math.log(V), top2[..., 0] - top2[..., 1], collision)


def acceptance_estimate(estimator: torch.Tensor, stats: DraftStats, p0: torch.Tensor, *,
                        entropy_temperature: torch.Tensor, margin_threshold: torch.Tensor,
                        entropy_threshold: torch.Tensor, confidence_power: torch.Tensor,
                        margin_coef: torch.Tensor) -> torch.Tensor:
    """alpha ``[R, B]`` in [0, 1] for each request's estimator (index into ``ESTIMATORS``).

    ==============================  =====================================
    soft_entropy_negexp             exp(-gamma_H * H / ln V)
    hard_margin_threshold           1[p_(1) - p_(2) > m]
    soft_renyi_2_entropy            sum_v p_v^2
    soft_confidence_power           p0 ** k    (p0 = drafted token's prob)
    hard_entropy_threshold          1[H / ln V < t]
    soft_clipped_linear_margin      clip(coef * margin, 0, 1)
    ==============================  =====================================
    """
    col = lambda t: t[:, None]  # noqa: E731  per-request knob against [R, B]
    candidates = torch.stack([
        torch.exp(-col(entropy_temperature) * stats.entropy),
        (stats.margin > col(margin_threshold)).float(),
        stats.renyi2,
        p0.clamp_min(0.0) ** col(confidence_power),
        (stats.entropy < col(entropy_threshold)).float(),
        (col(margin_coef) * stats.margin),
    ])  # [E, R, B]
    alpha = candidates.gather(0, estimator[None, :, None].expand(1, *stats.entropy.shape)).squeeze(0)
    return alpha.clamp(0.0, 1.0)


def expected_accepted(alpha: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """K-hat = sum_{k=1}^{|span|} prod_{i<=k} alpha_i over the span positions (``span`` bool [R, B])."""
    a = torch.where(span, alpha, torch.ones_like(alpha))
    return reductions.row_sum(reductions.cumprod(a) * span)
