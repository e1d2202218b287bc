"""The host's copy of what the next step's batch preparation must know: each slot's phase and attention ranges,
and the S2D2 counters.

:meth:`HostMirror.publish` starts the device-to-host copies at the end of every sampler call; :meth:`sync`
waits for them before the host reads.  vLLM has already waited for that step's sampled tokens by then, so the
wait costs nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_s2d2.engine.states import BlockStates
from vllm_s2d2.engine.stats import STAT_NAMES


class HostMirror:
    def __init__(self, blocks: BlockStates, device: torch.device):
        self.blocks = blocks
        pinned = device.type == "cuda"
        n = blocks.phase.shape[0]
        self.phase = np.zeros(n, dtype=np.int64)  # phases of the coming step, current after sync()
        self._phase = torch.zeros(n, dtype=torch.int64, pin_memory=pinned)
        self.attn_spec = torch.zeros(n, blocks.attn_spec.shape[1], dtype=torch.int32, pin_memory=pinned)
        self.stats = torch.zeros(n, len(STAT_NAMES), dtype=torch.int64, pin_memory=pinned)
        self.totals = torch.zeros(len(STAT_NAMES), dtype=torch.int64, pin_memory=pinned)
        self._event = torch.cuda.Event() if device.type == "cuda" else None
        self._pending = False

    def publish(self) -> None:
        """Start copying phases, attention ranges and counters to the host (non-blocking on CUDA)."""
        b = self.blocks
        non_blocking = self._event is not None
        self.attn_spec.copy_(b.attn_spec, non_blocking=non_blocking)
        self._phase.copy_(b.phase, non_blocking=non_blocking)
        self.totals.copy_(b.totals, non_blocking=non_blocking)
        self.stats.copy_(b.stats, non_blocking=non_blocking)
        if self._event is not None:
            self._event.record()
        self._pending = True

    def sync(self) -> None:
        """Make the host copies current (waits for the copies :meth:`publish` started)."""
        if not self._pending:
            return
        if self._event is not None:
            self._event.synchronize()
        self.phase[:] = self._phase.numpy()
        self._pending = False

    def totals_dict(self) -> dict[str, int]:
        self.sync()
        return dict(zip(STAT_NAMES, self.totals.tolist()))

    def slot_stats(self, slot: int) -> dict[str, int]:
        self.sync()
        return dict(zip(STAT_NAMES, self.stats[slot].tolist()))
