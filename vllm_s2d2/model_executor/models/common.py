"""What every block-diffusion model class of the plugin adds to its vLLM base class.

* :meth:`get_model_state_cls` hands vLLM's Model Runner V2 the plugin's
  :class:`~vllm_s2d2.engine.model_state.S2D2ModelState` (block-diffusion decoding, masks, sampler).
* ``forward`` copies its output hidden states into the first rows of a persistent
  ``[max_num_batched_tokens, hidden]`` buffer, ``s2d2_hidden_states``: vLLM computes logits only for the rows it
  samples, and a prefill chunk in a batch that carries canvases gets none, while a shift-aligned model
  (Fast-dLLM v2) needs the last prompt token's logit to open its first block
  (:meth:`S2D2ModelState._token_logits`).  The copy is part of a FULL CUDA graph, and the attribute is the whole
  buffer (replay runs no Python, so a view sized at capture would be stale), so the step's rows are there after a
  replay too.  The buffer is allocated in the first forward, vLLM's profile run with ``max_num_batched_tokens``
  rows, before any graph capture.

The layers stay vLLM's ``DECODER`` attention (KV-writing, per-request masks from the model state): an HF
``is_causal: false`` would turn them into ``ENCODER_ONLY`` (no KV), which the config hook rejects.
"""

from __future__ import annotations

import torch


class BlockDiffusionModel:
    """Mixin placed before the vLLM ``*ForCausalLM`` base class."""

    s2d2_hidden_states: torch.Tensor | None = None
    _s2d2_hidden_buffer: torch.Tensor | None = None

    def __init__(self, *args, vllm_config=None, prefix: str = "", **kwargs):
        # (vLLM passes vllm_config and prefix by keyword; plain stand-in bases in unit tests take none)
        if vllm_config is None:
            super().__init__(*args, **kwargs)
            self._s2d2_max_tokens = 0
        else:
            super().__init__(*args, vllm_config=vllm_config, prefix=prefix, **kwargs)
            self._s2d2_max_tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)

    @staticmethod
    def get_model_state_cls():
        from vllm_s2d2.engine.model_state import S2D2ModelState

        return S2D2ModelState

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if isinstance(hidden, torch.Tensor):  # (pipeline-parallel ranks before the last return IntermediateTensors)
            self.s2d2_hidden_states = keep_rows(self, hidden)
        return hidden


def keep_rows(model, hidden: torch.Tensor) -> torch.Tensor:
    """Copy ``hidden`` into the first rows of the model's persistent buffer (allocated on first use, never inside a
    graph capture) and return the whole buffer."""
    buf = model._s2d2_hidden_buffer
    n = hidden.shape[0]
    if (buf is None or buf.shape[0] < n or buf.shape[1:] != hidden.shape[1:] or buf.dtype != hidden.dtype
            or buf.device != hidden.device):
        if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("S2D2: the hidden-state buffer must be allocated before CUDA graph capture (the "
                               "profile run allocates it)")
        rows = max(n, getattr(model, "_s2d2_max_tokens", 0))
        buf = model._s2d2_hidden_buffer = torch.empty((rows, *hidden.shape[1:]), dtype=hidden.dtype,
                                                      device=hidden.device)
    buf[:n].copy_(hidden)
    return buf
