"""The 2L verifier attention over the paged KV cache, on vLLM's Triton unified-attention kernel.

A verifying request's canvas (2B query slots starting at its first uncommitted position p) is laid out as::

    local slot   0 .. Lb-1        Lb .. B-1     B .. B+Lb-1        B+Lb .. 2B-1
    content      first half       filler        mask half          filler
                 (drafts filled)                (Lb x [MASK])
    RoPE pos     p .. p+Lb-1      (any)         p .. p+Lb-1        (any)

with Lb = B - (tokens of the block already in the cache), so the mask half always starts at local slot B.
Then one fixed ``[2B, 2B]`` pattern — :func:`vllm_s2d2.core.masks.verifier_qq_bias`, i.e.
:func:`~vllm_s2d2.core.masks.verifier_2l` with an empty cache — is the 2L mask for every verifying request
whatever its Lb: first-half rows are token-causal over the first half, mask-half row B+i sees the first half strictly before i and itself, and no real row ever sees a filler slot.
The cache (keys before p) is fully visible.

vLLM's kernel (``v1/attention/ops/triton_unified_attention.py``) adds an optional ``qq_bias [Q, Q]`` to the
scores of keys inside the current query chunk (indexed by local query row and local key column) for every
sequence of a launch, so a launch over the verifying requests only, with ``causal=False`` and the pattern as
a 0 / -inf bias, computes exactly the 2L attention.  Mixed batches launch it once more for the verify rows
(gathered into a contiguous block) after the regular launch: the extra cost is one attention call over
2B rows per verifying request per layer.
"""

from __future__ import annotations

import torch


def verify_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor, block_table: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, qq_bias: torch.Tensor,
                     **kernel_kwargs) -> None:
    """2L attention for a contiguous group of verifying requests (queries ``[N, Hq, D]``, each request's
    query chunk 2B long; ``seqused_k`` = p + 2B).  Writes ``out`` in place."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    unified_attention(q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_seqlens_q,
                      max_seqlen_q=max_seqlen_q, seqused_k=seqused_k, max_seqlen_k=max_seqlen_k,
                      softmax_scale=softmax_scale, causal=False, window_size=(-1, -1), block_table=block_table,
                      softcap=0, q_descale=None, k_descale=None, v_descale=None, qq_bias=qq_bias,
                      **kernel_kwargs)
