"""One decode step of the pipelined family D2F: a window of up to A blocks per request (docs/plans/d2f.md).

The engine twin of :class:`vllm_s2d2.reference.d2f.PipelinedRequest`: every decision is made by
``core.pipeline`` and ``core.step``; this module reads each request's rows out of the canvas logits, emits what
the canvas committed and writes the next canvas.  Two canvases (``blocks.phase``):

* DRAFT ``[TO_CACHE blocks | ACTIVE blocks | filler]``: the forward writes the TO_CACHE blocks' KV (their tokens
  are emitted, so vLLM keeps exactly that KV) and drafts every mask of the ACTIVE blocks;
* VERIFY over the uncached window with the drafts filled in: ``[window | window of MASK]`` under the 2L pattern
  (position-aligned LLaDA, mask half at the first half's positions) or the window alone, token-causal
  (shift-aligned Dream, whose first logit is the carried one).

Static shapes and no host syncs, like :mod:`.step`.  The width is ``AB = A·B`` window columns; the canvas is
``AB`` (Dream) or ``2·AB`` (LLaDA) slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_s2d2.core import pipeline
from vllm_s2d2.core.step import BlockState, draft_step, finish_step, verify_step
from vllm_s2d2.engine.buffer_utils import gather_rows
from vllm_s2d2.engine.draft_store import DraftStore
from vllm_s2d2.engine.states import (DRAFT, VERIFY, BlockLayout, BlockStates, RequestFacts, WindowStates,
                                     pick_policy, pick_rows)
from vllm_s2d2.engine.step import StepBatch, StepFlags, count_step, keep_before_verify
from vllm_s2d2.engine.step_params import PackedStepParams


class WindowContext(NamedTuple):
    """The engine state a pipelined step reads and writes."""

    layout: BlockLayout  # block_size = A·B (the window as one block), rules.pipelined
    block_size: int  # B
    blocks: BlockStates  # phase, rng counter, policy, counters, canvas / table / RoPE offsets
    window: WindowStates
    facts: RequestFacts
    params: PackedStepParams
    drafts: DraftStore | None


def _window_rows(tokens_shape, device) -> torch.Tensor:
    R, A, B = tokens_shape
    return torch.arange(A * B, device=device)[None, :].expand(R, A * B)


def decode_window_step(ctx: WindowContext, batch: StepBatch, flags: StepFlags
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(tokens [R, W] emitted first, num_emitted [R] int32, num_rejected [R] int32)``."""
    layout, blocks, B = ctx.layout, ctx.blocks, ctx.block_size
    mask_id, shifted = layout.mask_token_id, layout.shifted
    logits, slots, start, query_len, row0 = batch.logits, batch.slots, batch.start, batch.query_len, \
        batch.logits_row0
    window = ctx.window.gather(slots)
    R, A, _ = window.tokens.shape
    AB = A * B
    W = blocks.canvas.shape[1]
    cols = _window_rows(window.tokens.shape, slots.device)
    phase = blocks.phase[slots]
    rng_counter = blocks.rng_counter[slots]
    facts = ctx.facts.gather(slots)
    params = ctx.params.gather(slots, flags.top_k, flags.top_p)
    policy = blocks.policy.index(slots)
    is_verify = phase == VERIFY

    # -- DRAFT canvas: write the TO_CACHE blocks, draft the ACTIVE ones --------------------------------------
    n_cache = (window.status == pipeline.TO_CACHE).sum(1)
    n_occupied = (window.status != pipeline.EMPTY).sum(1)
    cache_rows = n_cache * B
    draft_ok = ~is_verify & (query_len >= torch.minimum(n_occupied * B, layout.max_model_len - start))
    emitted_cache = torch.where(draft_ok, cache_rows, torch.zeros_like(cache_rows))
    carried = ctx.window.carried[slots] if shifted else None
    if shifted:  # the raw logit of the last row written to the cache (this canvas's, when it wrote one)
        last_row = (row0 + cache_rows - 1).clamp(0, max(logits.shape[0] - 1, 0))
        carried = torch.where((draft_ok & (n_cache > 0))[:, None], logits[last_row].to(carried.dtype), carried)
    shifted_window = pipeline.shift_window(window, mask_id).window
    drafted = _pick_window(draft_ok, shifted_window, window)
    n_active = n_occupied - n_cache
    L = n_active * B  # uncached window columns (a verify's span lies in them)
    verify_rows = L if shifted else AB + L  # rows a verify canvas needs: causal pass, or 2L up to the mask half's L
    block_logits = _window_logits(logits, row0 + cache_rows, cols, L, shifted, carried)

    flat = drafted.tokens.view(R, AB)
    state = BlockState(flat, torch.ones_like(flat, dtype=torch.bool),
                       pipeline.masked_in_active(drafted, mask_id).view(R, AB),
                       torch.zeros_like(rng_counter), rng_counter, window=drafted)
    draft, policy_drafted = draft_step(block_logits, state, params, layout.rules, policy, route_any=flags.verify,
                                       any_sampled=flags.sampled)
    fits = start + cache_rows + verify_rows <= layout.max_model_len
    starts_verify = draft_ok & draft.do_verify & fits
    draft.do_verify = starts_verify
    result, policy_finished = finish_step(state, draft, None, None, None, params, policy_drafted,
                                           route_any=flags.verify)
    if flags.verify:  # (otherwise no row starts a verification: nothing to keep)
        ctx.drafts.save(slots, starts_verify, draft, block_logits, rng_counter, torch.zeros_like(rng_counter))
        keep_before_verify(blocks, slots, policy, starts_verify)
    committed = draft_ok & ~starts_verify
    after_draft = _commit(drafted, result, committed, facts.stop_ids, mask_id)
    policy_next = pick_policy(policy, policy_finished, committed)
    policy_next = pick_policy(policy_next, policy_drafted, starts_verify)

    # -- VERIFY canvas ------------------------------------------------------------------------------------
    num_accepted = torch.zeros_like(start)
    verify_ok = is_verify & (query_len >= verify_rows)
    new_window = _pick_window(draft_ok, after_draft, window)
    if flags.verifying:  # (otherwise no row is in VERIFY)
        vdraft = ctx.drafts.load(slots, params, layout.rules)
        q_logits = _window_logits(logits, row0 + (0 if shifted else AB), cols, L, shifted, carried)
        v_commit, v_tokens, v_acc = verify_step(vdraft, q_logits, params, layout.rules, ctx.drafts.counter[slots],
                                                window=window)
        vstate = BlockState(window.tokens.view(R, AB), torch.ones_like(v_commit), torch.ones_like(v_commit),
                            torch.zeros_like(rng_counter), rng_counter, window=window)
        vresult, v_policy = finish_step(vstate, vdraft, v_commit, v_tokens, v_acc, params, policy)
        after_verify = _commit(window, vresult, verify_ok, facts.stop_ids, mask_id)
        new_window = _pick_window(verify_ok, after_verify, new_window)
        policy_next = pick_policy(policy_next, v_policy, verify_ok)
        num_accepted = vresult.num_accepted
    blocks.policy.scatter_(slots, policy_next)
    committed_any = committed | verify_ok

    # -- early finish, then the next window (add / activate) -------------------------------------------------
    next_start = start + emitted_cache
    prefix = pipeline.window_final_prefix(new_window, mask_id, facts.stop_ids)
    done = next_start - facts.prompt_len
    cap = torch.minimum(facts.max_tokens, layout.max_model_len - facts.prompt_len)
    finish = committed_any & ((prefix.stop & (done + prefix.first_stop < cap))
                              | (done + prefix.length >= cap))
    grown = pipeline.activate(pipeline.add_block(new_window, params.block_add_threshold,
                                                 ctx.window.max_blocks[slots], mask_id),
                              params.decoded_token_threshold, mask_id)
    grown = clip_to_limit(grown, next_start, layout.max_model_len)
    new_window = _pick_window(committed_any & ~finish, grown, new_window)
    ctx.window.scatter(slots, new_window)
    if shifted:
        ctx.window.carried[slots] = carried

    num_emitted = emitted_cache + torch.where(finish, torch.minimum(prefix.length, cap - done), 0)
    # Emitted tokens from position `start`: the TO_CACHE blocks, then the window's final prefix.
    emit_row = torch.cat([window.tokens.view(R, AB), after_draft.tokens.view(R, AB)], dim=1)
    emit_idx = torch.arange(W, device=slots.device)[None, :].expand(R, W)
    src = torch.where(emit_idx < cache_rows[:, None], emit_idx, AB + emit_idx - cache_rows[:, None])
    out_row = torch.where(is_verify[:, None], new_window.tokens.view(R, AB).gather(1, emit_idx.clamp(max=AB - 1)),
                          emit_row.gather(1, src.clamp(max=2 * AB - 1)))

    blocks.rng_counter[slots] = rng_counter + (draft_ok & (n_active > 0)).long()  # one value per drafting step
    stay = starts_verify | (is_verify & ~verify_ok)  # a verify that did not fit the budget is retried
    blocks.phase[slots] = torch.where(stay, VERIFY, DRAFT)
    count_step(blocks, ctx.drafts, batch, draft_ok, verify_ok, num_accepted, draft_ok & (n_cache > 0))
    write_window_next(ctx, slots, next_start)
    return out_row, num_emitted.to(torch.int32), (query_len - num_emitted).to(torch.int32)


