"""The worst-case draft step run once during vLLM's memory profiling, so the profiler sees its peak."""

from __future__ import annotations

import torch

from vllm_s2d2.core.policies import PolicyState
from vllm_s2d2.core.step import BlockState, draft_step, finish_step
from vllm_s2d2.engine.states import BlockLayout
from vllm_s2d2.engine.step_params import PackedStepParams


def profile_draft(layout: BlockLayout, params: PackedStepParams, num_reqs: int, vocab_size: int,
                  dtype: torch.dtype, device: torch.device) -> None:
    """One draft step over ``num_reqs`` x B x V logits with top-k and top-p on (the largest temporaries)."""
    B = layout.block_size
    logits = torch.zeros(num_reqs, B, vocab_size, dtype=dtype, device=device)
    slots = torch.zeros(num_reqs, dtype=torch.int64, device=device)
    every = torch.ones(num_reqs, B, dtype=torch.bool, device=device)
    zeros = torch.zeros(num_reqs, dtype=torch.int64, device=device)
    state = BlockState(torch.full((num_reqs, B), layout.mask_token_id, dtype=torch.int64, device=device),
                       every, every, zeros, zeros)
    step_params = params.gather(slots, True, True)
    draft, policy = draft_step(logits, state, step_params, layout.rules, PolicyState.zeros(num_reqs, device))
    finish_step(state, draft, None, None, None, step_params, policy)
