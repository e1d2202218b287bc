"""The canvas writer: each slot's next input canvas and attention ranges, from its block state
(docs/lifecycle.md draws the layouts).

* DRAFT / COMMIT canvas ``[block[cached:] | MASK ...]``; ranges ``[r1_lo, r1_hi, r2_lo, r2_hi]`` (absolute,
  inclusive; lo >= hi means none) that :mod:`.attention` hands to the Triton kernel as bidirectional ranges;
* VERIFY canvas: the 2L layout ``[first half | MASK filler | mask half | filler]`` (no ranges: the verify
  launch of the attention backend masks these rows itself).
"""

from __future__ import annotations

import torch

from vllm_s2d2.engine.states import COMMIT, VERIFY


def verify_canvas(first_half: torch.Tensor, cached: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``[R, 2B]`` canvas: the first half's uncached part at slots ``[0, B - cached)``, masks elsewhere."""
    R, B = first_half.shape
    w = torch.arange(2 * B, device=first_half.device)
    src = (cached[:, None] + w[None, :]).clamp(max=B - 1)
    return torch.where(w[None, :] < (B - cached)[:, None], first_half.gather(1, src), torch.full_like(src, mask_id))


def write_next(ctx, slots: torch.Tensor, next_start: torch.Tensor) -> None:
    """Write the next canvas and attention ranges of ``slots``, whose next query starts at ``next_start``
    (``ctx``: :class:`~vllm_s2d2.engine.step.StepContext`)."""
    layout, blocks = ctx.layout, ctx.blocks
    B, mask_id = layout.block_size, layout.mask_token_id
    block_start = blocks.block_start[slots]
    tokens = blocks.tokens[slots]
    phase = blocks.phase[slots]
    facts = ctx.facts.gather(slots)
    wcols = torch.arange(2 * B, device=slots.device)[None, :]
    cached = (next_start - block_start).clamp(0, B)
    src = (cached[:, None] + wcols).clamp(max=B - 1)
    canvas = torch.where(wcols < (B - cached)[:, None], tokens.gather(1, src), torch.full_like(src, mask_id))
    is_verify = phase == VERIFY
    if ctx.drafts is not None:  # (none before the first step: no slot can be verifying then)
        canvas = torch.where(is_verify[:, None], verify_canvas(ctx.drafts.rows["first_half"][slots], cached,
                                                               mask_id), canvas)
    blocks.canvas[slots] = canvas

    is_mask = tokens == mask_id
    first_mask = torch.where(is_mask.any(1), is_mask.int().argmax(1), torch.full_like(cached, B))
    causal_prefix = torch.where(facts.draft_ver, (first_mask - cached).clamp_min(0), torch.zeros_like(cached))
    block_end = block_start + B - 1
    none = torch.zeros_like(block_start)
    is_commit = phase == COMMIT
    r1_lo = torch.where(is_commit, torch.where(facts.cache_ver, none, next_start), next_start + causal_prefix)
    r1_hi = torch.where(is_commit, torch.where(facts.cache_ver, none, block_end), block_end)
    r2_lo = torch.where(is_commit, block_start + B, none)
    r2_hi = torch.where(is_commit, block_start + 2 * B - 1, none)
    spec = torch.stack([r1_lo, r1_hi, r2_lo, r2_hi], dim=1)
    blocks.attn_spec[slots] = torch.where(is_verify[:, None], torch.zeros_like(spec), spec).to(torch.int32)
