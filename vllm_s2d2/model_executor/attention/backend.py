"""The plugin's attention backend: vLLM's TRITON_ATTN plus the 2L verifier launch (registered as CUSTOM).

Every mask a block-diffusion step needs except verification is "token-causal OR a per-request bidirectional
range" (prefill, draft, commit), which the stock Triton backend computes from ``mm_req_doc_ranges``.  The
2L verifier mask is not of that form, so this backend runs the stock launch for the whole batch and then,
when the engine attached a :class:`~vllm_s2d2.engine.attention_inputs.VerifyGroup` to the metadata, one more launch of the same kernel over the
verifying requests' rows only (gathered into a contiguous block) with the fixed ``[2B, 2B]`` qq-bias of
:mod:`.verify_kernel`, and scatters those rows back.  The stock launch's result for those rows is discarded.

The KV cache is written before ``forward`` (``forward_includes_kv_cache_update = False``), so the verify
launch reads the canvas K/V written this step; all of it lies at or after the request's committed length
and is overwritten by the next step (the cache only ever holds committed tokens).

Cost: per layer and verifying request, one extra attention over 2B query rows (gather/scatter of
``2B x heads x head_dim`` values).  Attention runs outside piecewise CUDA graphs, so the branch is free when
no request verifies.
"""

from __future__ import annotations

import torch

from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from vllm_s2d2.engine.attention_inputs import VerifyGroup
from vllm_s2d2.model_executor.attention.verify_kernel import verify_attention


class S2D2AttentionImpl(TritonAttentionImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
        group: VerifyGroup | None = getattr(attn_metadata, "s2d2_verify", None)
        if group is None:
            return output
        if self._is_per_token_head_quant or output_scale is not None:
            raise NotImplementedError("S2D2 verification supports unquantized KV caches only")
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        q = query.index_select(0, group.rows)
        out = torch.empty_like(q)
        verify_attention(q, key_cache, value_cache, out, group.cu_seqlens_q, group.seqused_k,
                         group.block_table, group.max_seqlen_q, group.max_seqlen_k, self.scale, group.qq_bias)
        output.view(output.shape[0], -1, self.head_size).index_copy_(0, group.rows, out.view(q.shape))
        return output


class S2D2AttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM 0.26 resolves out-of-tree backends through AttentionBackendEnum.CUSTOM

    @staticmethod
    def get_impl_cls() -> type[TritonAttentionImpl]:
        return S2D2AttentionImpl
