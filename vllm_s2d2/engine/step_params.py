"""Per-slot :class:`~vllm_s2d2.core.params.StepParams`, packed into four staged device matrices."""

from __future__ import annotations

from dataclasses import fields

import torch

from vllm_s2d2.core.params import StepParams
from vllm_s2d2.engine.buffer_utils import StagedRows

_SKIPPED = ("quota", "top_k", "top_p")  # packed apart: quota is a row, top-k / top-p may be switched off
# D2F's acceptance knobs: packed for pipelined engines only (None elsewhere, the plain acceptance path), with their
# "off" values for requests that leave them unset.
_D2F_OFF = {"min_draft_confidence": -1.0, "resample_min_q": -1.0, "partial_accept_run": 0}


class PackedStepParams:
    """One row per slot of every ``StepParams`` field: floats, ints, bools and the quota table.

    ``set_row`` stages one request's values on the host; ``flush`` copies what changed to the device;
    ``gather(slots)`` returns a batched ``StepParams`` (four gathers instead of one per field)."""

    def __init__(self, num_slots: int, quota_width: int, template: StepParams, device: torch.device,
                 pipelined: bool = False):
        self.float_names, self.int_names, self.bool_names = [], [], []
        for fl in fields(StepParams):
            if fl.name in _SKIPPED or fl.name in _D2F_OFF:
                continue
            t = getattr(template, fl.name)
            (self.bool_names if t.dtype == torch.bool else
             self.int_names if not t.is_floating_point() else self.float_names).append(fl.name)
        self.float_names.append("top_p")
        self.int_names.append("top_k")
        self.d2f_names = tuple(_D2F_OFF) if pipelined else ()
        for name in self.d2f_names:
            (self.float_names if isinstance(_D2F_OFF[name], float) else self.int_names).append(name)
        self.floats = StagedRows(num_slots, len(self.float_names), torch.float32, device)
        self.ints = StagedRows(num_slots, len(self.int_names), torch.int64, device)
        self.bools = StagedRows(num_slots, len(self.bool_names), torch.bool, device)
        self.quota = StagedRows(num_slots, quota_width, torch.int64, device, fill=1)

    def set_row(self, slot: int, sp: StepParams) -> None:
        """Stage the (one-request) ``sp`` as row ``slot``."""
        off = dict(_D2F_OFF, top_p=1.0, top_k=0)  # the value of a knob the request leaves unset (None)
        self.floats.stage(slot, [float(off[n] if getattr(sp, n) is None else getattr(sp, n)[0])
                                 for n in self.float_names])
        self.ints.stage(slot, [int(off[n] if getattr(sp, n) is None else getattr(sp, n)[0]) for n in self.int_names])
        self.bools.stage(slot, [bool(getattr(sp, n)[0]) for n in self.bool_names])
        q = sp.quota[0]
        width = self.quota.cpu.shape[1]
        if q.numel() > width:
            raise ValueError(f"denoising quota of {q.numel()} steps exceeds the engine's table width {width}")
        self.quota.stage(slot, torch.cat([q, q[-1:].expand(width - q.numel())]))

    def flush(self) -> None:
        for table in (self.floats, self.ints, self.bools, self.quota):
            table.apply()

    def seed(self, slots: torch.Tensor) -> torch.Tensor:
        """``[R]`` the slots' RNG seeds (what ``gather(slots).seed`` holds)."""
        return self.ints.gpu[slots, self.int_names.index("seed")]

    def gather(self, slots: torch.Tensor, use_top_k: bool, use_top_p: bool) -> StepParams:
        f, i, b = self.floats.gpu[slots], self.ints.gpu[slots], self.bools.gpu[slots]
        kw = {n: f[:, j] for j, n in enumerate(self.float_names)}
        kw.update({n: i[:, j] for j, n in enumerate(self.int_names)})
        kw.update({n: b[:, j] for j, n in enumerate(self.bool_names)})
        kw["quota"] = self.quota.gpu[slots]
        kw.update({n: None for n in _D2F_OFF if n not in self.d2f_names})
        if not use_top_k:
            kw["top_k"] = None
        if not use_top_p:
            kw["top_p"] = None
        return StepParams(**kw)
