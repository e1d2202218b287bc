"""The D2F block window (pipelined block diffusion, ``docs/plans/d2f.md`` §1-§2), batched over requests.

Each request row holds a window of ``A`` block slots of ``B`` positions, generated blocks counted from the
prompt end.  Occupied slots form a prefix of the window, in order: TO_CACHE blocks (finished, their KV written
by the next forward), then ACTIVE blocks (being decoded, including finished ones still waiting for an earlier
block), then EMPTY slots.  Pure torch over fixed shapes: no loops over tokens or rows, no host syncs, so the
engine can capture these functions in a CUDA graph and the reference decoder calls them with R = 1.

A step: :func:`add_block` -> :func:`activate` -> forward over ``[TO_CACHE | ACTIVE]`` (which writes the
TO_CACHE blocks' KV; then :func:`shift_window` drops them) -> draft; :func:`window_span`; baseline
(:func:`baseline_commit`) or verify + :func:`fallback_commit` -> :func:`apply_commit` -> :func:`mark_to_cache`.
Flat ``[R, A*B]`` tensors (the window canvas) are ``.view(R, A, B)`` of the per-block ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_s2d2.core.spans import Span, first_mask_span
from vllm_s2d2.core.unmasking import threshold_plus_argmax, top_k_positions

EMPTY, ACTIVE, TO_CACHE = 0, 1, 2  # status codes (int64)


class Window(NamedTuple):
    tokens: torch.Tensor  # [R, A, B] long, mask id at masked positions (EMPTY slots: all masks)
    status: torch.Tensor  # [R, A] long, EMPTY / ACTIVE / TO_CACHE
    full: torch.Tensor  # [R, A] bool, fully activated (sticky; False on EMPTY slots)
    blocks_opened: torch.Tensor  # [R] long, generated blocks opened so far (the prompt not counted)
    stopped: torch.Tensor  # [R] bool, a stop id was committed: no more blocks are added


def new_window(num_rows: int, num_blocks: int, block_size: int, mask_id: int, device=None) -> Window:
    """An empty window: every slot EMPTY, nothing opened, not stopped."""
    return Window(torch.full((num_rows, num_blocks, block_size), mask_id, dtype=torch.long, device=device),
                  torch.full((num_rows, num_blocks), EMPTY, dtype=torch.long, device=device),
                  torch.zeros(num_rows, num_blocks, dtype=torch.bool, device=device),
                  torch.zeros(num_rows, dtype=torch.long, device=device),
                  torch.zeros(num_rows, dtype=torch.bool, device=device))


def decoded_count(window: Window, mask_id: int) -> torch.Tensor:
    """``[R, A]`` long: filled positions per slot (0 on EMPTY slots)."""
    return ((window.tokens != mask_id).sum(-1) * (window.status != EMPTY)).long()


def _slots(window: Window) -> torch.Tensor:
    return torch.arange(window.status.shape[1], device=window.status.device)[None, :]


def _predecessor_ratio(window: Window, mask_id: int) -> torch.Tensor:
    """``[R, A]`` float: decoded ratio of each slot's predecessor; 1.0 for slot 0 (its predecessor -- the prompt or
    a block already shifted out -- is complete)."""
    ratio = decoded_count(window, mask_id).float() / window.tokens.shape[2]
    return torch.cat([torch.ones_like(ratio[:, :1]), ratio[:, :-1]], dim=1)


def add_block(window: Window, block_add_threshold: torch.Tensor, max_blocks: torch.Tensor, mask_id: int) -> Window:
    """Open at most one block per row: an ACTIVE block of B masks (not fully activated) in the first EMPTY slot.

    A row adds one iff it is not ``stopped``, ``blocks_opened < max_blocks [R]`` (the allowed number of generated
    blocks), the window has an EMPTY slot (TO_CACHE slots count until :func:`shift_window`) and the last occupied
    slot's progress ``decoded / B >= block_add_threshold [R]`` (float32); with no occupied slot the progress is 1
    (the prompt, or blocks already cached), so the first block is added at once."""
    B = window.tokens.shape[2]
    occupied = window.status != EMPTY
    num_occupied = occupied.sum(1)
    last = (num_occupied - 1).clamp_min(0)
    last_ratio = decoded_count(window, mask_id).gather(1, last[:, None]).squeeze(1).float() / B
    progress = torch.where(num_occupied > 0, last_ratio, torch.ones_like(last_ratio))
    add = (~window.stopped & (window.blocks_opened < max_blocks) & (num_occupied < window.status.shape[1])
           & (progress >= block_add_threshold))
    slot = (_slots(window) == num_occupied[:, None]) & add[:, None]  # [R, A]
    tokens = torch.where(slot[:, :, None], torch.full_like(window.tokens, mask_id), window.tokens)
    status = torch.where(slot, torch.full_like(window.status, ACTIVE), window.status)
    full = window.full & ~slot
    return Window(tokens, status, full, window.blocks_opened + add.long(), window.stopped)


def activate(window: Window, decoded_token_threshold: torch.Tensor, mask_id: int) -> Window:
    """Sticky full activation: an ACTIVE block becomes fully activated once its predecessor's decoded ratio is
    ``>= decoded_token_threshold [R]`` (float32); the block in slot 0 (predecessor complete) at once."""
    ready = _predecessor_ratio(window, mask_id) >= decoded_token_threshold[:, None]
    full = window.full | ((window.status == ACTIVE) & ready)
    return window._replace(full=full)


def masked_in_active(window: Window, mask_id: int) -> torch.Tensor:
    """``[R, A, B]`` bool: masked positions of ACTIVE blocks (every one is drafted each step)."""
    return (window.tokens == mask_id) & (window.status == ACTIVE)[:, :, None]


def baseline_commit(window: Window, p0: torch.Tensor, skip_threshold: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``[R, A, B]`` bool: plain D2F's commit from the draft confidences ``p0 [R, A, B]``, per ACTIVE block.

    Fully activated: every mask with ``p0 > skip_threshold [R]``, plus the most confident mask (so >= 1 when it
    has a mask); semi-activated: only ``p0 > skip_threshold`` (possibly nothing)."""
    R, A, B = window.tokens.shape
    eligible = masked_in_active(window, mask_id)
    conf = torch.where(eligible, p0, torch.zeros_like(p0))
    threshold = skip_threshold[:, None].expand(R, A).reshape(R * A)
    full_rule = threshold_plus_argmax(conf.reshape(R * A, B), eligible.reshape(R * A, B), threshold).view(R, A, B)
    semi_rule = eligible & (conf > skip_threshold[:, None, None])
    return torch.where(window.full[:, :, None], full_rule, semi_rule)


