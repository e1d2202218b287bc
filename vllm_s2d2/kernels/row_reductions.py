"""Vocabulary-row reductions in a fixed order: one Triton program per row, the same summation order whatever the
number of rows (docs/architecture.md, "Batch-invariant step math").

PyTorch's CUDA reductions pick their launch shape from the number of outputs: a sum over a row of V = 151,936
floats is split over several thread blocks when there are few rows and over one when there are many, so the
same row sums to different last bits alone and in a batch.  vLLM's batch-invariant mode (``VLLM_BATCH_INVARIANT=1``)
makes GEMMs and attention batch-invariant and replaces ``torch.softmax`` by ``amax`` / ``exp`` / ``torch.sum``,
whose sum is such a reduction.  These kernels give a row's softmax and sum the same bits in any batch: each
program walks its row in ``BLOCK``-wide chunks in order and reduces its accumulator with one ``tl.sum`` of fixed
shape.  (Prefix sums are done in integers instead, :func:`vllm_s2d2.core.reductions.cumsum`: a parallel scan
in floats is neither batch-invariant nor monotone.)

Inputs are fp32 ``[..., V]`` (contiguous in the last dimension); outputs are fp32.  Used through
:mod:`vllm_s2d2.core.reductions`, which decides when.  The module imports nothing from the package.
"""

from __future__ import annotations

import torch

try:  # Triton is present wherever vLLM is
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

BLOCK = 2048
NUM_WARPS = 8

if triton is not None:

    @triton.jit
    def _softmax_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        out_row = out_ptr + row * stride_out
        offs = tl.arange(0, BLOCK)
        running_max = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            running_max = tl.maximum(running_max, tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")))
        row_max = tl.max(running_max, axis=0)
        partial = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf"))
            partial += tl.where(cols < n_cols, tl.exp(x - row_max), 0.0)
        total = tl.sum(partial, axis=0)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf"))
            tl.store(out_row + cols, tl.exp(x - row_max) / total, mask=cols < n_cols)

    @triton.jit
    def _sum_kernel(x_ptr, out_ptr, n_cols, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        offs = tl.arange(0, BLOCK)
        partial = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            partial += tl.load(x_row + cols, mask=cols < n_cols, other=0.0)
        tl.store(out_ptr + row, tl.sum(partial, axis=0))

    @triton.jit
    def _entropy_collision_kernel(p_ptr, entropy_ptr, collision_ptr, n_cols, stride_p, BLOCK: tl.constexpr):
        # one pass over a row of probabilities: sum -p ln p (0 at p = 0) and sum p^2
        row = tl.program_id(0).to(tl.int64)
        p_row = p_ptr + row * stride_p
        offs = tl.arange(0, BLOCK)
        entropy = tl.zeros([BLOCK], tl.float32)
        collision = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            p = tl.load(p_row + cols, mask=cols < n_cols, other=0.0)
            entropy += tl.where(p > 0, -p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)
            collision += p * p
        tl.store(entropy_ptr + row, tl.sum(entropy, axis=0))
        tl.store(collision_ptr + row, tl.sum(collision, axis=0))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a fp32 ``[N, V]`` tensor with unit stride along V (a view where it already is one)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32:
        x2 = x2.float()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension; fp32, the shape of ``x``."""
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    if rows.numel():
        _softmax_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), out.stride(0), BLOCK=BLOCK,
                                          num_warps=NUM_WARPS)
    return out.view(x.shape)


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension; fp32, ``x.shape[:-1]``."""
    rows = _rows(x)
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        _sum_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out.view(x.shape[:-1])


def entropy_and_collision(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum -p ln p, sum p^2)`` over the last dimension of probabilities, in one pass; fp32, ``p.shape[:-1]``
    each (no ``[..., V]`` temporary)."""
    rows = _rows(p)
    entropy = torch.empty(rows.shape[0], dtype=torch.float32, device=p.device)
    collision = torch.empty_like(entropy)
    if rows.shape[0]:
        _entropy_collision_kernel[(rows.shape[0],)](rows, entropy, collision, rows.shape[1], rows.stride(0),
                                                    BLOCK=BLOCK, num_warps=NUM_WARPS)
    return entropy.view(p.shape[:-1]), collision.view(p.shape[:-1])
