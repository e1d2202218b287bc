"""Speculative acceptance of a drafted span against the AR verifier (docs/algorithm.md, verify).

For span positions i (left to right): r_i = min(1, (q_i(x_i) / p_i(x_i))^gamma), accept iff U_i < r_i.
At the first rejection j: commit a token drawn from norm((q_j - p_j)+) with the *full* draft distribution
p_j (falling back to q_j when the residual has no mass); never a bonus token past the span.  Greedy
acceptance: accept iff x_i = argmax q_i, correction = argmax q_j.

Committed per verification = min(a + 1, |span|), a = accepted prefix length.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_s2d2.core import reductions
from vllm_s2d2.core.sampling import categorical

P_FLOOR = 1e-12


class Verdict(NamedTuple):
    commit: torch.Tensor  # [R, B] bool: positions this verification commits
    tokens: torch.Tensor  # [R, B] tokens at committed positions (draft, or the correction)
    num_accepted: torch.Tensor  # [R] accepted draft prefix length a
    ratio: torch.Tensor  # [R, B] r_i (0 outside the span)


def accept_span(draft: torch.Tensor, p: torch.Tensor, q: torch.Tensor, span: torch.Tensor,
                u_accept: torch.Tensor, u_resample: torch.Tensor, *, greedy: torch.Tensor,
                ratio_tempering: torch.Tensor, allow_resample: torch.Tensor, ratio_threshold: torch.Tensor,
                keep_rejected_draft: bool, min_draft_confidence: torch.Tensor | None = None,
                resample_min_q: torch.Tensor | None = None,
                partial_accept_run: torch.Tensor | None = None) -> Verdict:
    """Accept/reject the drafted ``span`` positions of each request.

    draft ``[R, B]`` drafted tokens; p / q fp32 ``[R, B, V]`` draft / verifier distributions (same transform);
    span bool ``[R, B]``; u_accept ``[R, B]`` and u_resample ``[R]`` uniforms; greedy / allow_resample
    bool ``[R]``; ratio_tempering (gamma), ratio_threshold ``[R]`` (>= 0 also commits later span tokens
    with r >= it).  ``keep_rejected_draft``: without resampling, SDAR commits the rejected draft
    (True), Fast-dLLM v2 leaves it masked (False).

    D2F knobs (``docs/plans/d2f.md`` §2), each ``[R]``, None = off for every row (the result is then exactly
    the plain rule): ``min_draft_confidence`` -- a position is accepted only if also ``p(x_i) > it`` (negative =
    off for the row); ``resample_min_q`` -- the first rejection j is resampled only if also ``q(x_j) >= it``
    (x_j the rejected draft), else it stays masked unless ``keep_rejected_draft`` (greedy rows included);
    ``partial_accept_run`` n -- after j, every run of >= n consecutive accepted span positions is committed too
    with its drafts (0 = off for the row; the caller passes 0 on a request's first step).
    """
    R, B, V = p.shape
    pos = torch.arange(B, device=draft.device)
    p_tok = p.gather(-1, draft[..., None]).squeeze(-1).clamp_min(P_FLOOR)
    q_tok = q.gather(-1, draft[..., None]).squeeze(-1)
    ratio = torch.clamp((q_tok / p_tok) ** ratio_tempering[:, None], max=1.0)
    q_argmax = q.argmax(dim=-1)
    accepted_here = torch.where(greedy[:, None], draft == q_argmax, u_accept < ratio)
    if min_draft_confidence is not None:
        p_draft = p.gather(-1, draft[..., None]).squeeze(-1)
        accepted_here = accepted_here & (p_draft > min_draft_confidence[:, None])

    rejected = span & ~accepted_here
    j = torch.where(rejected.any(dim=1), rejected.int().argmax(dim=1), torch.full((R,), B, device=draft.device))
    accepted = span & (pos[None, :] < j[:, None])
    at_j = span & (pos[None, :] == j[:, None])

    jj = j.clamp(max=B - 1)[:, None, None].expand(R, 1, V)
    q_j = q.gather(1, jj).squeeze(1)
    p_j = p.gather(1, jj).squeeze(1)
    residual = (q_j - p_j).clamp_min(0.0)
    mass = reductions.row_sum(residual)[:, None]
    use_residual = (mass > 0) & torch.isfinite(mass)
    resampled = categorical(torch.where(use_residual, residual, q_j), u_resample)
    correction = torch.where(greedy, q_argmax.gather(1, j.clamp(max=B - 1)[:, None]).squeeze(1), resampled)

    resample = greedy | allow_resample
    if resample_min_q is not None:
        resample = resample & (q_tok.gather(1, j.clamp(max=B - 1)[:, None]).squeeze(1) >= resample_min_q)
    fill_j = at_j & (resample[:, None] | keep_rejected_draft)
    j_token = torch.where(resample, correction, draft.gather(1, j.clamp(max=B - 1)[:, None]).squeeze(1))

    late = span & (pos[None, :] > j[:, None]) & (ratio_threshold[:, None] >= 0) & ~greedy[:, None] \
        & (ratio >= ratio_threshold[:, None])
    commit = accepted | fill_j | late
    if partial_accept_run is not None:
        commit = commit | _long_runs(span & accepted_here & (pos[None, :] > j[:, None]), partial_accept_run)
    tokens = torch.where(at_j, j_token[:, None], draft)
    return Verdict(commit, tokens, accepted.sum(dim=1), torch.where(span, ratio, torch.zeros_like(ratio)))


def _long_runs(flags: torch.Tensor, min_run: torch.Tensor) -> torch.Tensor:
    """``[R, B]`` bool: positions of ``flags`` inside a run of >= ``min_run [R]`` consecutive True (0 = none)."""
    R, B = flags.shape
    pos = torch.arange(B, device=flags.device).expand(R, B)
    last_gap = torch.where(flags, torch.full_like(pos, -1), pos).cummax(dim=1).values  # last False at or before
    next_gap = B - 1 - torch.where(flags, torch.full_like(pos, -1), B - 1 - pos).flip(1).cummax(dim=1).values.flip(1)
    run = next_gap - last_gap - 1  # length of the run holding each True position
    return flags & (min_run[:, None] > 0) & (run >= min_run[:, None])