PAST_LIMIT = -2  # window columns at or past max_model_len (never drafted, never emitted, never a stop id)


def clip_to_limit(window: pipeline.Window, window_start: torch.Tensor, max_model_len: int) -> pipeline.Window:
    """Mark the masked columns of occupied blocks at positions ``>= max_model_len`` (the window starts at
    ``window_start [R]``) as :data:`PAST_LIMIT`: the last block before the limit decodes only the columns that fit,
    so the request can end exactly at ``max_model_len`` (vLLM's stop)."""
    R, A, B = window.tokens.shape
    pos = window_start[:, None, None] + torch.arange(A * B, device=window_start.device).view(1, A, B)
    past = (pos >= max_model_len) & (window.status != pipeline.EMPTY)[:, :, None]
    return window._replace(tokens=torch.where(past, torch.full_like(window.tokens, PAST_LIMIT), window.tokens))


def _pick_window(keep: torch.Tensor, new: pipeline.Window, old: pipeline.Window) -> pipeline.Window:
    """Per row: ``new`` where ``keep``, else ``old``."""
    return pipeline.Window(*(pick_rows(keep, a, b) for a, b in zip(new, old)))


def _commit(window: pipeline.Window, result, ok: torch.Tensor, stop_ids: torch.Tensor, mask_id: int
            ) -> pipeline.Window:
    """The window after a step's commit (rows where ``ok``), with finished blocks marked TO_CACHE."""
    R, A, B = window.tokens.shape
    committed = result.committed.view(R, A, B) & ok[:, None, None]
    w = pipeline.apply_commit(window, committed, result.tokens.view(R, A, B), stop_ids)
    return pipeline.mark_to_cache(w, mask_id)


