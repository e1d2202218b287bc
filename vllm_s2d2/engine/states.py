"""Named per-slot state of the engine: the open block of every request slot (device) and each request's fixed
facts (host master copy, staged to the device).

Every per-slot buffer has ``max_num_reqs + 1`` rows; the last one, ``scratch``, absorbs the writes of the
padding rows of a CUDA-graph step and is never read back.
"""

from __future__ import annotations

from dataclasses import fields
from typing import NamedTuple, Sequence

import numpy as np
import torch

from vllm_s2d2.core.masks import verifier_2l
from vllm_s2d2.core.params import FamilyRules
from vllm_s2d2.core.policies import PolicyState
from vllm_s2d2.engine.buffer_utils import StagedRows
from vllm_s2d2.engine.stats import STAT_NAMES

# Phase of a slot's coming step (docs/lifecycle.md).
DRAFT, COMMIT, VERIFY = 0, 1, 2
NO_LIMIT = 2 ** 62  # max_tokens of a request without one


def pick_rows(keep: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per row (dim 0): ``new`` where ``keep [R]``, else ``old``."""
    return torch.where(keep.view(-1, *([1] * (new.dim() - 1))), new, old)


_POLICY_FIELDS = tuple(f.name for f in fields(PolicyState))  # (a constant: torch.compile traces pick_policy)


def pick_policy(old: PolicyState, new: PolicyState, keep: torch.Tensor) -> PolicyState:
    """Per row: ``new`` where ``keep``, else ``old``."""
    return PolicyState(*(pick_rows(keep, getattr(new, name), getattr(old, name)) for name in _POLICY_FIELDS))


class BlockStates:
    """The open block of every slot, on the device: what a decode step reads and writes."""

    def __init__(self, num_slots: int, block_size: int, mask_token_id: int, device: torch.device,
                 canvas_width: int | None = None, verify_block_size: int = 1):
        """``block_size``: the block (a D2F window of A blocks is one block of A·B here); ``canvas_width``: W
        (default 2B); ``verify_block_size``: the target block size of the 2L verify pattern."""
        long = dict(dtype=torch.int64, device=device)
        B = block_size
        self.tokens = torch.full((num_slots, B), mask_token_id, **long)  # block, mask id where masked
        self.block_start = torch.zeros(num_slots, **long)  # absolute position of the block's column 0
        self.step_idx = torch.zeros(num_slots, **long)  # denoising steps done in this block (quota lookup)
        self.rng_counter = torch.zeros(num_slots, **long)  # one value per draft step, as the reference's
        self.phase = torch.zeros(num_slots, **long)  # DRAFT / COMMIT / VERIFY
        self.post_steps = torch.zeros(num_slots, **long)  # LLaDA2.1 editing passes after the last mask
        W = canvas_width or 2 * B
        self.canvas = torch.full((num_slots, W), mask_token_id, **long)  # next step's input tokens
        # Next step's attention among the canvas slots (keys below the canvas are all visible) and RoPE offsets
        # (-B on the mask half of a 2L verify canvas, which sits at the first half's positions).  Tables start
        # token-causal, which is also what the scratch slot keeps.
        self.canvas_tables = torch.ones(W, W, dtype=torch.int8, device=device).tril().expand(
            num_slots, W, W).contiguous()
        self.pos_offset = torch.zeros(num_slots, W, **long)
        self.verify_pattern = verifier_2l(0, B, device, tbs=verify_block_size)  # [2B, 2B] every 2L verify canvas
        self.policy = PolicyState.zeros(num_slots, device)  # routing policy state
        # The routing state before the draft step that started a slot's pending verification: a preempted
        # verification is redone from that draft, which must route from the same state.
        self.policy_before_verify = PolicyState.zeros(num_slots, device)
        self.stats = torch.zeros(num_slots, len(STAT_NAMES), **long)  # per-request counters
        self.totals = torch.zeros(len(STAT_NAMES), **long)  # engine-wide counters
        # Engine-wide, per span position i (vLLM's per-position spec-decode acceptance): verifications whose span
        # reached position i / whose accepted prefix covered it.  Sums equal totals' proposed / accepted tokens.
        self.proposed_per_pos = torch.zeros(B, **long)
        self.accepted_per_pos = torch.zeros(B, **long)

    def reset(self, slots: torch.Tensor) -> None:
        """A new request in ``slots``: counters, phase and policy state start afresh."""
        self.rng_counter[slots] = 0
        self.step_idx[slots] = 0
        self.phase[slots] = DRAFT
        self.post_steps[slots] = 0
        self.pos_offset[slots] = 0
        self.stats[slots] = 0
        self.policy.scatter_(slots, PolicyState.zeros(slots.numel(), slots.device))

    def snapshot(self, slot: int) -> torch.Tensor:
        """Device copy of a slot's block (for a resume after preemption): ``[B tokens, SNAPSHOT_FIELDS...]``."""
        return torch.cat([self.tokens[slot]] + [getattr(self, name)[slot:slot + 1] for name in SNAPSHOT_FIELDS])

    def saved_policy(self, slot: int) -> PolicyState:
        """Device copy of the routing state a resumed request continues from: the current one, or for a slot in
        VERIFY the one before the draft step the resume redoes."""
        rows = slice(slot, slot + 1)
        return pick_policy(self.policy.index(rows), self.policy_before_verify.index(rows), self.phase[rows] == VERIFY)

    def restore_policy(self, slot: int, policy: PolicyState) -> None:
        self.policy.scatter_(slice(slot, slot + 1), policy)


class SavedRequest(NamedTuple):
    """What a preempted request keeps for its resume (device tensors): its block (or D2F window) state, flat, and
    its routing state (:meth:`BlockStates.saved_policy`)."""

    state: torch.Tensor
    policy: PolicyState


SNAPSHOT_FIELDS = ("block_start", "step_idx", "rng_counter", "phase", "post_steps")


class SnapshotView(NamedTuple):
    tokens: torch.Tensor
    block_start: torch.Tensor
    step_idx: torch.Tensor
    rng_counter: torch.Tensor
    phase: torch.Tensor
    post_steps: torch.Tensor

    @classmethod
    def of(cls, saved: torch.Tensor, block_size: int) -> "SnapshotView":
        return cls(saved[:block_size], *saved[block_size:block_size + len(SNAPSHOT_FIELDS)])


class WindowStates:
    """D2F: the window of every slot (``core.pipeline.Window`` fields, ``[S, A, B]`` / ``[S, A]`` / ``[S]``), the
    number of blocks a request may open, and (shift-aligned Dream) the logit of its last committed row."""

    def __init__(self, num_slots: int, num_blocks: int, block_size: int, mask_token_id: int, device: torch.device):
        long = dict(dtype=torch.int64, device=device)
        self.tokens = torch.full((num_slots, num_blocks, block_size), mask_token_id, **long)
        self.status = torch.zeros(num_slots, num_blocks, **long)  # core.pipeline EMPTY / ACTIVE / TO_CACHE
        self.full = torch.zeros(num_slots, num_blocks, dtype=torch.bool, device=device)
        self.blocks_opened = torch.zeros(num_slots, **long)
        self.stopped = torch.zeros(num_slots, dtype=torch.bool, device=device)
        self.max_blocks = torch.zeros(num_slots, **long)  # blocks the request may open (max_tokens, max_model_len)
        self.carried: torch.Tensor | None = None  # [S, V] Dream: raw logit of the last committed row

    def gather(self, slots: torch.Tensor):
        from vllm_s2d2.core.pipeline import Window

        return Window(self.tokens[slots], self.status[slots], self.full[slots], self.blocks_opened[slots],
                      self.stopped[slots])

    def scatter(self, slots: torch.Tensor, window) -> None:
        self.tokens[slots] = window.tokens
        self.status[slots] = window.status
        self.full[slots] = window.full
        self.blocks_opened[slots] = window.blocks_opened
        self.stopped[slots] = window.stopped

    def snapshot(self, slot: int) -> torch.Tensor:
        """Device copy of a slot's window (for a resume after preemption): flat int64."""
        return torch.cat([self.tokens[slot].reshape(-1), self.status[slot], self.full[slot].long(),
                          self.blocks_opened[slot:slot + 1], self.stopped[slot:slot + 1].long()])

    def restore(self, slot: int, saved: torch.Tensor) -> None:
        A, B = self.status.shape[1], self.tokens.shape[2]
        n = A * B
        self.tokens[slot] = saved[:n].view(A, B)
        self.status[slot] = saved[n:n + A]
        self.full[slot] = saved[n + A:n + 2 * A].bool()
        self.blocks_opened[slot] = saved[n + 2 * A]
        self.stopped[slot] = saved[n + 2 * A + 1].bool()


class FactsView(NamedTuple):
    """Fixed facts of a batch of slots (``[R]`` tensors; ``stop_ids [R, K]``, -1 = none)."""

    prompt_len: torch.Tensor
    max_tokens: torch.Tensor
    cache_ver: torch.Tensor
    draft_ver: torch.Tensor
    max_post_steps: torch.Tensor
    editing: torch.Tensor
    stop_ids: torch.Tensor


_FACT_COLUMNS = ("prompt_len", "max_tokens", "cache_ver", "draft_ver", "max_post_steps", "editing")


class RequestFacts:
    """What a request fixes on arrival: a device table (read by steps) and host arrays (read without touching
    the device: batch selection, prefill attention, graph keys)."""

    def __init__(self, num_slots: int, max_stop_ids: int, device: torch.device):
        self.max_stop_ids = max_stop_ids
        self.table = StagedRows(num_slots, len(_FACT_COLUMNS) + max_stop_ids, torch.int64, device)
        self.active = np.zeros(num_slots, dtype=bool)
        self.cache_ver = np.zeros(num_slots, dtype=bool)
        self.draft_ver = np.zeros(num_slots, dtype=bool)
        self.sampled_on = np.zeros(num_slots, dtype=bool)  # temperature > 0 (the others are greedy)
        self.top_k_on = np.zeros(num_slots, dtype=bool)
        self.top_p_on = np.zeros(num_slots, dtype=bool)
        self.verify_on = np.zeros(num_slots, dtype=bool)  # S2D2 verification enabled for the request
        self.prompt_len = np.zeros(num_slots, dtype=np.int64)

    def add(self, slot: int, *, prompt_len: int, max_tokens: int | None, cache_ver: bool, draft_ver: bool,
            max_post_steps: int, editing: bool, stop_ids: Sequence[int], sampled_on: bool, top_k_on: bool,
            top_p_on: bool, verify_on: bool) -> None:
        stops = list(dict.fromkeys(int(s) for s in stop_ids))[: self.max_stop_ids]  # a cut list only delays
        stops += [-1] * (self.max_stop_ids - len(stops))
        limit = NO_LIMIT if max_tokens is None else int(max_tokens)
        self.table.stage(slot, [prompt_len, limit, int(cache_ver), int(draft_ver), int(max_post_steps),
                                int(editing)] + stops)
        self.active[slot] = True
        self.cache_ver[slot] = cache_ver
        self.draft_ver[slot] = draft_ver
        self.sampled_on[slot] = sampled_on
        self.top_k_on[slot] = top_k_on
        self.top_p_on[slot] = top_p_on
        self.verify_on[slot] = verify_on
        self.prompt_len[slot] = prompt_len

    def gather(self, slots: torch.Tensor) -> FactsView:
        rows = self.table.gpu[slots]
        n = len(_FACT_COLUMNS)
        cols = [rows[:, j] for j in range(n)]
        for j in (2, 3, 5):  # cache_ver, draft_ver, editing
            cols[j] = cols[j].bool()
        return FactsView(*cols, rows[:, n:])


class BlockLayout(NamedTuple):
    """What every step of one engine shares: block and canvas sizes, the family's rules, the length cap."""

    block_size: int
    mask_token_id: int
    shifted: bool  # logit i predicts token i + 1 (Fast-dLLM v2): sub-blocks, causal verification
    sub_block: int  # positions one step may unmask (the block, or Fast-dLLM v2's sub-block)
    max_model_len: int
    rules: FamilyRules

    @property
    def canvas_length(self) -> int:
        return 2 * self.block_size
