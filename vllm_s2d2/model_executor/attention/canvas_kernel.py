"""Canvas attention: one Triton kernel for the canvas rows of a step (draft, commit, 2L verify, W-token prefill
chunks), reading per-slot ``W x W`` visibility tables; the decode attention of the plugin's backend
(:mod:`.backend`, docs/architecture.md).

A canvas row of batch row ``r`` belongs to the request in slot ``s = row_slot[r]``; with its committed length
``p = seq_len - query_len`` it sees **every** cached key ``k < p``, and canvas query ``i`` sees canvas key ``j``
iff ``tables[s, i, j]``::

    keys:     0 ............ p-1 | p ...... p+W-1
    query i:  all visible         | tables[s, i, :]      (W = 2B canvas slots)

The tables live in a persistent buffer the engine writes on the device
(:func:`vllm_s2d2.core.masks.canvas_visibility`), and ``row_slot`` is a view of a persistent buffer, so a FULL CUDA
graph captured with them reads each step's values.  The kernel needs no host scalar: rows with ``row_slot < 0`` or
no query tokens (padding) are skipped, and its loads stay in range for any ``seq_len`` (at capture vLLM fills
``seq_lens`` with 1 while the query length is W, so ``p < 0``).
"""

from __future__ import annotations

import torch

try:  # Triton is present wherever vLLM is
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def _canvas_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, row_slot_ptr, block_table_ptr,
                                 seq_lens_ptr, qsl_ptr, prog_row_ptr, prog_off_ptr, scale,
                                 stride_qt, stride_qh, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo,
                                 stride_vh, stride_ot, stride_oh, stride_btr,
                                 G: tl.constexpr, W: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                                 BLOCK_M: tl.constexpr, TILE: tl.constexpr, CHUNKED: tl.constexpr):
        prog = tl.program_id(0)
        kvh = tl.program_id(1)
        slot = tl.load(row_slot_ptr + prog)
        if CHUNKED:  # program -> one W-token chunk (offset ``chunk_off``) of batch row ``r``'s query
            r = tl.load(prog_row_ptr + prog)
            chunk_off = tl.load(prog_off_ptr + prog)
            row_start = tl.load(qsl_ptr + r)
            row_len = tl.load(qsl_ptr + r + 1) - row_start
            q_start = row_start + chunk_off
            q_len = tl.minimum(row_len - chunk_off, W)
            seq_len = tl.load(seq_lens_ptr + r) - (row_len - chunk_off - q_len)  # keys up to the chunk's last query
        else:  # program -> batch row
            r = prog
            q_start = tl.load(qsl_ptr + r)
            q_len = tl.load(qsl_ptr + r + 1) - q_start
            seq_len = tl.load(seq_lens_ptr + r)
        if (slot >= 0) & (q_len > 0):
            p = seq_len - q_len  # committed length: keys below it are all visible
            table = tables_ptr + slot.to(tl.int64) * (W * W)
            m_idx = tl.arange(0, BLOCK_M)
            qi = m_idx // G  # canvas slot of the row
            head = kvh * G + m_idx % G
            row_ok = (qi < q_len) & (qi < W)
            d = tl.arange(0, D)
            q_row = (q_start + qi).to(tl.int64)
            q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D], tl.float32)
            for start in range(0, seq_len, TILE):
                n = start + tl.arange(0, TILE)
                n_ok = n < seq_len
                blk = tl.load(block_table_ptr + r * stride_btr + n // PAGE, mask=n_ok, other=0).to(tl.int64)
                off = n % PAGE
                k = tl.load(k_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ko + kvh * stride_kh
                            + d[None, :], mask=n_ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) * scale
                j = n - p
                in_canvas = (j >= 0) & (j < W) & n_ok
                cv = tl.load(table + qi[:, None] * W + j[None, :], mask=row_ok[:, None] & in_canvas[None, :],
                             other=0)
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
            tl.store(o_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def canvas_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                     tables: torch.Tensor, row_slot: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                     query_start_loc: torch.Tensor, scale: float, tile: int = 32,
                     chunks: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Attention of the canvas rows into ``out`` (other rows untouched).

    ``q / out [T, Hq, D]``; ``key_cache / value_cache [blocks, page, Hkv, D]`` (strided views are fine);
    ``tables [num_slots, W, W]`` int8, contiguous (a table's rows beyond a request's query length are ignored);
    ``row_slot [R]`` int32 (-1: not a canvas row); ``block_table [>= R, pages]``; ``seq_lens [>= R]`` = committed
    length + query length; ``query_start_loc [>= R + 1]``.  No copies are made: under a FULL CUDA graph only the
    capture-time buffers are read.

    ``chunks = (chunk_row, chunk_offset)`` (int32 ``[C]`` each): one program per W-token chunk of a longer query
    instead of one per batch row -- chunk ``c`` is the queries ``[offset, offset + W)`` of batch row ``chunk_row[c]``
    with the table ``tables[row_slot[c]]`` (``row_slot`` is then indexed by chunk).  Every chunk walks the keys in
    the same ``tile``-sized, position-aligned tiles as a canvas row does, so a query's output depends only on its
    visible keys, not on how the step cut its row (:func:`vllm_s2d2.engine.attention.plan_prefill_chunks`)."""
    assert tables.dtype == torch.int8 and tables.is_contiguous() and tables.dim() == 3, "tables: contiguous int8"
    assert tables.shape[1] == tables.shape[2]
    R, W = row_slot.numel(), tables.shape[1]
    hq, d = q.shape[1], q.shape[2]
    hkv, page = key_cache.shape[2], key_cache.shape[1]
    G = hq // hkv
    block_m = max(16, triton.next_power_of_2(W * G))
    assert q.stride(2) == 1 and out.stride(2) == 1
    assert key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    if chunks is not None:
        chunk_row, chunk_offset = chunks
        assert chunk_row.numel() == chunk_offset.numel() == R, "one row_slot entry per chunk"
    else:
        chunk_row = chunk_offset = row_slot  # unread (CHUNKED=False)
    if R == 0:
        return
    _canvas_attention_kernel[(R, hkv)](
        q, key_cache, value_cache, out, tables, row_slot, block_table, seq_lens, query_start_loc, chunk_row,
        chunk_offset, scale,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), out.stride(0), out.stride(1),
        block_table.stride(0),
        G=G, W=W, D=d, PAGE=page, BLOCK_M=block_m, TILE=tile, CHUNKED=chunks is not None)
