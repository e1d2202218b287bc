"""Which attention each row of a step gets (host side, from the ``InputBatch``; no vLLM imports).

* **Canvas rows** (decoding requests: their canvas was scheduled as draft tokens) are attended by the plugin's
  canvas kernel: every key below the canvas start is visible, and among the canvas slots the per-slot table the
  stepper wrote after the previous step (:mod:`.canvas`).  Nothing per request is computed on the host.
* **Prefill rows** go through vLLM's stock Triton launch: token-causal (``cache_ver``), or block-causal through
  vLLM's PrefixLM ranges ``mm_req_doc_ranges`` -- "token-causal OR (q and k inside one range)", one range per
  block segment of the chunk, the prompt's last block split at the prompt end.  Without ``cache_ver`` the config
  hook disables chunked prefill (a chunk cut inside a block could not see the block's later prompt tokens).
* **Uniform batches** (every request scheduled W tokens: decode-only steps, the ones vLLM replays as FULL CUDA
  graphs) run the canvas kernel alone; a W-token prefill chunk in such a batch gets a prefill table
  (:func:`vllm_s2d2.core.masks.prefill_visibility`) written into its slot's table for this step.

RoPE: the mask half of a 2L verify canvas sits at the first half's positions; :func:`canvas_positions` adds the
per-slot offsets the stepper wrote to the runner's positions, on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from vllm_s2d2.core.masks import prefill_visibility, prefill_visibility_from_prompt
from vllm_s2d2.env import env_switch

Ranges = dict[int, list[tuple[int, int]]]


def prefill_block_ranges(start: int, end: int, prompt_len: int, block_size: int) -> list[tuple[int, int]]:
    """Block-causal ranges for prefill rows ``[start, end)``: segments between multiples of B and the prompt
    end, each clipped to the keys present (``< end``)."""
    B = block_size
    if B <= 1 or end <= start:
        return []
    out = []
    s = start // B * B
    while s < end:
        e = s + B
        if s < prompt_len < e:
            segs = ((s, prompt_len), (prompt_len, e))
        else:
            segs = ((s, e),)
        for a, b in segs:
            lo, hi = a, min(b, end) - 1
            if lo < hi and hi >= start:
                out.append((lo, hi))
        s = e
    return out


def pad_ranges(ranges: Ranges) -> Ranges | None:
    """None when no request has a range; otherwise pad the longest list to a power of two (>= 2) with the
    kernel's empty range (0, 0), bounding the number of compiled ``MAX_MM_RANGES`` variants."""
    if not any(ranges.values()):
        return None
    longest = max(len(v) for v in ranges.values())
    bucket = 2
    while bucket < longest:
        bucket *= 2
    key = max(ranges, key=lambda k: len(ranges[k]))
    ranges[key] = list(ranges[key]) + [(0, 0)] * (bucket - longest)
    return ranges


