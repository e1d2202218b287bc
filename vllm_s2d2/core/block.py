"""The block lifecycle around one S2D2 step, batched over requests (``docs/lifecycle.md``).

Pure torch over ``[R, B]`` block tensors and ``[R]`` per-request values: no loops over tokens or requests, no
host syncs, shapes fixed by ``B`` (and a canvas width), so the engine can capture them in a CUDA graph and the
reference decoder calls the same functions with R = 1.  Columns are block positions ``0 .. B-1`` (blocks are
aligned to absolute position 0); ``off [R]`` is the number of leading columns already in the KV cache (the
prompt tail of a request's first block, else 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def _cols(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device)[None, :]


def first_mask_index(tokens: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``[R]``: the column of each block's first mask, ``B`` when it has none."""
    is_mask = tokens == mask_id
    B = tokens.shape[1]
    return torch.where(is_mask.any(1), is_mask.int().argmax(1), torch.full_like(tokens[:, 0], B))


def editable_columns(block_start: torch.Tensor, prompt_len: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[R, B]`` bool: the block's generated (non-prompt) positions, ``block_start + i >= prompt_len``."""
    return (block_start[:, None] + _cols(block_size, block_start)) >= prompt_len[:, None]


def open_block(tail: torch.Tensor, off: torch.Tensor, mask_id: int,
               first: torch.Tensor | None = None) -> torch.Tensor:
    """A block as it opens ``[R, B]``: ``tail`` at the cached columns ``< off`` (the prompt tail), masks elsewhere.

    ``first [R]`` (shift-aligned models): the token at column ``off``, predicted by the previous forward's last
    logit (:func:`vllm_s2d2.core.step.shifted_next_token`); a block whose only open column it fills has no mask."""
    cols = _cols(tail.shape[1], tail)
    block = torch.where(cols < off[:, None], tail, torch.full_like(tail, mask_id))
    if first is not None:
        block = torch.where(cols == off[:, None], first[:, None].to(block.dtype), block)
    return block


def available_columns(off: torch.Tensor, num_rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[R, B]`` bool: the columns a step's canvas covers, ``i < off + num_rows`` (``num_rows`` = canvas rows
    holding this block, clamped at 0).  All columns unless the canvas was cut (at ``max_model_len``)."""
    return _cols(block_size, off) < (off + num_rows.clamp_min(0))[:, None]


def step_region(tokens: torch.Tensor, mask_id: int, sub_block: int,
                avail: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, B]`` bool: the positions a step may unmask.

    The aligned sub-block of ``sub_block`` columns holding the block's first mask (Fast-dLLM v2 decodes its
    blocks sub-block by sub-block; other families pass ``sub_block = B``: the whole block); the whole block
    when it has no mask (a LLaDA2.1 editing pass).  ``avail`` (:func:`available_columns`) limits a truncated
    canvas to the columns it covers."""
    B = tokens.shape[1]
    cols = _cols(B, tokens)
    first = first_mask_index(tokens, mask_id)
    lo = (first // sub_block * sub_block)[:, None]
    region = ((cols >= lo) & (cols < lo + sub_block)) | (first == B)[:, None]
    return region if avail is None else region & avail


def causal_prefix(tokens: torch.Tensor, mask_id: int, off: torch.Tensor, draft_ver: torch.Tensor) -> torch.Tensor:
    """``[R]``: how many query rows of a draft forward are token-causal (``draft_ver``): the block's final rows
    from ``off`` up to its first mask; 0 without ``draft_ver`` (the whole block is bidirectional)."""
    n = (first_mask_index(tokens, mask_id) - off).clamp_min(0)
    return torch.where(draft_ver, n, torch.zeros_like(n))


class PostSteps(NamedTuple):
    post: torch.Tensor  # [R] editing passes done since the block's last mask was filled
    more_edits: torch.Tensor  # [R] bool, another editing pass follows (LLaDA2.1, block without masks)
    again: torch.Tensor  # [R] bool, the block gets another draft step (masks left or more_edits)
    settled: torch.Tensor  # [R] bool, none of the block's tokens can change any more


def post_steps(post: torch.Tensor, ran: torch.Tensor, before: torch.Tensor, after: torch.Tensor, mask_id: int,
               max_post: torch.Tensor, editing: torch.Tensor) -> PostSteps:
    """Editing-pass bookkeeping after a step that took the block from ``before`` to ``after`` (``[R, B]``).

    ``post [R]``: passes counted so far on this block (0 for a block that just opened); ``ran [R]``: a step
    really ran on the block.  A step on a block without masks is an editing pass (counted); after it, or after
    the step that filled the last mask, another pass follows while fewer than ``max_post`` were done, unless
    the pass changed nothing (which ends the block).  ``editing [R]`` (T2T editing on): filled tokens may still
    change, so the block is settled only once it has no mask and no pass follows; without editing every
    filled token is final."""
    had_mask = (before == mask_id).any(1)
    has_mask = (after == mask_id).any(1)
    edit_pass = ran & ~had_mask
    changed = (after != before).any(1)
    post_n = post + edit_pass.long()
    more = ran & ~has_mask & ~(edit_pass & ~changed) & (post_n < max_post)
    settled = ~editing | (~has_mask & ~more)
    return PostSteps(post_n, more, has_mask | more, settled)


class FinalPrefix(NamedTuple):
    length: torch.Tensor  # [R] tokens from column off up to the first mask (or unavailable column)
    stop: torch.Tensor  # [R] bool, a stop token on a generated position inside it
    reach_max: torch.Tensor  # [R] bool, the outputs before it plus it reach max_tokens
    complete: torch.Tensor  # [R] bool, no mask left in the available columns


def final_prefix(tokens: torch.Tensor, mask_id: int, block_start: torch.Tensor, off: torch.Tensor,
                 prompt_len: torch.Tensor, stop_ids: torch.Tensor, max_tokens: torch.Tensor,
                 avail: torch.Tensor | None = None) -> FinalPrefix:
    """The leading run of filled tokens from ``off`` and whether it already ends the request.

    ``stop_ids [R, K]`` (padded with -1, K may be 0); ``max_tokens [R]``; outputs before column ``off`` are
    ``block_start + off - prompt_len``.  ``avail``: columns of a truncated canvas (the run stops at the first
    column it does not cover).  Tokens of the prefix are final unless T2T editing may still rewrite them
    (see :func:`early_finish`)."""
    B = tokens.shape[1]
    cols = _cols(B, tokens)
    is_mask = tokens == mask_id
    after_off = cols >= off[:, None]
    blocking = (is_mask if avail is None else is_mask | ~avail) & after_off
    end = torch.where(blocking.any(1), blocking.int().argmax(1), torch.full_like(off, B))
    length = (end - off).clamp_min(0)
    inside = after_off & (cols < end[:, None]) & editable_columns(block_start, prompt_len, B)
    stop = ((tokens[:, :, None] == stop_ids[:, None, :]).any(-1) & inside).any(1)
    reach_max = block_start + off - prompt_len + length >= max_tokens
    complete = ~(is_mask if avail is None else is_mask & avail).any(1)
    return FinalPrefix(length, stop, reach_max, complete)


def early_finish(prefix: FinalPrefix, settled: torch.Tensor, clipped: torch.Tensor | None = None) -> torch.Tensor:
    """``[R]`` bool: the final prefix ends the request now (it is emitted and the block is never committed).

    A stop token ends it at once; reaching ``max_tokens`` -- or, for a canvas cut at ``max_model_len``
    (``clipped``), decoding every available column -- ends it once the block is ``settled``
    (:func:`post_steps`).  An empty prefix never does."""
    cap = prefix.reach_max if clipped is None else prefix.reach_max | (clipped & prefix.complete)
    return (prefix.length > 0) & (prefix.stop | (cap & settled))


def block_canvas(tokens: torch.Tensor, off: torch.Tensor, mask_id: int, width: int) -> torch.Tensor:
    """``[R, width]`` DRAFT / COMMIT canvas ``[block[off:] | MASK ...]``: slot j holds column ``off + j`` for
    ``j < B - off``, masks after (a COMMIT canvas's masks are the next block's first draft)."""
    B = tokens.shape[1]
    w = _cols(width, tokens)
    src = (off[:, None] + w).clamp(max=B - 1)
    return torch.where(w < (B - off)[:, None], tokens.gather(1, src), torch.full_like(src, mask_id))


def verify_canvas(first_half: torch.Tensor, off: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``[R, 2B]`` VERIFY canvas: the draft-filled block's uncached columns at slots ``[0, B - off)``, masks
    elsewhere (the 2L mask half occupies slots ``[B, 2B - off)`` at the first half's positions)."""
    return block_canvas(first_half, off, mask_id, 2 * first_half.shape[1])


def attention_ranges(block_start: torch.Tensor, p: torch.Tensor, block_size: int, commit: torch.Tensor,
                     cache_ver: torch.Tensor, causal_prefix: torch.Tensor,
                     verify: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, 4]`` int64 ``[r1_lo, r1_hi, r2_lo, r2_hi]``: the two bidirectional ranges (absolute, inclusive; lo >=
    hi = none) added to token-causal attention for a canvas starting at position ``p``.

    DRAFT: ``[p + causal_prefix, bs + B - 1]``.  COMMIT: the committed rows ``[p, bs + B - 1]`` (none with
    ``cache_ver``: token-causal KV) and the next block's draft ``[bs + B, bs + 2B - 1]``.  VERIFY rows
    (``verify``) get none: their launch uses the 2L mask."""
    B = block_size
    end = block_start + B - 1
    none = torch.zeros_like(block_start)
    r1_lo = torch.where(commit, torch.where(cache_ver, none, p), p + causal_prefix)
    r1_hi = torch.where(commit, torch.where(cache_ver, none, end), end)
    r2_lo = torch.where(commit, block_start + B, none)
    r2_hi = torch.where(commit, block_start + 2 * B - 1, none)
    spec = torch.stack([r1_lo, r1_hi, r2_lo, r2_hi], dim=1)
    return spec if verify is None else torch.where(verify[:, None], torch.zeros_like(spec), spec)
