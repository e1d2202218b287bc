"""The step's reductions: softmax, sums and prefix sums over the vocabulary, the product scan over a block --
batch-invariant when asked.

With vLLM's batch-invariant kernels (``VLLM_BATCH_INVARIANT=1``) a request's logits no longer depend on the batch
around it, but PyTorch's own reductions still do: a sum over V floats is split over more thread blocks when the
batch has fewer rows, and vLLM's batch-invariant ``softmax`` sums with such a reduction; a one-row prefix sum
takes another algorithm than a many-row one.  The step's probabilities, entropies, Renyi sums and
inverse-CDF draws would then move in their last bits with the batch, and S2D2's thresholds and acceptance tests
flip on such bits now and then.  :func:`fixed_order_wanted` turns on the fixed-order Triton kernels of
:mod:`vllm_s2d2.kernels.row_reductions` for CUDA tensors (and for CPU tensors under Triton's interpreter, for
the tests); otherwise these are the plain torch operations.

Prefix sums need no kernel: in fixed-order mode they are integer sums (:func:`cumsum`), exact in any order; the
block's product scan (:func:`cumprod`) is a Hillis-Steele scan of elementwise products.

``VLLM_S2D2_FIXED_ORDER_REDUCTIONS``: ``1`` on, ``0`` off, unset: on exactly in vLLM's batch-invariant mode.
Read at each call (a host-side fact: a CUDA graph keeps the branch it was captured with).
"""

from __future__ import annotations

import os

import torch

from vllm_s2d2.env import env_switch

FIXED_ORDER_ENV = "VLLM_S2D2_FIXED_ORDER_REDUCTIONS"


def batch_invariant_mode() -> bool:
    """``VLLM_BATCH_INVARIANT`` read as vLLM reads it (``bool(int(value))``, unset = 0; vLLM itself rejects a
    value that is not an integer at start-up)."""
    try:
        return bool(int(os.environ.get("VLLM_BATCH_INVARIANT", "0") or "0"))
    except ValueError:
        return False


def fixed_order_wanted() -> bool:
    """Whether the step's vocabulary reductions use the fixed-order kernels (see the module docstring)."""
    return env_switch(FIXED_ORDER_ENV, batch_invariant_mode())


def _use_kernels(x: torch.Tensor) -> bool:
    if not fixed_order_wanted():
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def softmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, -1)`` (fp32 input)."""
    if _use_kernels(x):
        from vllm_s2d2.kernels import row_reductions
        return row_reductions.softmax(x)
    return torch.softmax(x, dim=-1)


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(-1)`` (fp32 input)."""
    if _use_kernels(x):
        from vllm_s2d2.kernels import row_reductions
        return row_reductions.row_sum(x)
    return x.sum(dim=-1)


def entropy_and_collision(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entr(probs).sum(-1), vecdot(probs, probs))``: the Shannon entropy (nats) and the collision probability
    (Renyi-2's sum) of each row; with the kernels, one pass and no ``[..., V]`` temporary."""
    if _use_kernels(probs):
        from vllm_s2d2.kernels import row_reductions
        return row_reductions.entropy_and_collision(probs)
    return torch.special.entr(probs).sum(dim=-1), torch.linalg.vecdot(probs, probs)


FIXED_POINT_ONE = 2 ** 40  # a probability's unit in the fixed-order prefix sum


def cumsum(x: torch.Tensor) -> torch.Tensor:
    """``torch.cumsum(x, -1)`` of probabilities (fp32 in [0, 1]).  Fixed order: in integers -- each value
    floored to a multiple of 2**-40, summed exactly in int64 and converted back -- so the result depends on no
    summation order at all, never decreases, and stays flat across a zero (an inverse-CDF draw never lands on a
    probability-0 token; a float scan in parallel tiles guarantees neither: it rounded 4 of 4 rows differently
    alone than in a batch on an H100, benchmarks/reductions_bench.py)."""
    if not fixed_order_wanted():
        return torch.cumsum(x, dim=-1)
    units = torch.floor(x.float() * FIXED_POINT_ONE).long()  # exact: x <= 1 and the scale is a power of two
    return (torch.cumsum(units, dim=-1).double() / FIXED_POINT_ONE).float()


def cumprod(x: torch.Tensor) -> torch.Tensor:
    """``torch.cumprod(x, -1)`` for short rows (a block's positions).  Fixed order: a Hillis-Steele scan of
    elementwise products (log2 of the row length passes), the same association for every row, where
    ``torch.cumprod`` runs another algorithm for a one-row tensor than for a many-row one."""
    if not fixed_order_wanted():
        return torch.cumprod(x, dim=-1)
    out, shift = x, 1
    while shift < x.shape[-1]:
        out = torch.cat([out[..., :shift], out[..., shift:] * out[..., :-shift]], dim=-1)
        shift *= 2
    return out
