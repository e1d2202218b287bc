"""LLaDA2.x (``inclusionAI/LLaDA2.0-mini``, ``LLaDA2.1-mini``) on vLLM 0.26: BailingMoeV2 layers, unchanged.

The checkpoint uses the Bailing-MoE tensor names (``word_embeddings``, ``attention.query_key_value``,
``query_layernorm`` / ``key_layernorm``, ``attention.dense``, ``mlp.gate`` + ``gate.expert_bias``, experts,
``shared_experts``), which vLLM's ``BailingMoeV2ForCausalLM`` loads as they are.  The fields
vLLM reads and the HF modeling ignores (``use_qk_norm``, ``use_rmsnorm``, ``score_function``,
``moe_router_enable_expert_bias``, ``router_dtype``, ``rotary_dim``) get the values the HF model implies from
:class:`vllm_s2d2.configs.LLaDA2MoeConfig` (``model_type`` ``llada2_moe``), so no ``--trust-remote-code`` is
needed.  Position-aligned, 2L verification like SDAR; LLaDA2.1's token editing runs in the engine's step.
"""

from __future__ import annotations

from vllm.model_executor.models.bailing_moe import BailingMoeV2ForCausalLM

from vllm_s2d2.model_executor.models.common import BlockDiffusionModel


class LLaDA2MoeModelLM(BlockDiffusionModel, BailingMoeV2ForCausalLM):
    """``LLaDA2MoeModelLM``: Bailing-MoE V2 with block-diffusion decoding (and T2T editing for 2.1)."""
