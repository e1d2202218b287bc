"""``WindowStepper``: :class:`~vllm_s2d2.engine.stepper.S2D2Stepper` for the pipelined family D2F.

Same interface and host lifecycle (requests, staged writes, counters); the per-slot state is a window of up to
``A = max_active_blocks`` blocks (:class:`~vllm_s2d2.engine.states.WindowStates`) and a step is
:func:`~vllm_s2d2.engine.window_step.decode_window_step`.  The window is one "block" of ``A·B`` columns for the
shared buffers (draft store, per-position counters); the canvas is ``A·B`` slots (Dream) or ``2·A·B`` (LLaDA's
2L verify).  With CUDA graphs on, the window step is captured at start-up like the block step
(:mod:`.cudagraph_utils`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from vllm_s2d2.core import pipeline
from vllm_s2d2.core.params import SamplingSpec
from vllm_s2d2.engine.draft_store import DraftStore
from vllm_s2d2.engine.settings import window_canvas_length
from vllm_s2d2.engine.states import DRAFT, VERIFY, BlockStates, SavedRequest, WindowStates
from vllm_s2d2.engine.stats import VERIFY_RESTARTS
from vllm_s2d2.engine.cudagraph_utils import StepGraphs
from vllm_s2d2.engine.stepper import S2D2Stepper, StepOutput
from vllm_s2d2.engine.window_step import WindowContext, clip_to_limit, decode_window_step, write_window_next
from vllm_s2d2.s2d2_config import S2D2Config


class WindowStepper(S2D2Stepper):
    step_fn = staticmethod(decode_window_step)

    def __init__(self, *, max_num_reqs: int, block_size: int, family: str, mask_token_id: int,
                 engine_config: S2D2Config, max_model_len: int, device: torch.device | str,
                 max_stop_ids: int = 8, use_cuda_graphs: bool = False):
        A = int(engine_config.max_active_blocks)
        super().__init__(max_num_reqs=max_num_reqs, block_size=A * block_size, family=family,
                         mask_token_id=mask_token_id, engine_config=engine_config, max_model_len=max_model_len,
                         device=device, max_stop_ids=max_stop_ids, use_cuda_graphs=False)
        self.block = block_size  # B (self.B is the window, A·B)
        self.num_blocks = A
        self.W = window_canvas_length(block_size, A, self.layout.shifted)
        num_slots = max_num_reqs + 1
        self.blocks = BlockStates(num_slots, A * block_size, mask_token_id, self.device, canvas_width=self.W,
                                  verify_block_size=int(engine_config.verify_block_size or 1))
        self.mirror.blocks = self.blocks
        self.window = WindowStates(num_slots, A, block_size, mask_token_id, self.device)
        self.graphs = StepGraphs(max_num_reqs, self.W, self.scratch, self.device) if use_cuda_graphs else None

    @property
    def context(self) -> WindowContext:
        return WindowContext(self.layout, self.block, self.blocks, self.window, self.facts, self.params, self.drafts)

    def add_request(self, slot: int, *, prompt_len: int, config: S2D2Config, sampling: SamplingSpec,
                    stop_ids: Sequence[int], max_tokens: int | None, saved: SavedRequest | None = None) -> None:
        super().add_request(slot, prompt_len=prompt_len, config=config, sampling=sampling, stop_ids=stop_ids,
                            max_tokens=max_tokens, saved=saved)
        # Blocks up to max_tokens, the last one cut at max_model_len (window_step.clip_to_limit).
        room = self.layout.max_model_len - prompt_len
        self.window.max_blocks[slot] = math.ceil(max(0, min(room, max_tokens or room)) / self.block)

    def _snapshot(self, slot: int) -> SavedRequest:
        """The window, RNG counter, phase and routing state of a slot (for a resume)."""
        b = self.blocks
        return SavedRequest(torch.cat([self.window.snapshot(slot), b.rng_counter[slot:slot + 1],
                                       b.phase[slot:slot + 1]]), b.saved_policy(slot))

    def prefill_done(self, slots: torch.Tensor, slots_np: np.ndarray, prefill_len: torch.Tensor,
                     token_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     draft_tokens: torch.Tensor, last_logits: torch.Tensor | None = None) -> None:
        """The prompt (or, after preemption, prompt + outputs) is in the cache: open the first block (or resume
        the saved window) and write the first canvas.  Dream carries the last prefilled row's logit."""
        mask_id, R = self.mask_id, slots.numel()
        fresh = pipeline.new_window(R, self.num_blocks, self.block, mask_id, self.device)
        self.window.scatter(slots, fresh)
        self.blocks.phase[slots] = DRAFT
        if self.layout.shifted:
            if last_logits is None:
                raise ValueError("a shift-aligned model needs the prompt's last logits to draft its first block")
            self._ensure_carried(last_logits.shape[-1], last_logits.dtype)
            self.window.carried[slots] = last_logits.to(self.window.carried.dtype)
        for slot in slots_np.tolist():
            saved = self._restore.pop(int(slot), None)
            if saved is not None:
                self._resume(int(slot), saved)
        params = self.params.gather(slots, False, False)
        w = self.window.gather(slots)
        grown = pipeline.activate(pipeline.add_block(w, params.block_add_threshold, self.window.max_blocks[slots],
                                                     mask_id), params.decoded_token_threshold, mask_id)
        start = prefill_len.to(torch.int64)
        self.window.scatter(slots, clip_to_limit(grown, start, self.layout.max_model_len))
        write_window_next(self.context, slots, start)
        self.export_canvas(slots, draft_tokens)

    def _resume(self, slot: int, saved: SavedRequest) -> None:
        """A request resumed after preemption continues its window and routing state; an interrupted VERIFY is
        redone from its draft, with the draft's random numbers (the counter goes back one step) and routing state."""
        self.blocks.restore_policy(slot, saved.policy)
        state = saved.state
        self.window.restore(slot, state[:-2])
        verifying = (state[-1] == VERIFY).long()
        b = self.blocks
        b.rng_counter[slot] = state[-2] - verifying
        b.phase[slot] = DRAFT
        b.stats[slot, VERIFY_RESTARTS] += verifying
        b.totals[VERIFY_RESTARTS] += verifying

    def step(self, logits: torch.Tensor, slots: torch.Tensor, slots_np: np.ndarray, p: torch.Tensor,
             q_len: torch.Tensor, row0: torch.Tensor, draft_tokens: torch.Tensor) -> StepOutput:
        if self.layout.shifted:
            self._ensure_carried(logits.shape[-1], logits.dtype)
        return super().step(logits, slots, slots_np, p, q_len, row0, draft_tokens)

    def _ensure_drafts(self, vocab_size: int, dtype: torch.dtype) -> None:
        if self.drafts is None:
            self.drafts = DraftStore(self.max_num_reqs + 1, self.B, vocab_size, dtype, self.device)

    def _ensure_carried(self, vocab_size: int, dtype: torch.dtype) -> None:
        if self.window.carried is None:
            self.window.carried = torch.zeros(self.max_num_reqs + 1, vocab_size, dtype=dtype, device=self.device)

    def profile_draft(self, num_reqs: int, vocab_size: int, dtype: torch.dtype) -> None:
        self._ensure_drafts(vocab_size, dtype)
        if self.layout.shifted:
            self._ensure_carried(vocab_size, dtype)
        super().profile_draft(num_reqs, vocab_size, dtype)
