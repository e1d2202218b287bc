"""vllm-s2d2: block-diffusion LLMs with S2D2 self-speculative decoding, as a vLLM plugin.

``register()`` is the ``vllm.general_plugins`` entry point.  vLLM calls it in every process (engine, workers,
the model-registry subprocess), so it is idempotent and cheap; importing this package imports nothing heavy.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the block-diffusion checkpoint configs (and, with vLLM, the models) once per process."""
    global _registered
    if _registered:
        return
    from vllm_s2d2.configs import register_hf_configs

    register_hf_configs()
    _registered = True
