"""D2F (Discrete Diffusion Forcing) students on vLLM 0.26: Dream-7B and LLaDA-8B with the D2F LoRA merged.

* ``DreamModel`` (``model_type`` ``Dream``) has Qwen2's tensor names and shapes (q/k/v with bias), which vLLM's
  ``Qwen2ForCausalLM`` loads 1:1; it is shift-aligned (logit i predicts token i + 1) like Fast-dLLM v2.
* ``LLaDAModelLM`` (``model_type`` ``llada``) is a LLaMA-style model with OLMo tensor names
  (``model.transformer.blocks.N.attn_out`` ...); :func:`vllm_s2d2.configs.llada_to_llama_name` renames them to the names vLLM's
  ``LlamaForCausalLM`` loads (whose own mapper then packs q/k/v and gate/up).  Position-aligned.

Both configs (:mod:`vllm_s2d2.configs`) are accepted only for merged D2F checkpoints (``vllm-s2d2
merge-d2f-lora``): the plain bases are full-attention models.
"""

from __future__ import annotations

from typing import Iterable

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from vllm_s2d2.configs import llada_to_llama_name
from vllm_s2d2.model_executor.models.common import BlockDiffusionModel


class D2FDreamForCausalLM(BlockDiffusionModel, Qwen2ForCausalLM):
    """``DreamModel`` + D2F LoRA (merged): Qwen2 layers, shift-aligned pipelined block diffusion."""


class D2FLLaDAForCausalLM(BlockDiffusionModel, LlamaForCausalLM):
    """``LLaDAModelLM`` + D2F LoRA (merged): LLaMA layers under OLMo tensor names, position-aligned."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((llada_to_llama_name(n), w) for n, w in weights)
