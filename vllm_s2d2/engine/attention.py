"""Per-request attention masks for the stock TRITON_ATTN backend: token-causal + bidirectional ranges.

Every mask this engine needs *without verification* is
"token-causal OR (q and k inside one of the request's ranges)", which is exactly the semantics of vLLM's
PrefixLM ``mm_req_doc_ranges`` in ``v1/attention/ops/triton_attention_helpers.py:compute_kv_seq_mask``::

    visible(q, k) = (k <= q  [causal])  OR  any_r (lo_r <= q <= hi_r AND lo_r <= k <= hi_r AND lo_r < hi_r)

with q, k absolute positions (``query_abs_pos = context_len + local index``; ranges inclusive; a range with
lo >= hi is ignored).  ``CommonAttentionMetadata.causal`` stays ``True`` (a plain bool), so no per-request
causal buffer is needed.  Ranges per step (p = first query position, block [bs, bs+B)):

* prefill, ``cache_ver``: causal, no range;  prefill, block-causal: one range per block segment of the chunk,
  the prompt's last (partial) block split at the prompt end (prompt rows never see generated tokens);
* DRAFT: ``[p + causal_prefix, bs + B - 1]`` (``causal_prefix`` = rows before the first mask, ``draft_ver``);
  the filler rows after the block are causal and nobody reads them;
* COMMIT (+ next draft): ``[p, bs + B - 1]`` unless ``cache_ver`` (then token-causal rows), and
  ``[bs + B, bs + 2B - 1]`` for the next block.

Cost: the Triton builder turns the dict into a ``[num_reqs, max_ranges, 2]`` tensor on every build
(``backends/utils.py:compute_mm_prefix_range_tensor``: a small host-to-device copy) and the kernel then scans
whole sequences (no causal tile skipping) and tests each range per tile.  The tensor is rebuilt per step, so
FULL CUDA graphs would replay a stale mask: the config hook selects PIECEWISE graphs (attention runs eagerly
between the captured pieces).  Block-causal prefill (``cache_ver=false``) needs one range per block, which is
slow for long prompts (counts are padded to a power of two to bound Triton recompiles); SDAR's default
``cache_ver=true`` needs none.  Without ``cache_ver`` the config hook disables chunked prefill: a chunk cut inside
a block could not see the block's later prompt tokens.
"""

from __future__ import annotations

import numpy as np
import torch

Ranges = dict[int, list[tuple[int, int]]]


def decode_ranges(spec_rows: np.ndarray, seq_lens: np.ndarray) -> list[list[tuple[int, int]]]:
    """Ranges of decoding requests from the stepper's ``attn_spec`` rows ``[n, 4]`` (clipped to the keys that
    exist this step, ``k < seq_len``)."""
    out = []
    for (lo1, hi1, lo2, hi2), sl in zip(spec_rows.tolist(), seq_lens.tolist()):
        rs = []
        for lo, hi in ((lo1, hi1), (lo2, hi2)):
            hi = min(hi, sl - 1)
            if lo < hi:
                rs.append((lo, hi))
        out.append(rs)
    return out


def prefill_block_ranges(start: int, end: int, prompt_len: int, block_size: int) -> list[tuple[int, int]]:
    """Block-causal ranges for prefill rows ``[start, end)``: segments between multiples of B and the prompt
    end, each clipped to the keys present (``< end``)."""
    B = block_size
    if B <= 1 or end <= start:
        return []
    out = []
    s = start // B * B
    while s < end:
        e = s + B
        if s < prompt_len < e:
            segs = ((s, prompt_len), (prompt_len, e))
        else:
            segs = ((s, e),)
        for a, b in segs:
            lo, hi = a, min(b, end) - 1
            if lo < hi and hi >= start:
                out.append((lo, hi))
        s = e
    return out


def pad_ranges(ranges: Ranges) -> Ranges | None:
    """None when no request has a range; otherwise pad the longest list to a power of two (>= 2) with the
    kernel's empty range (0, 0), bounding the number of compiled ``MAX_MM_RANGES`` variants."""
    if not any(ranges.values()):
        return None
    longest = max(len(v) for v in ranges.values())
    bucket = 2
    while bucket < longest:
        bucket *= 2
    key = max(ranges, key=lambda k: len(ranges[k]))
    ranges[key] = list(ranges[key]) + [(0, 0)] * (bucket - longest)
    return ranges


def kernel_visibility(q_pos: torch.Tensor, seq_len: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Dense ``[len(q_pos), seq_len]`` bool mask the Triton kernel applies (reference for tests)."""
    k = torch.arange(seq_len)
    q = q_pos[:, None]
    vis = k[None, :] <= q
    for lo, hi in ranges:
        if lo < hi:
            vis |= (q >= lo) & (q <= hi) & (k[None, :] >= lo) & (k[None, :] <= hi)
    return vis


def step_ranges(stepper, input_batch) -> Ranges | None:
    """``mm_req_doc_ranges`` of one step (batch index -> [(lo, hi)]) from the runner's ``InputBatch`` and the
    stepper's host mirror of the decoding requests' ranges."""
    st = stepper
    R = input_batch.num_reqs
    slots = np.asarray(input_batch.idx_mapping_np[:R], dtype=np.int64)
    active = st.active[slots]
    if not active.any():
        return None
    computed = np.asarray(input_batch.num_computed_tokens_np[:R], dtype=np.int64)
    scheduled = np.asarray(input_batch.num_scheduled_tokens[:R], dtype=np.int64)
    seq_lens = computed + scheduled
    prefilling = np.asarray(input_batch.is_prefilling_np[:R], dtype=bool)
    ndraft = input_batch.num_draft_tokens_per_req
    if ndraft is None:
        decode = np.zeros(R, dtype=bool)
    else:
        decode = active & ~prefilling & (np.asarray(ndraft[:R]) > 0)
    ranges: Ranges = {}
    if decode.any():
        idx = np.nonzero(decode)[0]
        spec = st.host_attn_spec()[slots[idx]]
        for i, rs in zip(idx.tolist(), decode_ranges(spec, seq_lens[idx])):
            if rs:
                ranges[i] = rs
    block_prefill = active & prefilling & ~st.cache_ver[slots]
    for i in np.nonzero(block_prefill)[0].tolist():
        rs = prefill_block_ranges(int(computed[i]), int(seq_lens[i]), int(st.prompt_len[slots[i]]), st.B)
        if rs:
            ranges[i] = rs
    return pad_ranges(ranges)
