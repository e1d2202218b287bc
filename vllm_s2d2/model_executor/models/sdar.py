"""SDAR (``JetLM/SDAR-*-Chat``) on vLLM 0.26: Qwen3 / Qwen3-MoE layers, weights and loading, unchanged.

SDAR checkpoints use exactly the Qwen3 (dense) and Qwen3-MoE tensor names; the classes add
only :class:`~.common.BlockDiffusionModel`.  The config classes (``model_type`` ``sdar`` / ``sdar_moe``) come
from :mod:`vllm_s2d2.configs`, registered by :func:`vllm_s2d2.register`, so no ``--trust-remote-code`` is needed.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from vllm_s2d2.model_executor.models.common import BlockDiffusionModel


class SDARForCausalLM(BlockDiffusionModel, Qwen3ForCausalLM):
    """SDAR dense (1.7B / 4B / 8B): Qwen3 with block-diffusion decoding."""


class SDARMoeForCausalLM(BlockDiffusionModel, Qwen3MoeForCausalLM):
    """SDAR MoE (30B-A3B): Qwen3-MoE with block-diffusion decoding."""
