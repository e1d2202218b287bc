"""Persistent buffers with staged host writes, and the canvas-logits gather.

vLLM's own ``StagedWriteTensor`` / ``UvaBufferPool`` (``vllm/v1/worker/gpu/buffer_utils.py``) write through UVA
memory and a Triton kernel, which the CPU emulation of the engine (``tests/engine_emulator.py``) cannot run;
:class:`StagedRows` is the small equivalent the engine needs: per-slot rows are staged on the host when a
request arrives and copied to the device once, before the next step.
"""

from __future__ import annotations

import torch


def copy_to_device(cpu: torch.Tensor, dev: torch.Tensor) -> None:
    """Host-to-device copy that never races later host writes (from a pinned snapshot on CUDA)."""
    if dev.device.type == "cuda":
        dev.copy_(cpu.pin_memory(), non_blocking=True)
    else:
        dev.copy_(cpu)


class StagedRows:
    """A ``[rows, cols]`` device matrix whose rows are written on the host (``stage``) and copied over in one
    transfer by :meth:`apply` (only when something was staged)."""

    def __init__(self, num_rows: int, num_cols: int, dtype: torch.dtype, device: torch.device, fill=0):
        self.cpu = torch.full((num_rows, num_cols), fill, dtype=dtype)
        self.gpu = self.cpu.to(device)
        self._staged = False

    def stage(self, row: int, values) -> None:
        """Write ``values`` (a full row) into the host copy of ``row``."""
        self.cpu[row] = torch.as_tensor(values, dtype=self.cpu.dtype)
        self._staged = True

    def apply(self) -> None:
        if self._staged:
            copy_to_device(self.cpu, self.gpu)
            self._staged = False


def gather_rows(logits: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[R, B, V]``: canvas logits rows ``rows [R, B]`` where ``valid``, zeros elsewhere (static shapes)."""
    R, B = rows.shape
    rows = torch.where(valid, rows, torch.zeros_like(rows)).clamp(0, max(logits.shape[0] - 1, 0))
    out = logits[rows.reshape(-1)].view(R, B, -1)
    return torch.where(valid[..., None], out, torch.zeros_like(out))
