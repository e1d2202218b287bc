"""The canvas writer: each slot's next input canvas, its attention table and its RoPE offsets, from the block
state (docs/lifecycle.md draws the layouts).

* DRAFT / COMMIT canvas ``[block[cached:] | MASK ...]``; table = token-causal OR inside one of the lifecycle's
  bidirectional ranges (:func:`vllm_s2d2.core.block.attention_ranges`);
* VERIFY canvas ``[first half | MASK filler | mask half | filler]``: the fixed 2L table with the mask half at
  the first half's positions (position-aligned families), or token-causal (shift-aligned ones).

The attention backend's canvas kernel reads the tables (every key below the canvas is visible), so no host
work per request is needed for a decode step.
"""

from __future__ import annotations

import torch

from vllm_s2d2.core import block as lifecycle
from vllm_s2d2.core.masks import canvas_visibility
from vllm_s2d2.engine.states import COMMIT, VERIFY


def write_next(ctx, slots: torch.Tensor, next_start: torch.Tensor) -> None:
    """Write the next canvas and attention ranges of ``slots``, whose next query starts at ``next_start``
    (``ctx``: :class:`~vllm_s2d2.engine.step.StepContext`)."""
    layout, blocks = ctx.layout, ctx.blocks
    B, mask_id = layout.block_size, layout.mask_token_id
    block_start = blocks.block_start[slots]
    tokens = blocks.tokens[slots]
    phase = blocks.phase[slots]
    facts = ctx.facts.gather(slots)
    cached = (next_start - block_start).clamp(0, B)
    canvas = lifecycle.block_canvas(tokens, cached, mask_id, 2 * B)
    is_verify = phase == VERIFY
    if ctx.drafts is not None:  # (none before the first step: no slot can be verifying then)
        vcanvas = lifecycle.verify_canvas(ctx.drafts.rows["first_half"][slots], cached, mask_id)
        canvas = torch.where(is_verify[:, None], vcanvas, canvas)
    blocks.canvas[slots] = canvas
    causal_prefix = lifecycle.causal_prefix(tokens, mask_id, cached, facts.draft_ver)
    spec = lifecycle.attention_ranges(block_start, next_start, B, phase == COMMIT, facts.cache_ver, causal_prefix,
                                      is_verify)
    # A 2L verify canvas takes the fixed 2L pattern, its mask half at the first half's positions; a shifted
    # model's verify canvas is a causal pass (no ranges).
    two_l = is_verify & (not layout.shifted)
    full = torch.full_like(next_start, 2 * B)
    table = canvas_visibility(spec, next_start, full, two_l, blocks.verify_pattern)
    blocks.canvas_tables[slots] = table.to(torch.int8)
    mask_half = torch.arange(2 * B, device=slots.device)[None, :] >= B
    blocks.pos_offset[slots] = torch.where(two_l[:, None] & mask_half, -B, 0)