def _window_logits(logits: torch.Tensor, first_row: torch.Tensor, cols: torch.Tensor, num_rows: torch.Tensor,
                   shifted: bool, carried: torch.Tensor | None) -> torch.Tensor:
    """``[R, AB, V]`` logits aligned to window columns: column i reads canvas row ``first_row + i`` (aligned) or
    ``first_row + i - 1`` (shifted; column 0 takes ``carried``); columns ``>= num_rows`` read zeros."""
    shift = int(shifted)
    valid = (cols >= shift) & (cols < num_rows[:, None])
    out = gather_rows(logits, first_row[:, None] + cols - shift, valid)
    if shifted:
        out[:, 0] = torch.where((num_rows > 0)[:, None], carried.to(out.dtype), out[:, 0])
    return out


def write_window_next(ctx: WindowContext, slots: torch.Tensor, next_start: torch.Tensor) -> None:
    """The next canvas, table and RoPE offsets of ``slots`` from their window and phase."""
    blocks, B, mask_id = ctx.blocks, ctx.block_size, ctx.layout.mask_token_id
    window = ctx.window.gather(slots)
    R, A, _ = window.tokens.shape
    AB, W = A * B, blocks.canvas.shape[1]
    flat = window.tokens.view(R, AB)
    is_verify = blocks.phase[slots] == VERIFY
    canvas = torch.full((R, W), mask_id, dtype=flat.dtype, device=flat.device)
    first = torch.where(is_verify[:, None], ctx.drafts.rows["first_half"][slots] if ctx.drafts is not None
                        else flat, flat)
    canvas[:, :AB] = torch.where(first == PAST_LIMIT, mask_id, first)  # (past the limit: never scheduled)
    blocks.canvas[slots] = canvas
    # DRAFT table: block-causal over the window's slots (TO_CACHE rows token-causal with cache_ver); filler and
    # the causal verify pass: token-causal; the 2L verify canvas: the fixed 2L pattern.
    i = torch.arange(W, device=flat.device)
    q, k = i[:, None], i[None, :]
    same_or_earlier = (k // B) <= (q // B)
    causal = k <= q
    token_causal_rows = (q < (window.status == pipeline.TO_CACHE).sum(1)[:, None, None] * B) \
        & ctx.facts.gather(slots).cache_ver[:, None, None]
    occupied = (q < (window.status != pipeline.EMPTY).sum(1)[:, None, None] * B) & (q < AB)
    draft_table = torch.where(occupied & ~token_causal_rows, same_or_earlier & (k < AB), causal)
    two_l = is_verify & (not ctx.layout.shifted)
    table = torch.where(two_l[:, None, None], blocks.verify_pattern[None, :W, :W],
                        torch.where(is_verify[:, None, None], causal.expand(R, W, W), draft_table))
    blocks.canvas_tables[slots] = table.to(torch.int8)
    mask_half = (i >= AB)[None, :]
    blocks.pos_offset[slots] = torch.where(two_l[:, None] & mask_half, -AB, 0)
