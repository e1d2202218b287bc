"""What the engine hands the attention backend beyond vLLM's own metadata (no vLLM imports).

The model state attaches a :class:`CanvasInputs` to the attention metadata as ``s2d2_canvas``;
:mod:`vllm_s2d2.model_executor.attention.backend` reads it and runs the canvas attention kernel for the canvas
rows (docs/architecture.md, "Attention").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CanvasInputs:
    """The canvas rows of one step.  Every tensor is (a view of) a persistent buffer, so a FULL CUDA graph
    captured with these objects reads the current step's values."""

    tables: torch.Tensor  # [num_slots, W, W] int8: tables[s, i, j] = 1 iff canvas query i of slot s sees canvas
    #                       key j (every key below the request's committed length is visible)
    row_slot: torch.Tensor  # [R] int32: the slot of batch row r, -1 if row r is no canvas (prefill, padding)
    canvas_only: bool  # every row that needs attention is a canvas row (uniform batch): no stock launch
    # Token-causal prefill rows cut into W-token chunks for the canvas kernel too (mixed steps with exact prefill,
    # vllm_s2d2.engine.attention.plan_prefill_chunks): (chunk_row, chunk_offset, chunk_table) int32 [C] each, and
    # the tables they index ([1, W, W] int8, causal).  None: the stock launch serves the prefill rows.
    prefill_chunks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    prefill_tables: torch.Tensor | None = None
