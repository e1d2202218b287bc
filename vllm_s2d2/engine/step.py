"""One decode step for a batch of slots: state in, state and emitted tokens out (docs/lifecycle.md).

Pure tensor work with static shapes and no host syncs, so :mod:`.cudagraph_utils` can capture it.  Every
decision is made by ``core`` (``core.step`` for draft / verify / commit); this module reads each request's
block logits out of the canvas logits, applies the phase rules of a canvas (DRAFT, VERIFY, COMMIT + next draft)
and writes the next state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_s2d2.core import block as lifecycle
from vllm_s2d2.core.params import StepParams
from vllm_s2d2.core.policies import PolicyState
from vllm_s2d2.core.step import (BlockState, draft_step, draft_uniforms, finish_step, shifted_next_token,
                                 verify_step, verify_uniforms)
from vllm_s2d2.engine.buffer_utils import gather_rows
from vllm_s2d2.engine import compiled_step
from vllm_s2d2.engine.canvas import write_next
from vllm_s2d2.engine.draft_store import DraftStore
from vllm_s2d2.engine.states import (COMMIT, DRAFT, VERIFY, BlockLayout, BlockStates, FactsView, RequestFacts,
                                     pick_policy)
from vllm_s2d2.engine.step_params import PackedStepParams


class StepBatch(NamedTuple):
    """The decoding requests of one step.  Request r's canvas logits are rows ``logits_row0[r] ..
    logits_row0[r] + query_len[r] - 1`` of ``logits``; its query starts at absolute position ``start[r]``."""

    logits: torch.Tensor  # [N, V]
    slots: torch.Tensor  # [R] state rows
    start: torch.Tensor  # [R] first query position (num_computed_tokens)
    query_len: torch.Tensor  # [R] canvas slots scheduled (W, or fewer when truncated)
    logits_row0: torch.Tensor  # [R]
    valid: torch.Tensor | None  # [R] False on CUDA-graph padding rows (None = all valid)


class StepFlags(NamedTuple):
    """Host-side facts of a batch (read from :class:`RequestFacts`' host arrays and the host mirror's copy of the
    phases, never from the device) that let a step skip work no row of the batch needs.  Each combination is its
    own CUDA graph (:meth:`combinations`)."""

    verify: bool  # some request may verify: routing and the draft store run
    sampled: bool  # some request samples (temperature > 0): the inverse-CDF draw runs
    top_k: bool  # some sampled request filters by top-k
    top_p: bool  # some sampled request filters by top-p
    verifying: bool  # some row may be in its VERIFY phase (implies verify): the verify math runs

    @classmethod
    def of(cls, facts: RequestFacts, slots_np, in_verify_np) -> "StepFlags":
        """``in_verify_np``: per row of ``slots_np``, whether its slot was in VERIFY after the last step
        (:meth:`HostMirror.in_verify`; only a decode step enters VERIFY, so this never misses a verifying row)."""
        verify = bool(facts.verify_on[slots_np].any())
        return cls(verify, bool(facts.sampled_on[slots_np].any()), bool(facts.top_k_on[slots_np].any()),
                   bool(facts.top_p_on[slots_np].any()), verify and bool(in_verify_np.any()))

    @classmethod
    def combinations(cls) -> list["StepFlags"]:
        """Every combination a batch can have (top-k / top-p are only ever on for sampled requests, a row
        verifies only in a batch that may verify)."""
        return [cls(v, s, k, p, g) for v in (False, True) for s in (False, True) for k in (False, True)
                for p in (False, True) for g in ((False, True) if v else (False,)) if s or not (k or p)]


class StepContext(NamedTuple):
    """The engine state a step reads and writes."""

    layout: BlockLayout
    blocks: BlockStates
    facts: RequestFacts
    params: PackedStepParams
    drafts: DraftStore
    compiled: bool = False  # run the step's integer stages compiled (engine.compiled_step)
    compiled_core: bool = False  # and its floating-point middle, core_math (VLLM_S2D2_COMPILE_CORE, experimental)


def keep_before_verify(blocks: BlockStates, slots: torch.Tensor, policy: PolicyState,
                       starts_verify: torch.Tensor) -> None:
    """Rows that start a verification keep their routing state from before this draft (a resume redoes it)."""
    before = blocks.policy_before_verify
    before.scatter_(slots, pick_policy(before.index(slots), policy, starts_verify))


class Prepared(NamedTuple):
    """What a step knows before any model math: the slots' block state and the phase rules of their canvases
    (integer and boolean work, and the gather of each block's logits)."""

    block_start: torch.Tensor  # [R]
    tokens: torch.Tensor  # [R, B] the block as stored
    phase: torch.Tensor  # [R]
    step_idx: torch.Tensor  # [R]
    rng_counter: torch.Tensor  # [R]
    post_steps: torch.Tensor  # [R]
    facts: FactsView
    cached: torch.Tensor  # [R] block positions already in the KV cache
    uncached: torch.Tensor  # [R]
    is_commit: torch.Tensor  # [R] bool
    is_verify: torch.Tensor  # [R] bool
    clipped: torch.Tensor  # [R] bool, the canvas was cut at max_model_len
    commit_ok: torch.Tensor  # [R] bool, the COMMIT half of the canvas is complete
    draft_ok: torch.Tensor  # [R] bool, a draft step runs
    verify_ok: torch.Tensor  # [R] bool, a verify step runs
    fresh: torch.Tensor  # [R, B] the next block as it opens (COMMIT rows)
    draft_block: torch.Tensor  # [R, B] the block this step denoises
    draft_cached: torch.Tensor  # [R]
    draft_block_start: torch.Tensor  # [R]
    draft_step_idx: torch.Tensor  # [R]
    available: torch.Tensor  # [R, B] bool
    region: torch.Tensor  # [R, B] bool
    editable: torch.Tensor  # [R, B] bool
    block_logits: torch.Tensor  # [R, B, V] position-aligned draft logits
    draft_uniforms: torch.Tensor | None  # [R, B] (a batch with a sampled request)
    verify_uniforms: tuple[torch.Tensor, torch.Tensor] | None  # [R, B], [R, 1] (a batch with a row in VERIFY)


def decode_step(ctx: StepContext, batch: StepBatch, flags: StepFlags
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(tokens [R, W] emitted first, num_emitted [R] int32, num_rejected [R] int32)``.

    Three stages: :func:`prepare` (phase rules, block logits, random numbers), :func:`core_math` (draft, route,
    verify: floating point, eager unless ``ctx.compiled_core``), :func:`settle` (lifecycle bookkeeping, the next
    state and canvas).  With ``ctx.compiled`` the first and last run as compiled kernels (:mod:`.compiled_step`)."""
    prep = compiled_step.stage(prepare, ctx.compiled)(ctx, batch, flags.sampled, flags.verifying)
    new_tokens, starts_verify, num_accepted = compiled_step.stage(core_math, ctx.compiled_core)(
        ctx, batch, flags, prep)
    return compiled_step.stage(settle, ctx.compiled)(ctx, batch, prep, new_tokens, starts_verify, num_accepted)


def core_math(ctx: StepContext, batch: StepBatch, flags: StepFlags, prep: Prepared
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model math of a step (``core.step``: draft, route, verify; floating point): the block after the step
    ``[R, B]``, the rows that start a verification ``[R]`` and the accepted counts ``[R]``; writes the routing
    state and the draft store."""
    blocks = ctx.blocks
    B = ctx.layout.block_size
    slots, tokens, cached, row0 = batch.slots, prep.tokens, prep.cached, batch.logits_row0
    draft_ok, commit_ok, verify_ok = prep.draft_ok, prep.commit_ok, prep.verify_ok

    params = ctx.params.gather(slots, flags.top_k, flags.top_p)
    policy = blocks.policy.index(slots)
    state = BlockState(prep.draft_block, prep.editable, prep.region, prep.draft_step_idx, prep.rng_counter)
    draft, policy_drafted = draft_step(prep.block_logits, state, params, ctx.layout.rules, policy,
                                       route_any=flags.verify, any_sampled=flags.sampled,
                                       uniforms=prep.draft_uniforms)
    # A verify canvas needs 2B slots from the block start: near max_model_len the step falls back to the
    # baseline rule (the routing state already counted the decision).
    starts_verify = draft_ok & draft.do_verify & (prep.draft_block_start + 2 * B <= ctx.layout.max_model_len)
    draft.do_verify = starts_verify
    result, policy_finished = finish_step(state, draft, None, None, None, params, policy_drafted,
                                           route_any=flags.verify)
    # A step that did not draft keeps its block: the fresh one after a commit, the current one otherwise -- also a
    # COMMIT whose canvas was cut before the end of its block (it committed nothing and is retried).
    kept = torch.where(commit_ok[:, None], prep.fresh, tokens)
    new_tokens = torch.where((draft_ok & ~starts_verify)[:, None], result.tokens, kept)
    if flags.verify:  # (otherwise no row starts a verification: nothing to keep)
        ctx.drafts.save(slots, starts_verify, draft, prep.block_logits, prep.rng_counter, prep.draft_step_idx)
        keep_before_verify(blocks, slots, policy, starts_verify)
    policy_next = pick_policy(policy, policy_finished, draft_ok & ~starts_verify)
    policy_next = pick_policy(policy_next, policy_drafted, starts_verify)  # reward recorded when verified

    num_accepted = torch.zeros_like(batch.start)
    if flags.verifying:  # (otherwise no row is in VERIFY: verify_ok is False everywhere)
        v_tokens, v_policy, num_accepted = _verify(ctx, batch.logits, slots, tokens, prep.editable, cached, row0,
                                                   prep.rng_counter, prep.step_idx, params, policy,
                                                   prep.verify_uniforms)
        new_tokens = torch.where(verify_ok[:, None], v_tokens, new_tokens)
        policy_next = pick_policy(policy_next, v_policy, verify_ok)
    blocks.policy.scatter_(slots, policy_next)
    return new_tokens, starts_verify, num_accepted


def prepare(ctx: StepContext, batch: StepBatch, sampled: bool, verifying: bool) -> Prepared:
    """The slots' state, the phase rules of this step's canvases, each block's logits and the step's random
    numbers (the counter hash: integer work; ``sampled`` / ``verifying``: the batch's :class:`StepFlags`)."""
    layout, blocks = ctx.layout, ctx.blocks
    B, mask_id, shift = layout.block_size, layout.mask_token_id, int(layout.shifted)
    logits, slots, start, query_len, row0 = batch.logits, batch.slots, batch.start, batch.query_len, \
        batch.logits_row0
    cols = torch.arange(B, device=slots.device)[None, :]

    block_start = blocks.block_start[slots]
    tokens = blocks.tokens[slots]
    phase = blocks.phase[slots]
    step_idx = blocks.step_idx[slots]
    facts = ctx.facts.gather(slots)

    cached = (start - block_start).clamp(0, B)  # block positions already in the KV cache
    uncached = B - cached
    is_commit = phase == COMMIT
    is_verify = phase == VERIFY
    needed = torch.where(is_commit | is_verify, uncached + B, uncached)
    full = query_len >= needed
    clipped = ~full & (start + query_len >= layout.max_model_len)
    commit_ok = is_commit & (query_len >= uncached)
    draft_rows = query_len - torch.where(is_commit, uncached, torch.zeros_like(uncached))
    draft_ok = torch.where(is_commit, full | (clipped & commit_ok & (draft_rows > 0)),
                           full | (clipped & (query_len > 0))) & ~is_verify
    if layout.shifted:
        # The next block's first token comes from this commit forward, so its first draft cannot share it.
        draft_ok = draft_ok & ~is_commit
    verify_ok = is_verify & full  # a verify canvas is only ever written when it fits (canvas.write_next)

    # The block this step denoises: the current one (DRAFT) or the fresh next one (COMMIT).  A shift-aligned
    # model's fresh block starts with the argmax of the committed block's last logit (canvas row uncached - 1).
    first = None
    if layout.shifted:
        last_row = (row0 + uncached - 1).clamp(0, max(logits.shape[0] - 1, 0))
        first = shifted_next_token(logits[last_row], mask_id)
    fresh = lifecycle.open_block(tokens, torch.zeros_like(cached), mask_id, first)
    draft_block = torch.where(is_commit[:, None], fresh, tokens)
    draft_cached = torch.where(is_commit, torch.zeros_like(cached), cached)
    draft_block_start = block_start + torch.where(is_commit, B, 0)
    draft_step_idx = torch.where(is_commit, torch.zeros_like(step_idx), step_idx)
    available = lifecycle.available_columns(draft_cached, draft_rows, B)
    region = lifecycle.step_region(draft_block, mask_id, layout.sub_block, available)
    editable = lifecycle.editable_columns(draft_block_start, facts.prompt_len, B)

    # Block column i reads canvas row i - cached (position-aligned) or i - cached - 1 (shifted: the logit of the
    # previous position; the first uncached column always holds a known token).
    has_logit = (cols >= (draft_cached + shift)[:, None]) & (cols < (draft_cached + draft_rows.clamp(min=0))[:, None])
    rows = (row0[:, None] + torch.where(is_commit, uncached, 0)[:, None] + (cols - draft_cached[:, None] - shift))
    block_logits = gather_rows(logits, rows, has_logit)
    rng_counter = blocks.rng_counter[slots]
    seed = ctx.params.seed(slots)
    u_draft = draft_uniforms(seed, rng_counter, B) if sampled else None
    # A VERIFY step accepts against the uniforms of its saved draft's counter (engine.draft_store), read before
    # this step saves new drafts: a row that saves one now starts its verification next step, not this one.
    u_verify = verify_uniforms(seed, ctx.drafts.counter[slots], B) if verifying else None
    return Prepared(block_start, tokens, phase, step_idx, rng_counter, blocks.post_steps[slots], facts,
                    cached, uncached, is_commit, is_verify, clipped, commit_ok, draft_ok, verify_ok, fresh, draft_block,
                    draft_cached, draft_block_start, draft_step_idx, available, region, editable, block_logits,
                    u_draft, u_verify)


def settle(ctx: StepContext, batch: StepBatch, prep: Prepared, new_tokens: torch.Tensor,
           starts_verify: torch.Tensor, num_accepted: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """After the model math: LLaDA2.1 editing passes, early finish, the emitted tokens, the next block state,
    the counters and the next canvas.  ``new_tokens [R, B]``: the block after this step."""
    layout, blocks = ctx.layout, ctx.blocks
    B, mask_id = layout.block_size, layout.mask_token_id
    slots, start, query_len = batch.slots, batch.start, batch.query_len
    p = prep
    ran = p.draft_ok | p.verify_ok

    # LLaDA2.1 editing passes after the block's last mask, and whether its tokens are settled.
    life = lifecycle.post_steps(torch.where(p.commit_ok, 0, p.post_steps), ran, p.draft_block, new_tokens, mask_id,
                                p.facts.max_post_steps, p.facts.editing)
    # Early finish: a final prefix (from draft_cached) that already ends the request is emitted now.
    prefix = lifecycle.final_prefix(new_tokens, mask_id, p.draft_block_start, p.draft_cached, p.facts.prompt_len,
                                    p.facts.stop_ids, p.facts.max_tokens, p.available)
    finish = ran & ~starts_verify & lifecycle.early_finish(prefix, life.settled, p.clipped)

    num_emitted = torch.where(p.commit_ok, p.uncached, 0) + torch.where(finish, prefix.length, 0)
    # Emitted tokens: [current block (final for COMMIT, drafted for DRAFT) | drafted next block] from `cached`.
    wcols = torch.arange(2 * B, device=slots.device)[None, :]
    out_row = torch.cat([torch.where(p.is_commit[:, None], p.tokens, new_tokens), new_tokens], dim=1)
    out_tokens = out_row.gather(1, (p.cached[:, None] + wcols).clamp(max=2 * B - 1))

    # Next state.  The block after this step is new_tokens in every row (see `kept` in decode_step).
    commit_ok, draft_ok = p.commit_ok, p.draft_ok
    blocks.block_start[slots] = torch.where(commit_ok, p.block_start + B, p.block_start)
    blocks.tokens[slots] = new_tokens
    blocks.step_idx[slots] = torch.where(commit_ok, draft_ok.long(), p.step_idx + draft_ok.long())
    blocks.rng_counter[slots] = p.rng_counter + draft_ok.long()
    blocks.post_steps[slots] = life.post
    phase_next = torch.where(life.again, DRAFT, COMMIT)
    phase_next = torch.where(ran | commit_ok, phase_next, p.phase)  # a step that did not run keeps its phase
    stay = starts_verify | (p.is_verify & ~p.verify_ok)  # a truncated verify step is retried
    blocks.phase[slots] = torch.where(stay, VERIFY, phase_next)
    count_step(blocks, ctx.drafts, batch, draft_ok, p.verify_ok, num_accepted, commit_ok)
    write_next(ctx, slots, start + num_emitted)
    return out_tokens, num_emitted.to(torch.int32), (query_len - num_emitted).to(torch.int32)


def count_step(blocks: BlockStates, drafts: DraftStore, batch: StepBatch, draft_ok: torch.Tensor,
               verify_ok: torch.Tensor, num_accepted: torch.Tensor, commit_ok: torch.Tensor) -> None:
    """Add a step's counters (per slot and engine-wide; CUDA-graph padding rows excluded): draft / verify forwards,
    proposed / accepted span tokens, commit forwards; and per span position (vLLM's spec-decode per-position
    acceptance) the verifications whose span covered column i / whose accepted prefix did."""
    slots = batch.slots
    span = drafts.reqs["span_length"][slots]
    counted = torch.stack([draft_ok.long(), verify_ok.long(), torch.where(verify_ok, span, 0),
                           torch.where(verify_ok, num_accepted, 0), commit_ok.long(), torch.zeros_like(span)], dim=1)
    if batch.valid is not None:
        counted = counted * batch.valid[:, None].long()
    blocks.stats[slots] += counted
    blocks.totals += counted.sum(dim=0)
    verified = verify_ok if batch.valid is None else verify_ok & batch.valid
    cols = torch.arange(blocks.proposed_per_pos.shape[0], device=slots.device)[None, :]
    blocks.proposed_per_pos += (verified[:, None] & (cols < span[:, None])).long().sum(dim=0)
    blocks.accepted_per_pos += (verified[:, None] & (cols < num_accepted[:, None])).long().sum(dim=0)


def _verify(ctx: StepContext, logits, slots, tokens, editable, cached, row0, rng_counter, step_idx,
            params: StepParams, policy: PolicyState, uniforms=None):
    """Verification over every row (the caller keeps the rows whose step is a VERIFY): q from the verifier's
    rows (2L mask half at canvas row B + i, or the causal pass's row i - 1 for shifted models),
    ``core.step.verify_step`` against the saved draft, then ``finish_step``.  Rows are independent, so
    computing all of them keeps the shapes static and changes no number.  Returns [R, B] tokens, policy state
    and accepted counts."""
    layout = ctx.layout
    B = layout.block_size
    draft = ctx.drafts.load(slots, params, layout.rules)
    cols = torch.arange(B, device=slots.device)[None, :]
    base, shift = (0, 1) if layout.shifted else (B, 0)
    known = cols >= (cached + shift)[:, None]
    q_logits = gather_rows(logits, row0[:, None] + base + (cols - cached[:, None] - shift), known)
    commit, v_tokens, accepted = verify_step(draft, q_logits, params, layout.rules, ctx.drafts.counter[slots],
                                             uniforms=uniforms)
    vstate = BlockState(tokens, editable, torch.ones_like(editable), step_idx, rng_counter)
    result, v_policy = finish_step(vstate, draft, commit, v_tokens, accepted, params, policy)
    return result.tokens, v_policy, result.num_accepted
