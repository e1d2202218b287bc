"""What the engine hands the attention backend beyond vLLM's own metadata (no vLLM imports).

The model state builds a :class:`VerifyGroup` for the steps where some request verifies and attaches it to the
attention metadata as ``s2d2_verify``; :mod:`vllm_s2d2.model_executor.attention.backend` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VerifyGroup:
    """The verifying requests of one step, as the verify launch needs them (all on the device)."""

    rows: torch.Tensor  # [Nv * 2B] token rows of the batch (each request's 2B canvas rows, in order)
    cu_seqlens_q: torch.Tensor  # [Nv + 1] int32, 0, 2B, 4B, ...
    seqused_k: torch.Tensor  # [Nv] int32, committed length + 2B
    block_table: torch.Tensor  # [Nv, pages] int32
    max_seqlen_q: int
    max_seqlen_k: int
    qq_bias: torch.Tensor  # [2B, 2B] float32, 0 / -inf (vllm_s2d2.core.masks.verifier_qq_bias)
