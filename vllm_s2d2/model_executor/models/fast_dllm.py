"""Fast-dLLM v2 (``Efficient-Large-Model/Fast_dLLM_v2_1.5B`` / ``_7B``) on vLLM 0.26: Qwen2.5 layers, unchanged.

The checkpoint uses Qwen2's tensor names and shapes (q/k/v projections with bias), which
vLLM's ``Qwen2ForCausalLM`` loads 1:1 (tied ``lm_head`` on the 1.5B model included).  ``model_type``
``Fast_dLLM_Qwen`` is parsed by :class:`vllm_s2d2.configs.FastDLLMQwenConfig` (``bd_size`` = block size), so no
``--trust-remote-code`` is needed.  The model is shift-aligned (logit i predicts token i + 1): the engine reads
its logits one row back, decodes sub-blocks, and verifies with a plain causal pass (:mod:`vllm_s2d2.engine`).
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from vllm_s2d2.model_executor.models.common import BlockDiffusionModel


class Fast_dLLM_QwenForCausalLM(BlockDiffusionModel, Qwen2ForCausalLM):  # noqa: N801 (architecture name)
    """``Fast_dLLM_QwenForCausalLM``: Qwen2.5 with shift-aligned block-diffusion decoding."""
