"""What every block-diffusion model class of the plugin adds to its vLLM base class.

* :meth:`get_model_state_cls` hands vLLM's Model Runner V2 the plugin's
  :class:`~vllm_s2d2.engine.model_state.S2D2ModelState` (block-diffusion decoding, masks, sampler).
* ``forward`` keeps a reference to its output hidden states (``s2d2_hidden_states``, no copy) until the next
  forward: vLLM computes logits only for the rows it samples, and a prefill chunk in a batch that carries
  canvases gets none, while a shift-aligned model (Fast-dLLM v2) needs the last prompt token's logit to open its
  first block (:meth:`S2D2ModelState._token_logits`).  Under PIECEWISE CUDA graphs this method runs eagerly
  around the captured pieces, so the reference points at the output buffer of the step that just ran.

The layers stay vLLM's ``DECODER`` attention (KV-writing, per-request masks from the model state): an HF
``is_causal: false`` would turn them into ``ENCODER_ONLY`` (no KV), which the config hook rejects.
"""

from __future__ import annotations

import torch


class BlockDiffusionModel:
    """Mixin placed before the vLLM ``*ForCausalLM`` base class."""

    s2d2_hidden_states: torch.Tensor | None = None

    @staticmethod
    def get_model_state_cls():
        from vllm_s2d2.engine.model_state import S2D2ModelState

        return S2D2ModelState

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if isinstance(hidden, torch.Tensor):  # (pipeline-parallel ranks before the last return IntermediateTensors)
            self.s2d2_hidden_states = hidden
        return hidden
