"""The canvas writer: each slot's next input canvas and attention ranges, from its block state
(docs/lifecycle.md draws the layouts).

* DRAFT / COMMIT canvas ``[block[cached:] | MASK ...]``; ranges ``[r1_lo, r1_hi, r2_lo, r2_hi]`` (absolute,
  inclusive; lo >= hi means none) that :mod:`.attention` hands to the Triton kernel as bidirectional ranges;
* VERIFY canvas: the 2L layout ``[first half | MASK filler | mask half | filler]`` (no ranges: the verify
  launch of the attention backend masks these rows itself).
"""

from __future__ import annotations

import torch

from vllm_s2d2.core import block as lifecycle
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
    blocks.attn_spec[slots] = spec.to(torch.int32)
