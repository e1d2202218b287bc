"""vllm-s2d2: block-diffusion LLMs with S2D2 self-speculative decoding, as a vLLM plugin.

``register()`` is the ``vllm.general_plugins`` entry point.  vLLM calls it in every process (engine, workers,
the model-registry subprocess), so it is idempotent and cheap; importing this package imports nothing heavy.

With vLLM importable, ``register()`` also (``docs/architecture.md``, vLLM integration):

1. registers the HF config classes with transformers' ``AutoConfig`` and vLLM's ``_CONFIG_REGISTRY`` (no
   ``--trust-remote-code``);
2. registers ``SDARForCausalLM`` / ``SDARMoeForCausalLM`` / ``Fast_dLLM_QwenForCausalLM`` / ``LLaDA2MoeModelLM``
   with ``ModelRegistry`` as lazy
   ``"module:Class"`` strings (nothing imported until vLLM resolves the architecture);
3. adds the config hook (:class:`vllm_s2d2.engine.config_hooks.S2D2ConfigHook`) to ``MODELS_CONFIG_MAP``;
4. registers the attention backend (TRITON_ATTN for prefill + the canvas kernel for decode rows) as
   ``AttentionBackendEnum.CUSTOM``;
5. on a machine where vLLM finds no device platform (no CUDA GPU), makes loading a block-diffusion model
   (``LLM(...)``, ``vllm serve``) fail with a message saying a CUDA GPU is required
   (:mod:`vllm_s2d2.engine.config_hooks`, "no CUDA GPU");
6. installs the ``speculative_config="s2d2"`` alias, the sampling-parameter shim and the CLI shim for
   ``--speculative-config s2d2`` (:mod:`vllm_s2d2.patches`; the CLI shim is also installed before argument
   parsing by the ``vllm.platform_plugins`` entry point ``s2d2_cli``), and the poll that puts the S2D2
   counters on ``/metrics`` (:mod:`vllm_s2d2.patches.stats_metrics`).

Steps 2-6 need vLLM 0.26.0 exactly; with another version they raise a clear error (vLLM logs a failing plugin
and carries on without it).
"""

from __future__ import annotations

from typing import Any

from vllm_s2d2.families import TABLE

__version__ = "0.1.0"
__all__ = ["register", "request_stats"]


def __getattr__(name: str) -> Any:
    # ``vllm_s2d2.request_stats`` (per-request S2D2 counters of an LLM) lives in the engine layer, which the
    # package root does not import at import time; it is loaded on first access.
    if name == "request_stats":
        from vllm_s2d2.engine.stats import request_stats

        return request_stats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_registered = False

# architecture -> "module:Class" (lazy registration strings, from the family table)
MODEL_CLASSES = {arch.name: arch.vllm_class for fam in TABLE for arch in fam.architectures}

ATTENTION_BACKEND = "vllm_s2d2.model_executor.attention.backend.S2D2AttentionBackend"


def _vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def register() -> None:
    """Register the block-diffusion checkpoint configs and, with vLLM, the models, hook and shims (once)."""
    global _registered
    if _registered:
        return
    from vllm_s2d2.configs import CONFIG_CLASSES, register_hf_configs

    register_hf_configs()
    if _vllm_available():
        from vllm_s2d2.patches import require_vllm_version

        require_vllm_version("register()")
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
        from vllm.transformers_utils.config import _CONFIG_REGISTRY

        from vllm_s2d2.engine.config_hooks import S2D2ConfigHook, install_device_check, require_gpu_for_serve
        from vllm_s2d2.patches import cli_alias, sampling_validation, spec_alias, stats_metrics

        for model_type, cls in CONFIG_CLASSES.items():
            _CONFIG_REGISTRY[model_type] = cls
        for arch, target in MODEL_CLASSES.items():
            ModelRegistry.register_model(arch, target)
            MODELS_CONFIG_MAP[arch] = S2D2ConfigHook
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CUSTOM, ATTENTION_BACKEND)
        require_gpu_for_serve()  # `vllm serve` builds a DeviceConfig right after this, before any engine args
        install_device_check()  # before the alias shim, which then runs first (a bad s2d2 request is named first)
        spec_alias.install()
        sampling_validation.install()
        cli_alias.install()
        stats_metrics.install()
    _registered = True
