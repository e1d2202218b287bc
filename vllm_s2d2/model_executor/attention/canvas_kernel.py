"""Canvas attention: one Triton kernel for every decode step (draft, commit, 2L verify) with a per-request
``W x W`` visibility table -- the building block for FULL CUDA graphs of uniform decode batches.

Why: with ranges (``mm_req_doc_ranges``, rebuilt per step) and a separate verify launch, the decode forward
can only use PIECEWISE graphs, whose eager attention costs ~7 ms of host time per step on SDAR-1.7B shapes
(``benchmarks/results/2026-11-22-profile_step-6103e92.json``).  Every decode mask of this engine has one form:
a request whose canvas starts at its committed length ``p`` sees **all** cached keys ``k < p``, and canvas query
``i`` sees canvas key ``j`` iff ``vis[r, i, j]``::

    keys:     0 ............ p-1 | p ...... p+W-1
    query i:  all visible         | vis[r, i, :]          (W = 2B canvas slots)

so the whole step is described by ``p`` (from ``seq_lens - query_len``) and a ``[R, W, W]`` table that the
stepper can write into a persistent buffer inside its own CUDA graph.  :func:`canvas_visibility` builds the
table from the stepper's ranges (draft / commit rows) and the 2L pattern (verify rows).

Status: kernel and table are checked against dense masks (CPU interpreter in CI, compiled on GPU); the engine
does not use them yet (its attention backend still runs vLLM's kernel with ranges + the verify launch).
"""

from __future__ import annotations

import torch

try:  # Triton is present wherever vLLM is; the table builder below needs only torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def canvas_visibility(spec: torch.Tensor, p: torch.Tensor, q_len: torch.Tensor, verifying: torch.Tensor,
                      verify_pattern: torch.Tensor) -> torch.Tensor:
    """``[R, W, W]`` bool table of the canvas region.

    ``spec [R, 4]``: the stepper's absolute ranges ``lo1, hi1, lo2, hi2`` (inclusive; ``lo >= hi`` = none) with
    the semantics of vLLM's ``mm_req_doc_ranges`` (token-causal OR both inside one range), clipped to the keys
    present (``< p + q_len``); ``verifying [R]`` rows take ``verify_pattern [W, W]`` (the 2L mask,
    :func:`~vllm_s2d2.core.masks.verifier_qq_bias` != -inf) instead."""
    R, W = spec.shape[0], verify_pattern.shape[0]
    idx = torch.arange(W, device=spec.device)
    q = p[:, None] + idx[None, :]  # [R, W] absolute positions of the canvas slots
    vis = idx[None, :, None] >= idx[None, None, :]  # token-causal inside the canvas
    last = (p + q_len - 1)[:, None]
    for c in (0, 2):
        lo, hi = spec[:, c:c + 1].long(), torch.minimum(spec[:, c + 1:c + 2].long(), last)
        inside = (q >= lo) & (q <= hi) & (lo < hi)  # [R, W]
        vis = vis | (inside[:, :, None] & inside[:, None, :])
    return torch.where(verifying[:, None, None], verify_pattern[None].expand(R, W, W), vis)


if triton is not None:

    @triton.jit
    def _canvas_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, vis_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
                                 scale,
                                 stride_qt, stride_qh, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo,
                                 stride_vh, stride_ot, stride_oh, stride_btr, stride_visr,
                                 G: tl.constexpr, W: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                                 BLOCK_M: tl.constexpr, TILE: tl.constexpr):
        r = tl.program_id(0)
        kvh = tl.program_id(1)
        q_start = tl.load(qsl_ptr + r)
        q_len = tl.load(qsl_ptr + r + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + r)
        if q_len > 0:
            p = seq_len - q_len  # committed length: keys below it are all visible
            m_idx = tl.arange(0, BLOCK_M)
            qi = m_idx // G  # canvas slot of the row
            head = kvh * G + m_idx % G
            row_ok = qi < q_len
            d = tl.arange(0, D)
            q = tl.load(q_ptr + (q_start + qi)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D], tl.float32)
            for start in range(0, seq_len, TILE):
                n = start + tl.arange(0, TILE)
                n_ok = n < seq_len
                blk = tl.load(block_table_ptr + r * stride_btr + n // PAGE, mask=n_ok, other=0)
                off = n % PAGE
                k = tl.load(k_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ko + kvh * stride_kh
                            + d[None, :], mask=n_ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) * scale
                j = n - p
                in_canvas = (j >= 0) & n_ok
                cv = tl.load(vis_ptr + r * stride_visr + qi[:, None] * W + j[None, :],
                             mask=row_ok[:, None] & in_canvas[None, :], other=0)
                visible = n_ok[None, :] & ((j < 0)[None, :] | (cv != 0)) & row_ok[:, None]
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                pr = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(pr, 1)
                v = tl.load(v_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vo + kvh * stride_vh
                            + d[None, :], mask=n_ok[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
                m_i = m_new
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(o_ptr + (q_start + qi)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def canvas_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                     vis: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                     query_start_loc: torch.Tensor, scale: float, tile: int = 32) -> None:
    """``q / out [T, Hq, D]``; ``key_cache / value_cache [blocks, page, Hkv, D]`` (strided views are fine);
    ``vis [R, W, W]`` (bool or int8; rows of a request beyond its query length are ignored); ``block_table
    [R, pages]``; ``seq_lens [R]`` = committed length + query length; ``query_start_loc [R + 1]``.  Requests
    with no query tokens (padding) are skipped."""
    R, W = vis.shape[0], vis.shape[1]
    hq, d = q.shape[1], q.shape[2]
    hkv, page = key_cache.shape[2], key_cache.shape[1]
    G = hq // hkv
    block_m = max(16, triton.next_power_of_2(W * G))
    vis_i8 = vis.to(torch.int8).contiguous()
    for t in (q, out):
        assert t.stride(2) == 1
    assert key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    _canvas_attention_kernel[(R, hkv)](
        q, key_cache, value_cache, out, vis_i8, block_table, seq_lens, query_start_loc, scale,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), out.stride(0), out.stride(1),
        block_table.stride(0), vis_i8.stride(0),
        G=G, W=W, D=d, PAGE=page, BLOCK_M=block_m, TILE=tile)
