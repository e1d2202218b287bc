"""Which masked positions a step commits without verification (``docs/algorithm.md``).

The commit rules take ``[R, B]`` tensors and return a bool commit mask ``[R, B]``; ``k`` is a per-request
count ``[R]``; they never loop over tokens or sync with the host.  :func:`transfer_quota` is host-side
(Python ints, once per request).
"""

from __future__ import annotations

import torch

from vllm_s2d2.s2d2_config import REMASKING

SEQUENTIAL, LOW_CONFIDENCE_STATIC, LOW_CONFIDENCE_DYNAMIC = (REMASKING.index(n) for n in REMASKING)


def transfer_quota(block_size: int, steps: int) -> list[int]:
    """Tokens to commit at each of ``steps`` denoising steps: B // S each, the first B % S get one more."""
    if steps < 1 or block_size < 1:
        raise ValueError(f"block_size ({block_size}) and steps ({steps}) must be >= 1")
    base, extra = divmod(block_size, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def top_k_positions(score: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``k[r]`` eligible positions with the highest score (ties: lower position first)."""
    s = torch.where(eligible, score.float(), torch.full_like(score, -torch.inf, dtype=torch.float32))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return eligible & (rank < k[:, None])


def first_k_positions(eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The first ``k[r]`` eligible positions, left to right (``sequential``)."""
    return eligible & (torch.cumsum(eligible.int(), dim=1) <= k[:, None])


def above_threshold_or_top_k(conf: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor,
                             threshold: torch.Tensor) -> torch.Tensor:
    """``low_confidence_dynamic``: every eligible position with conf > tau if at least k qualify, else top-k.

    A quota of 0 commits nothing (the SDAR fallback runs only while the step is short of its quota)."""
    above = eligible & (conf > threshold[:, None])
    enough = (above.sum(dim=1) >= k) & (k > 0)
    return torch.where(enough[:, None], above, top_k_positions(conf, eligible, k))


def remask_commit(rule: torch.Tensor, conf: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor,
                  threshold: torch.Tensor) -> torch.Tensor:
    """SDAR/LLaDA2 remasking rule per request (``rule`` = index into ``REMASKING``) with quota ``k``."""
    seq = first_k_positions(eligible, k)
    static = top_k_positions(conf, eligible, k)
    dynamic = above_threshold_or_top_k(conf, eligible, k, threshold)
    r = rule[:, None]
    return torch.where(r == SEQUENTIAL, seq, torch.where(r == LOW_CONFIDENCE_STATIC, static, dynamic))


def threshold_plus_argmax(conf: torch.Tensor, eligible: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM v2 rule: eligible positions with conf > tau, plus the most confident one."""
    one = torch.ones(conf.shape[0], dtype=torch.long, device=conf.device)
    return (eligible & (conf > threshold[:, None])) | top_k_positions(conf, eligible, one)


def editing_positions(draft: torch.Tensor, conf: torch.Tensor, tokens: torch.Tensor, is_mask: torch.Tensor,
                      editable: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """LLaDA2.1 T2T editing: filled, editable (non-prompt) positions whose new sample differs, conf > tau_edit.

    ``threshold`` > 1 disables editing for that request."""
    return ~is_mask & editable & (draft != tokens) & (conf > threshold[:, None])