def kernel_visibility(q_pos: torch.Tensor, seq_len: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Dense ``[len(q_pos), seq_len]`` bool mask the Triton kernel applies (reference for tests)."""
    k = torch.arange(seq_len)
    q = q_pos[:, None]
    vis = k[None, :] <= q
    for lo, hi in ranges:
        if lo < hi:
            vis |= (q >= lo) & (q <= hi) & (k[None, :] >= lo) & (k[None, :] <= hi)
    return vis


def batch_rows(input_batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per batch row of a step: its slot (int64), the tokens scheduled (int64) and whether it is prefilling."""
    R = input_batch.num_reqs
    return (np.asarray(input_batch.idx_mapping_np[:R], dtype=np.int64),
            np.asarray(input_batch.num_scheduled_tokens[:R], dtype=np.int64),
            np.asarray(input_batch.is_prefilling_np[:R], dtype=bool))


class CanvasPlan(NamedTuple):
    """Host decision of one step: the slot of each batch row's canvas table (-1: stock attention) and whether
    the canvas kernel alone serves the step."""

    row_slot: np.ndarray  # [R] int32
    canvas_only: bool
    prefill_rows: np.ndarray  # batch indices of prefill chunks that use a prefill table (canvas_only steps)


def plan_canvas_rows(stepper, input_batch) -> CanvasPlan:
    """Canvas rows of a step: decoding requests (active, not prefilling, some tokens scheduled).  In a uniform
    batch (every request scheduled W tokens) every row is served by the canvas kernel: prefill chunks through a
    prefill table, rows of no request the plugin tracks through the scratch slot's causal table."""
    st = stepper
    R = input_batch.num_reqs
    slots, scheduled, prefilling = batch_rows(input_batch)
    active = st.facts.active[slots]
    canvas_only = bool(R > 0 and (scheduled == st.W).all())
    if canvas_only:
        row_slot = np.where(active, slots, st.scratch)
        prefill_rows = np.nonzero(active & prefilling)[0]
    else:
        row_slot = np.where(active & ~prefilling & (scheduled > 0), slots, -1)
        prefill_rows = np.zeros(0, dtype=np.int64)
    return CanvasPlan(row_slot.astype(np.int32), canvas_only, prefill_rows)


EXACT_PREFILL_ENV = "VLLM_S2D2_EXACT_PREFILL"


def exact_prefill_wanted(batch_invariant: bool) -> bool:
    """Whether token-causal prefill rows go through the canvas kernel too (:func:`plan_prefill_chunks`): on with
    vLLM's batch-invariant kernels (``VLLM_BATCH_INVARIANT=1``) unless ``VLLM_S2D2_EXACT_PREFILL=0``; ``=1`` turns
    it on without them."""
    return env_switch(EXACT_PREFILL_ENV, batch_invariant)


def plan_prefill_chunks(stepper, input_batch, canvas_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(chunk_row, chunk_offset)``: the token-causal prefill rows of a mixed step cut into W-token chunks for the
    canvas kernel (each with the causal table).

    Why: a committed token's K/V is written by the canvas kernel when its block commits, but by the stock Triton
    launch when the same token is prefilled again (a resumed preemption, a prompt that missed the prefix cache).
    The two kernels add up the keys in different orders, so the same token can get K/V that differ in the last
    bits, and a near-tie downstream flips.  The canvas kernel walks every query's keys in the same position-aligned
    tiles whatever the step, so with vLLM's batch-invariant matmuls a token's K/V no longer depends on how it was
    scheduled.  Block-causal (no ``cache_ver``) and D2F prompts keep the stock launch with ranges."""
    st = stepper
    slots, scheduled, prefilling = batch_rows(input_batch)
    token_causal = st.facts.cache_ver[slots] & (not st.layout.rules.pipelined)
    rows = np.nonzero(st.facts.active[slots] & prefilling & token_causal & (scheduled > 0) & (canvas_rows < 0))[0]
    counts = -(-scheduled[rows] // st.W)
    chunk_row = np.repeat(rows, counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    chunk_offset = (np.arange(chunk_row.size) - first) * st.W
    return chunk_row.astype(np.int32), chunk_offset.astype(np.int32)


def write_prefill_tables(stepper, input_batch, rows: np.ndarray) -> None:
    """Prefill tables of the W-token prefill chunks of a uniform batch (batch indices ``rows``), into their slots."""
    st = stepper
    slots = np.asarray(input_batch.idx_mapping_np, dtype=np.int64)[rows]
    start = np.asarray(input_batch.num_computed_tokens_np, dtype=np.int64)[rows]
    device = st.blocks.canvas_tables.device
    as_dev = lambda x, dt=torch.int64: torch.from_numpy(np.ascontiguousarray(x)).to(device, dt)  # noqa: E731
    visibility = prefill_visibility_from_prompt if st.layout.rules.pipelined else prefill_visibility
    table = visibility(as_dev(start), as_dev(st.facts.prompt_len[slots]), _prefill_block(st), st.W,
                       as_dev(st.facts.cache_ver[slots], torch.bool))
    index = as_dev(slots)
    st.blocks.canvas_tables[index] = table.to(torch.int8)
    st.blocks.pos_offset[index] = 0


def canvas_positions(positions: torch.Tensor, query_start_loc: torch.Tensor, num_reqs: int, row_slot: torch.Tensor,
                     pos_offset: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """RoPE positions of the step's ``out.numel()`` token rows: the runner's ``positions`` plus, on canvas rows,
    the slot's offset (``pos_offset [slots, W]``); device work only, static shapes."""
    T, W = out.numel(), pos_offset.shape[1]
    out.copy_(positions[:T])
    if num_reqs == 0:
        return out
    tok = torch.arange(T, device=out.device, dtype=query_start_loc.dtype)
    row = torch.searchsorted(query_start_loc[1:num_reqs + 1], tok, right=True).clamp(max=num_reqs - 1)
    local = tok.long() - query_start_loc[row].long()
    slot = row_slot[row].long()
    use = (slot >= 0) & (local >= 0) & (local < W) & (tok < query_start_loc[num_reqs])
    offset = pos_offset[slot.clamp(min=0), local.clamp(0, W - 1)]
    return out.add_(torch.where(use, offset, torch.zeros_like(offset)))


def prefill_ranges(stepper, input_batch) -> Ranges | None:
    """``mm_req_doc_ranges`` of a step (batch index -> [(lo, hi)]): block-causal prefill chunks only (canvas rows
    are attended by the canvas kernel)."""
    st = stepper
    R = input_batch.num_reqs
    slots, scheduled, prefilling = batch_rows(input_batch)
    computed = np.asarray(input_batch.num_computed_tokens_np[:R], dtype=np.int64)
    ranges: Ranges = {}
    pipelined = st.layout.rules.pipelined  # D2F: the prompt is one bidirectional segment, even with cache_ver
    for i in np.nonzero(st.facts.active[slots] & prefilling & (~st.facts.cache_ver[slots] | pipelined))[0].tolist():
        start, end, prompt_len = int(computed[i]), int(computed[i] + scheduled[i]), int(st.facts.prompt_len[slots[i]])
        if pipelined:
            rs = prompt_block_ranges(start, end, prompt_len, _prefill_block(st), bool(st.facts.cache_ver[slots[i]]))
        else:
            rs = prefill_block_ranges(start, end, prompt_len, st.B)
        if rs:
            ranges[i] = rs
    return pad_ranges(ranges)


def _prefill_block(stepper) -> int:
    """The block size prefill segments follow (a pipelined stepper's ``B`` is its whole window)."""
    return getattr(stepper, "block", stepper.B)


def prompt_block_ranges(start: int, end: int, prompt_len: int, block_size: int, token_causal: bool
                        ) -> list[tuple[int, int]]:
    """D2F prefill ranges for rows ``[start, end)``: the prompt ``[0, P)`` as one range, then (unless
    ``token_causal``) one range per generated block counted from the prompt end; clipped to the keys present."""
    segments = [(0, prompt_len)]
    if not token_causal:
        segments += [(s, s + block_size) for s in range(prompt_len, end, block_size)]
    out = []
    for a, b in segments:
        lo, hi = a, min(b, end) - 1
        if lo < hi and hi >= start:
            out.append((lo, hi))
    return out
