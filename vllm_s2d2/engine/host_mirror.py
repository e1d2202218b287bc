"""The host's copy of the S2D2 counters (per slot and engine-wide, and the engine-wide per-position span counts),
for statistics only, and of each slot's phase after the last decode step, which tells the next step whether any
of its rows verifies (:class:`~vllm_s2d2.engine.step.StepFlags`).

:meth:`HostMirror.publish` starts the counters' device-to-host copies at the end of every sampler call; :meth:`sync`
waits for them when the host reads counters (a request leaving, a metrics poll).  :meth:`copy_phases` runs after
every decode step; :meth:`in_verify` waits for that copy (long finished by then: the runner has waited for the
step's tokens since).
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_s2d2.engine.states import VERIFY, BlockStates
from vllm_s2d2.engine.stats import STAT_NAMES


class HostMirror:
    def __init__(self, blocks: BlockStates, device: torch.device):
        self.blocks = blocks
        pinned = device.type == "cuda"
        n = blocks.stats.shape[0]
        self.stats = torch.zeros(n, len(STAT_NAMES), dtype=torch.int64, pin_memory=pinned)
        self.totals = torch.zeros(len(STAT_NAMES), dtype=torch.int64, pin_memory=pinned)
        B = blocks.accepted_per_pos.shape[0]
        self.proposed_per_pos = torch.zeros(B, dtype=torch.int64, pin_memory=pinned)
        self.accepted_per_pos = torch.zeros(B, dtype=torch.int64, pin_memory=pinned)
        self.phase = torch.zeros(n, dtype=torch.int64, pin_memory=pinned)
        self._phase_np = self.phase.numpy()  # the same host memory, read without torch
        self._event = torch.cuda.Event() if device.type == "cuda" else None
        self._phase_event = torch.cuda.Event() if device.type == "cuda" else None
        self._pending = False

    def publish(self) -> None:
        """Start copying the counters to the host (non-blocking on CUDA)."""
        b = self.blocks
        non_blocking = self._event is not None
        self.totals.copy_(b.totals, non_blocking=non_blocking)
        self.stats.copy_(b.stats, non_blocking=non_blocking)
        self.proposed_per_pos.copy_(b.proposed_per_pos, non_blocking=non_blocking)
        self.accepted_per_pos.copy_(b.accepted_per_pos, non_blocking=non_blocking)
        if self._event is not None:
            self._event.record()
        self._pending = True

    def copy_phases(self) -> None:
        """Start copying every slot's phase to the host (after each decode step; non-blocking on CUDA)."""
        self.phase.copy_(self.blocks.phase, non_blocking=self._phase_event is not None)
        if self._phase_event is not None:
            self._phase_event.record()

    def in_verify(self, slots_np: np.ndarray) -> np.ndarray:
        """Per slot, whether it was in VERIFY after the last decode step.  Only a decode step puts a slot in VERIFY
        (a new or resumed request starts in DRAFT or COMMIT), so a slot in VERIFY now is True here; a True may be
        stale (the slot was reset since), which only costs the verify math one step."""
        if self._phase_event is not None and not self._phase_event.query():
            # Not reached while serving: async scheduling is off (engine/config_hooks.py), so the runner waited
            # for the last step's tokens, which were copied after these phases on the same stream.
            self._phase_event.synchronize()
        return self._phase_np[slots_np] == VERIFY

    def sync(self) -> None:
        """Make the host copies current (waits for the copies :meth:`publish` started)."""
        if not self._pending:
            return
        if self._event is not None:
            self._event.synchronize()
        self._pending = False

    def totals_dict(self) -> dict[str, int]:
        self.sync()
        return dict(zip(STAT_NAMES, self.totals.tolist()))

    def per_position(self) -> dict[str, list[int]]:
        """Engine-wide per span position: ``{"proposed_per_pos": [...], "accepted_per_pos": [...]}`` (B each)."""
        self.sync()
        return {"proposed_per_pos": self.proposed_per_pos.tolist(), "accepted_per_pos": self.accepted_per_pos.tolist()}

    def slot_stats(self, slot: int) -> dict[str, int]:
        self.sync()
        return dict(zip(STAT_NAMES, self.stats[slot].tolist()))
