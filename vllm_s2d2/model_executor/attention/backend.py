"""The plugin's attention backend (registered as CUSTOM): vLLM's TRITON_ATTN plus the canvas kernel.

The engine attaches :class:`~vllm_s2d2.engine.attention_inputs.CanvasInputs` (``s2d2_canvas``) to the metadata
(docs/architecture.md, "Attention").  Per layer, :func:`s2d2_attention` dispatches the rows:

* no ``s2d2_canvas`` (vLLM's profile run): the stock Triton launch only;
* ``canvas_only`` (uniform batches, the FULL CUDA graphs): the canvas kernel (:mod:`.canvas_kernel`) alone over
  every row, in place into ``output``;
* otherwise (mixed / prefill steps, eager or PIECEWISE): the stock launch for the whole batch (token-causal, with
  ranges for block-causal prefill rows), then the canvas kernel, which overwrites the canvas rows
  (``row_slot >= 0``) and, with exact prefill (``prefill_chunks``), the token-causal prefill rows in W-token
  chunks.

The KV cache is written before ``forward`` (``forward_includes_kv_cache_update = False``), so the canvas rows
read this step's canvas K/V.  The metadata builder declares ``UNIFORM_BATCH`` CUDA-graph support: FULL graphs are
valid only for batches whose query lengths are all W (vLLM then resolves FULL_AND_PIECEWISE / FULL_DECODE_ONLY).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)

from vllm_s2d2.model_executor.attention.canvas_kernel import canvas_attention


def s2d2_attention(stock: Callable[[], torch.Tensor], query: torch.Tensor, kv_cache: torch.Tensor,
                   output: torch.Tensor, attn_metadata: Any, head_size: int, scale: float) -> torch.Tensor:
    """One layer's attention: ``stock()`` runs vLLM's Triton launch (writes ``output``); the canvas rows of
    ``attn_metadata.s2d2_canvas`` go through the canvas kernel.  ``kv_cache [blocks, Hkv, page, 2 * D]``."""
    canvas = getattr(attn_metadata, "s2d2_canvas", None)
    if canvas is None:
        return stock()
    if not canvas.canvas_only:
        output = stock()
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)  # NHD [blocks, page, Hkv, D]
    q = query if query.dim() == 3 else query.view(query.shape[0], -1, head_size)
    out = output if output.dim() == 3 else output.view(output.shape[0], -1, head_size)
    canvas_attention(q, key_cache, value_cache, out, canvas.tables, canvas.row_slot, attn_metadata.block_table,
                     attn_metadata.seq_lens, attn_metadata.query_start_loc, scale)
    if canvas.prefill_chunks is not None:  # exact prefill: overwrite the token-causal prefill rows too
        chunk_row, chunk_offset, chunk_table = canvas.prefill_chunks
        canvas_attention(q, key_cache, value_cache, out, canvas.prefill_tables, chunk_table,
                         attn_metadata.block_table, attn_metadata.seq_lens, attn_metadata.query_start_loc, scale,
                         chunks=(chunk_row, chunk_offset))
    return output


class S2D2AttentionImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        d = self.head_size
        unsupported = [name for name, bad in (
            ("quantized KV cache", is_quantized_kv_cache(self.kv_cache_dtype) or self._is_per_token_head_quant),
            ("sliding window", tuple(self.sliding_window) != (-1, -1)),
            ("logits soft-cap", bool(self.logits_soft_cap)),
            ("ALiBi", self.alibi_slopes is not None),
            ("attention sinks", self.sinks is not None),
            (f"head size {d} (needs a power of two >= 16)", d < 16 or d & (d - 1) != 0),
        ) if bad]
        if unsupported:
            raise NotImplementedError(f"S2D2 canvas attention does not support: {', '.join(unsupported)}")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if (output_scale is not None or output_block_scale is not None) and getattr(
                attn_metadata, "s2d2_canvas", None) is not None:
            raise NotImplementedError("S2D2 canvas attention does not support fused output quantization")

        def stock():
            return super(S2D2AttentionImpl, self).forward(layer, query, key, value, kv_cache, attn_metadata,
                                                          output, output_scale, output_block_scale)

        return s2d2_attention(stock, query, kv_cache, output, attn_metadata, self.head_size, self.scale)


class S2D2AttentionMetadataBuilder(TritonAttentionMetadataBuilder):
    # FULL CUDA graphs only for uniform batches (every query W tokens): the canvas path; read by vLLM through
    # get_cudagraph_support when it resolves the CUDA-graph mode.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH


class S2D2AttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM 0.26 resolves out-of-tree backends through AttentionBackendEnum.CUSTOM

    @staticmethod
    def get_impl_cls() -> type[TritonAttentionImpl]:
        return S2D2AttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TritonAttentionMetadataBuilder]:
        return S2D2AttentionMetadataBuilder