def fallback_commit(window: Window, p0: torch.Tensor, committed: torch.Tensor, skip_threshold: torch.Tensor,
                    min_k: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``[R, A, B]`` bool: the extra positions the S2D2-on-D2F fallback commits after a verification.

    ``committed [R, A, B]``: positions already committed this step (the verified span).  Per fully activated
    ACTIVE block with ``n < min_k [R]`` committed this step, ``need = min_k - n``: among its remaining masks, all
    with ``p0 >= skip_threshold`` if there are at least ``need`` of them, else the top-``need`` by ``p0`` (ties:
    lower position).  Semi-activated blocks get nothing."""
    R, A, B = window.tokens.shape
    remaining = masked_in_active(window, mask_id) & ~committed & window.full[:, :, None]
    need = (min_k[:, None] - committed.sum(-1)).clamp_min(0)  # [R, A]
    above = remaining & (p0 >= skip_threshold[:, None, None])
    enough = above.sum(-1) >= need
    top = top_k_positions(p0.reshape(R * A, B), remaining.reshape(R * A, B), need.reshape(R * A)).view(R, A, B)
    return torch.where(enough[:, :, None], above, top) & (need > 0)[:, :, None]


def window_span(window: Window, mask_id: int) -> Span:
    """The first contiguous masked run over the flat ``[R, A*B]`` window, inside ACTIVE blocks; it crosses block
    boundaries (:func:`vllm_s2d2.core.spans.first_mask_span`; start ``A*B`` and length 0 when none)."""
    R, A, B = window.tokens.shape
    region = (window.status == ACTIVE)[:, :, None].expand(R, A, B).reshape(R, A * B)
    return first_mask_span(window.tokens.reshape(R, A * B) == mask_id, region)


def stop_committed(commit: torch.Tensor, tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """``[R]`` bool: a committed position (``commit [R, ...]``) holds one of the row's ``stop_ids [R, K]``
    (padded with -1, K may be 0); ``tokens`` has ``commit``'s shape."""
    R = commit.shape[0]
    flat_tokens, flat_commit = tokens.reshape(R, -1), commit.reshape(R, -1)
    is_stop = (flat_tokens[:, :, None] == stop_ids[:, None, :]).any(-1)
    return (is_stop & flat_commit).any(1)


def apply_commit(window: Window, commit: torch.Tensor, tokens: torch.Tensor, stop_ids: torch.Tensor) -> Window:
    """Write ``tokens [R, A, B]`` at ``commit [R, A, B]`` positions; a committed stop id sets ``stopped``."""
    new_tokens = torch.where(commit, tokens, window.tokens)
    return window._replace(tokens=new_tokens, stopped=window.stopped | stop_committed(commit, tokens, stop_ids))


def mark_to_cache(window: Window, mask_id: int) -> Window:
    """An ACTIVE block without masks becomes TO_CACHE iff no earlier block is still ACTIVE with masks, so
    consecutive finished blocks flip together and a finished block behind an unfinished one waits."""
    active = window.status == ACTIVE
    finished = active & ~(window.tokens == mask_id).any(-1)
    unfinished = (active & ~finished).long()
    earlier_unfinished = (torch.cumsum(unfinished, dim=1) - unfinished) > 0
    flip = finished & ~earlier_unfinished
    return window._replace(status=torch.where(flip, torch.full_like(window.status, TO_CACHE), window.status))


class Shifted(NamedTuple):
    window: Window  # the window without its leading TO_CACHE blocks, EMPTY slots appended
    num_dropped: torch.Tensor  # [R] long, TO_CACHE blocks dropped from the front


def shift_window(window: Window, mask_id: int) -> Shifted:
    """Drop the leading TO_CACHE blocks (their KV is written) and refill EMPTY slots at the end."""
    A = window.status.shape[1]
    num_dropped = torch.cumprod((window.status == TO_CACHE).long(), dim=1).sum(1)
    src = _slots(window) + num_dropped[:, None]  # [R, A]
    valid = src < A
    src = src.clamp(max=A - 1)
    B = window.tokens.shape[2]
    tokens = window.tokens.gather(1, src[:, :, None].expand(-1, -1, B))
    tokens = torch.where(valid[:, :, None], tokens, torch.full_like(tokens, mask_id))
    status = torch.where(valid, window.status.gather(1, src), torch.full_like(window.status, EMPTY))
    full = valid & window.full.gather(1, src)
    return Shifted(Window(tokens, status, full, window.blocks_opened, window.stopped), num_dropped)


class WindowPrefix(NamedTuple):
    length: torch.Tensor  # [R] leading filled positions of the occupied slots (flat [R, A*B] view)
    stop: torch.Tensor  # [R] bool, a stop id inside that run
    first_stop: torch.Tensor  # [R] flat index of the first stop id inside it (A*B if none)


def window_final_prefix(window: Window, mask_id: int, stop_ids: torch.Tensor) -> WindowPrefix:
    """The leading run of filled tokens over the occupied slots (TO_CACHE then ACTIVE), from the window start up
    to the first mask or EMPTY slot, and the first stop id in it (``stop_ids [R, K]``, padded with -1)."""
    R, A, B = window.tokens.shape
    flat = window.tokens.reshape(R, A * B)
    blocking = (flat == mask_id) | (window.status == EMPTY)[:, :, None].expand(R, A, B).reshape(R, A * B)
    none = torch.full((R,), A * B, dtype=torch.long, device=flat.device)
    length = torch.where(blocking.any(1), blocking.int().argmax(1), none)
    inside = torch.arange(A * B, device=flat.device)[None, :] < length[:, None]
    is_stop = (flat[:, :, None] == stop_ids[:, None, :]).any(-1) & inside
    first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), none)
    return WindowPrefix(length, is_stop.any(1), first_stop)
