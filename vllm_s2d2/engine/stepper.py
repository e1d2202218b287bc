"""``S2D2Stepper``: the engine's per-slot block-diffusion state and its step, behind one small interface
(no vLLM imports; the vLLM adapters :mod:`.sampler` and :mod:`.model_state` translate ``InputBatch`` fields into
its arguments, so the whole state machine runs on CPU in the tests).

Parts: :mod:`.states` (the open block of every slot, each request's fixed facts), :mod:`.step_params` (per-slot
S2D2 knobs), :mod:`.draft_store` (drafts kept for verification), :mod:`.step` (one batched step),
:mod:`.canvas` (the next canvas and attention ranges), :mod:`.cudagraph_utils` (the step as a CUDA graph),
:mod:`.host_mirror` (what the host reads back).  The lifecycle of a request -- prefill, DRAFT / VERIFY /
COMMIT canvases, early finish, truncation, preemption -- is described in docs/lifecycle.md.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from vllm_s2d2.core.block import open_block
from vllm_s2d2.core.params import FamilyRules, SamplingSpec, StepParams
from vllm_s2d2.core.step import shifted_next_token
from vllm_s2d2.engine.canvas import write_next
from vllm_s2d2.engine.cudagraph_utils import StepGraphs
from vllm_s2d2.engine.draft_store import DraftStore
from vllm_s2d2.engine.host_mirror import HostMirror
from vllm_s2d2.engine.profiling import profile_draft
from vllm_s2d2.engine.states import (COMMIT, DRAFT, VERIFY, BlockLayout, BlockStates, RequestFacts,
                                     SavedRequest, SnapshotView)
from vllm_s2d2.engine.step import StepBatch, StepContext, StepFlags, decode_step
from vllm_s2d2.engine.stats import VERIFY_RESTARTS
from vllm_s2d2.engine.step_params import PackedStepParams
from vllm_s2d2.s2d2_config import S2D2Config

__all__ = ["S2D2Stepper", "StepOutput", "DRAFT", "COMMIT", "VERIFY"]


class StepOutput:
    __slots__ = ("tokens", "num_emitted", "num_rejected")

    def __init__(self, tokens: torch.Tensor, num_emitted: torch.Tensor, num_rejected: torch.Tensor):
        self.tokens = tokens  # [R, W] emitted tokens first
        self.num_emitted = num_emitted  # [R] int32
        self.num_rejected = num_rejected  # [R] int32 (query_len - emitted)


class S2D2Stepper:
    """Per-slot state (``max_num_reqs`` slots + one scratch slot) and one batched step for all decoding
    requests of a batch."""

    step_fn = staticmethod(decode_step)  # (ctx, batch, flags): one batched step

    def __init__(self, *, max_num_reqs: int, block_size: int, family: str, mask_token_id: int,
                 engine_config: S2D2Config, max_model_len: int, device: torch.device | str,
                 max_stop_ids: int = 8, use_cuda_graphs: bool = False, compile_step: bool = False,
                 compile_core: bool = False):
        self.device = device = torch.device(device)
        self.max_num_reqs = max_num_reqs
        self.scratch = max_num_reqs  # CUDA-graph padding rows write here
        num_slots = max_num_reqs + 1
        self.B = block_size
        self.W = 2 * block_size
        self.mask_id = mask_token_id
        rules = FamilyRules.for_family(family, mask_token_id)
        self.layout = BlockLayout(block_size, mask_token_id, rules.shifted,
                                  int(engine_config.sub_block_size or block_size), max_model_len, rules)
        self.blocks = BlockStates(num_slots, block_size, mask_token_id, device)
        self.facts = RequestFacts(num_slots, max_stop_ids, device)
        template = StepParams.build([engine_config], [SamplingSpec(top_k=1, top_p=0.5, seed=0)], rules, "cpu")
        self.params = PackedStepParams(num_slots, max(block_size, template.quota.shape[1]), template, device,
                                       pipelined=rules.pipelined)
        self.drafts: DraftStore | None = None  # allocated with the first step: needs V and the logits dtype
        self.mirror = HostMirror(self.blocks, device)
        self.graphs = StepGraphs(max_num_reqs, self.W, self.scratch, device) if use_cuda_graphs else None
        self.compile_step = compile_step  # the step's integer stages compiled (engine/compiled_step.py)
        self.compile_core = compile_step and compile_core  # and its floating-point middle (experimental)
        self._pending_reset: dict[int, SavedRequest | None] = {}  # slot -> resume snapshot (None: fresh)
        self._restore: dict[int, SavedRequest] = {}  # resume snapshots, consumed when the prefill completes

    # -- what the adapters read ------------------------------------------------------------------------
    @property
    def shifted(self) -> bool:
        return self.layout.shifted

    @property
    def two_l_verify(self) -> bool:
        """Whether VERIFY steps use the 2L canvas (position-aligned families) rather than a causal pass."""
        return not self.layout.shifted

    @property
    def totals_host(self) -> torch.Tensor:
        """Engine-wide counters as of the last finished copy (read without waiting for the device)."""
        return self.mirror.totals

    @property
    def context(self) -> StepContext:
        return StepContext(self.layout, self.blocks, self.facts, self.params, self.drafts, self.compile_step,
                           self.compile_core)

    # -- request lifecycle (host side, staged) ---------------------------------------------------------
    def add_request(self, slot: int, *, prompt_len: int, config: S2D2Config, sampling: SamplingSpec,
                    stop_ids: Sequence[int], max_tokens: int | None, saved: SavedRequest | None = None) -> None:
        self.params.set_row(slot, StepParams.build([config], [sampling], self.layout.rules, "cpu"))
        sampled = not sampling.greedy
        self.facts.add(slot, prompt_len=prompt_len, max_tokens=max_tokens, cache_ver=bool(config.cache_ver),
                       draft_ver=bool(config.draft_ver), max_post_steps=int(config.max_post_steps or 0),
                       editing=config.editing_threshold is not None, stop_ids=stop_ids,
                       sampled_on=sampled, top_k_on=sampling.top_k > 0 and sampled, top_p_on=sampling.top_p < 1.0 and sampled,
                       verify_on=bool(config.verify))
        self._pending_reset[slot] = saved

    def remove_request(self, slot: int, save: bool = False) -> SavedRequest | None:
        """Deactivate a slot; with ``save`` return what a resume needs (a device snapshot of its block and routing
        state).  A request preempted again before its re-prefill finished never got its saved state back into
        the slot: it keeps the snapshot of its first preemption."""
        self.facts.active[slot] = False
        staged = self._pending_reset.pop(slot, None)  # not yet applied to the slot
        unresumed = self._restore.pop(slot, None)  # applied, waiting for the re-prefill to finish
        if not save:
            return None
        if unresumed is None:
            unresumed = staged
        return self._snapshot(slot) if unresumed is None else unresumed

    def _snapshot(self, slot: int) -> SavedRequest:
        return SavedRequest(self.blocks.snapshot(slot), self.blocks.saved_policy(slot))

    def apply_staged_writes(self) -> None:
        self.params.flush()
        self.facts.table.apply()
        if not self._pending_reset:
            return
        slots = torch.tensor(sorted(self._pending_reset), dtype=torch.int64).to(self.device, non_blocking=True)
        self.blocks.reset(slots)
        self._restore.update({s: saved for s, saved in self._pending_reset.items() if saved is not None})
        self._pending_reset.clear()

    # -- prefill completion ----------------------------------------------------------------------------
    def prefill_done(self, slots: torch.Tensor, slots_np: np.ndarray, prefill_len: torch.Tensor,
                     token_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     draft_tokens: torch.Tensor, last_logits: torch.Tensor | None = None) -> None:
        """Open the first decode block of requests whose prompt (``prefill_len`` tokens) is now in the cache.

        ``token_at(slots [R], cols [R, B]) -> [R, B]`` reads prompt tokens (cols < prefill_len are valid).
        ``last_logits [R, V]``: the logits of each prompt's last token -- needed by shift-aligned models, whose
        token at position ``prefill_len`` is their argmax (:func:`~vllm_s2d2.core.step.shifted_next_token`)."""
        B, mask_id, blocks = self.B, self.mask_id, self.blocks
        P = prefill_len.to(torch.int64)
        block_start = P // B * B
        cols = block_start[:, None] + torch.arange(B, device=self.device)[None, :]
        tail = token_at(slots, torch.minimum(cols, (P - 1).clamp_min(0)[:, None]).to(torch.int64)).to(torch.int64)
        first = None
        if self.shifted:
            if last_logits is None:
                raise ValueError("a shift-aligned model needs the prompt's last logits to open its first block")
            first = shifted_next_token(last_logits, mask_id)
        tokens = open_block(tail, P - block_start, mask_id, first)
        blocks.tokens[slots] = tokens
        blocks.block_start[slots] = block_start
        blocks.step_idx[slots] = 0
        # A shift-aligned prompt that ends one short of a block boundary leaves a block without masks (its last
        # token came from the prompt's last logit): it is committed at once, with no draft step (as the
        # reference decoder does; a draft there would also advance the request's random-number counter).
        blocks.phase[slots] = torch.where((tokens == mask_id).any(1), DRAFT, COMMIT)
        blocks.post_steps[slots] = 0
        for k, slot in enumerate(slots_np.tolist()):
            saved = self._restore.pop(int(slot), None)
            if saved is not None:
                self._resume(int(slot), saved, P[k])
        write_next(self.context, slots, P)
        self.export_canvas(slots, draft_tokens)

    def _resume(self, slot: int, saved: SavedRequest, prefill_len: torch.Tensor) -> None:
        """A request resumed after preemption continues its interrupted block if the re-prefill ends in it; its
        random-number counter (and routing state) continues either way.  An interrupted VERIFY is redone from its
        DRAFT step with the draft's step index, random numbers and routing state (the first two go back one step),
        so the redone draft is the same draft."""
        b = self.blocks
        b.restore_policy(slot, saved.policy)
        snap = SnapshotView.of(saved.state, self.B)
        same = (snap.block_start + self.B > prefill_len) & (snap.block_start <= prefill_len)
        verifying = (snap.phase == VERIFY).long()
        b.tokens[slot] = torch.where(same, snap.tokens, b.tokens[slot])
        b.block_start[slot] = torch.where(same, snap.block_start, b.block_start[slot])
        b.step_idx[slot] = torch.where(same, snap.step_idx - verifying, b.step_idx[slot])
        phase = torch.where(snap.phase == VERIFY, torch.full_like(snap.phase, DRAFT), snap.phase)
        b.phase[slot] = torch.where(same, phase, b.phase[slot])
        b.post_steps[slot] = torch.where(same, snap.post_steps, b.post_steps[slot])
        b.rng_counter[slot] = snap.rng_counter - verifying
        b.stats[slot, VERIFY_RESTARTS] += verifying
        b.totals[VERIFY_RESTARTS] += verifying

    def export_canvas(self, slots: torch.Tensor, draft_tokens: torch.Tensor) -> None:
        """Copy the next canvases of ``slots`` into the runner's ``draft_tokens`` (the next step's input ids)."""
        draft_tokens[slots, :self.W] = self.blocks.canvas[slots].to(draft_tokens.dtype)

    # -- one decode step -------------------------------------------------------------------------------
    def step(self, logits: torch.Tensor, slots: torch.Tensor, slots_np: np.ndarray, p: torch.Tensor,
             q_len: torch.Tensor, row0: torch.Tensor, draft_tokens: torch.Tensor) -> StepOutput:
        """One step for R decoding requests (:func:`.step.decode_step`; eager, or replayed as a CUDA graph).

        ``logits [N, V]``: the canvas logits of the batch; request r's canvas rows are
        ``row0[r] .. row0[r] + q_len[r] - 1`` (query positions ``p[r] ..``).  ``slots``: their state rows.
        Writes the next canvas into ``draft_tokens[slot, :W]``; returns the emitted tokens."""
        # Host facts only: e.g. a batch with no request that may verify skips routing, one with no row in VERIFY the
        # verify math (the phase copy waited for here finished before the runner received the last step's tokens).
        flags = StepFlags.of(self.facts, slots_np, self.mirror.in_verify(slots_np))
        self._ensure_drafts(logits.shape[-1], logits.dtype)
        batch = StepBatch(logits, slots, p.to(torch.int64), q_len.to(torch.int64), row0.to(torch.int64), None)
        ctx, step_fn = self.context, self.step_fn
        if self.graphs is not None:
            tokens, emitted, rejected = self.graphs.run(lambda b, f: step_fn(ctx, b, f), batch, flags)
        else:
            tokens, emitted, rejected = step_fn(ctx, batch, flags)
        self.mirror.copy_phases()  # which rows verify next step (StepFlags.verifying)
        self.export_canvas(slots, draft_tokens)
        return StepOutput(tokens, emitted, rejected)

    def _ensure_drafts(self, vocab_size: int, dtype: torch.dtype) -> None:
        if self.drafts is None:
            self.drafts = DraftStore(self.max_num_reqs + 1, self.B, vocab_size, dtype, self.device)

    # -- host side -------------------------------------------------------------------------------------
    def publish(self) -> None:
        """Start the device-to-host copy of the counters (after every step)."""
        self.mirror.publish()

    def host_totals(self) -> dict[str, int]:
        """Engine-wide counters as of the last published step."""
        return self.mirror.totals_dict()

    def host_slot_stats(self, slot: int) -> dict[str, int]:
        """Counters of one slot as of the last published step."""
        return self.mirror.slot_stats(slot)

    def profile_draft(self, num_reqs: int, vocab_size: int, dtype: torch.dtype) -> None:
        """Run one worst-case draft step so vLLM's memory profiler sees its peak (and the draft store), and
        capture the step's CUDA graphs (start-up, not while serving)."""
        self._ensure_drafts(vocab_size, dtype)
        profile_draft(self.layout, self.params, num_reqs, vocab_size, dtype, self.device)
        if self.graphs is not None:
            ctx, step_fn = self.context, self.step_fn
            self.graphs.capture_all(lambda b, f: step_fn(ctx, b, f), vocab_size, dtype)
