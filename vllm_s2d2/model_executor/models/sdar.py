"""SDAR (``JetLM/SDAR-*-Chat``) on vLLM 0.26: Qwen3 / Qwen3-MoE layers, weights and loading, unchanged.

SDAR checkpoints use exactly the Qwen3 (dense) and Qwen3-MoE tensor names (``MODELS.md`` §2.4), so the classes
only add :meth:`get_model_state_cls`, which hands vLLM's Model Runner V2 the plugin's
:class:`~vllm_s2d2.engine.model_state.S2D2ModelState` (block-diffusion decoding, masks, sampler).  The
config classes (``model_type`` ``sdar`` / ``sdar_moe``) come from :mod:`vllm_s2d2.configs`, registered by
:func:`vllm_s2d2.register`, so no ``--trust-remote-code`` is needed.  The layers must stay ``DECODER``
attention (KV-writing, per-request masks from the model state): an ``is_causal: false`` in the HF config would
turn them into ``ENCODER_ONLY`` (no KV), which the config hook rejects.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM


def _model_state_cls():
    from vllm_s2d2.engine.model_state import S2D2ModelState

    return S2D2ModelState


class SDARForCausalLM(Qwen3ForCausalLM):
    """SDAR dense (1.7B / 4B / 8B): Qwen3 with block-diffusion decoding."""

    @staticmethod
    def get_model_state_cls():
        return _model_state_cls()


class SDARMoeForCausalLM(Qwen3MoeForCausalLM):
    """SDAR MoE (30B-A3B): Qwen3-MoE with block-diffusion decoding."""

    @staticmethod
    def get_model_state_cls():
        return _model_state_cls()
