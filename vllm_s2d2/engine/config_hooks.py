"""``MODELS_CONFIG_MAP`` hook for the plugin's block-diffusion architectures (docs/architecture.md).

vLLM runs ``verify_and_update_config(vllm_config)`` as the first step of ``VllmConfig.__post_init__`` (before the
runner choice, async scheduling and CUDA-graph resolution), in the process that builds the config; the result
is pickled to the engine core and the workers.  The hook:

* resolves the engine-wide S2D2 settings (``additional_config["s2d2"]``; none = plain block diffusion) against
  the checkpoint and stores the normalised dict back (errors are ``ValueError`` at start-up);
* makes the model a vLLM diffusion model: ``hf_config.canvas_length = W = 2B`` (``is_diffusion``, which forces
  Model Runner V2), ``DiffusionConfig(canvas_length=W)``; a mismatching user ``diffusion_config`` is an error;
* attention: the plugin's backend (CUSTOM = TRITON_ATTN + the 2L verify launch) (per-request bidirectional ranges, :mod:`.attention`); any other backend is
  rejected with a clear message (FLASHINFER has no per-request masks; FA/FLEX are not wired);
* CUDA graphs: PIECEWISE by default (the range tensor is rebuilt each step, so FULL graphs would replay a stale
  mask); FULL modes are rejected;
* synchronous scheduling (the next step's masks depend on this step's outcome);
* ``max_num_batched_tokens >= max_num_seqs * W`` so a full decode batch is never truncated by the budget;
* prefix caching and chunked prefill only with ``cache_ver`` (token-causal prompt KV); block-causal prompt KV
  depends on where the prompt ends (caching it would be unsafe) and on the whole block (a chunk cut inside a block
  would miss the block's later prompt tokens), so without ``cache_ver`` prompts are prefilled whole
  (``max_num_batched_tokens >= max_model_len``);
* the checkpoint's ``generation_config.json`` sampling defaults (SDAR: temperature 0.6, top-k 20, top-p 0.95)
  are dropped unless the user overrides them: requests default to T = 1, no top-k / top-p like the reference
  decoders, and pass their own ``SamplingParams``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_s2d2.engine.worker_ext import QUALNAME as WORKER_EXTENSION
from vllm_s2d2.engine.settings import ADDITIONAL_CONFIG_KEY, resolve_engine_settings
from vllm_s2d2.log import get_logger

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig

logger = get_logger(__name__)

_SAMPLING_DEFAULT_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "min_p")


class S2D2ConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config: "ModelConfig") -> None:
        if getattr(model_config.hf_config, "is_causal", True) is False:
            raise ValueError("block-diffusion checkpoints must not set is_causal=false (it would turn the "
                             "attention layers into KV-less encoder layers)")

    @staticmethod
    def verify_and_update_config(vllm_config: "VllmConfig") -> None:
        from vllm import envs
        from vllm.config.compilation import CUDAGraphMode
        from vllm.config.diffusion import DiffusionConfig
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        model_config = vllm_config.model_config
        hf_config = model_config.hf_config
        additional = vllm_config.additional_config
        if additional is None:
            additional = vllm_config.additional_config = {}
        settings = resolve_engine_settings(hf_config, additional.get(ADDITIONAL_CONFIG_KEY))
        cfg = settings.config
        W = settings.canvas_length
        additional[ADDITIONAL_CONFIG_KEY] = cfg.to_dict()

        if vllm_config.speculative_config is not None:
            raise ValueError(f"{settings.info.architecture} decodes by block diffusion; a speculative_config "
                             "other than the 's2d2' alias is not supported")
        if envs.VLLM_USE_V2_MODEL_RUNNER is False:
            raise ValueError("block-diffusion models need Model Runner V2; unset VLLM_USE_V2_MODEL_RUNNER=0")

        # Diffusion model with canvas W.
        current = getattr(hf_config, "canvas_length", None)
        if current is not None and current != W:
            logger.info("S2D2: canvas_length %s -> %d (2 x block_size %d)", current, W, settings.block_size)
        hf_config.canvas_length = W
        if model_config.hf_text_config is not hf_config:
            model_config.hf_text_config.canvas_length = W
        model_config.__dict__.pop("is_diffusion", None)  # cached_property
        dc = vllm_config.diffusion_config
        if dc is None:
            vllm_config.diffusion_config = DiffusionConfig(canvas_length=W,
                                                           max_denoising_steps=cfg.denoising_steps)
        elif dc.canvas_length != W:
            raise ValueError(f"diffusion_config.canvas_length={dc.canvas_length} does not match S2D2's canvas "
                             f"2 x block_size = {W}; leave diffusion_config unset (the s2d2 alias sets it)")

        # Attention backend.
        att = vllm_config.attention_config
        if att.backend is None:
            att.backend = AttentionBackendEnum.CUSTOM
        elif att.backend != AttentionBackendEnum.CUSTOM:
            raise ValueError(f"attention backend {att.backend.name} cannot apply S2D2's per-request "
                             "block-diffusion and 2L-verifier masks; leave the backend unset (the plugin's "
                             "Triton-based backend, registered as CUSTOM, is selected)")

        # CUDA graphs: PIECEWISE (masks change every step).
        cc = vllm_config.compilation_config
        if cc.cudagraph_mode is None:
            if not model_config.enforce_eager:
                cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
        elif cc.cudagraph_mode not in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE):
            raise ValueError(f"cudagraph_mode={cc.cudagraph_mode.name} is not supported by S2D2 (its attention "
                             "ranges change every step); use PIECEWISE (default) or NONE")

        # Synchronous scheduling.
        sc = vllm_config.scheduler_config
        if sc.async_scheduling:
            raise ValueError("async scheduling is not supported by S2D2 (each step's attention masks depend on "
                             "the previous step's outcome); drop async_scheduling=True")
        sc.async_scheduling = False

        # Token budget: a full decode batch must never be truncated.
        need = sc.max_num_seqs * W
        if sc.max_num_batched_tokens < need:
            logger.info("S2D2: max_num_batched_tokens %d -> %d (max_num_seqs %d x canvas %d)",
                        sc.max_num_batched_tokens, need, sc.max_num_seqs, W)
            sc.max_num_batched_tokens = need

        # Prefix caching and chunked prefill only where prompt KV is token-causal.
        cache = vllm_config.cache_config
        if not cfg.cache_ver and cache.enable_prefix_caching:
            logger.info("S2D2: disabling prefix caching (cache_ver=false: block-causal prompt KV is not "
                        "reusable across prompt lengths)")
            cache.enable_prefix_caching = False
        if not cfg.cache_ver:
            if sc.enable_chunked_prefill:
                logger.info("S2D2: disabling chunked prefill (cache_ver=false: a prompt chunk cut inside a block "
                            "would write KV that never saw the block's later prompt tokens)")
                sc.enable_chunked_prefill = False
            if sc.max_num_batched_tokens < model_config.max_model_len:
                logger.info("S2D2: max_num_batched_tokens %d -> %d (whole prompts, no chunked prefill)",
                            sc.max_num_batched_tokens, model_config.max_model_len)
                sc.max_num_batched_tokens = model_config.max_model_len

        # Worker extension: per-request statistics through collective_rpc (vllm_s2d2.request_stats).
        pc = vllm_config.parallel_config
        if not pc.worker_extension_cls:
            pc.worker_extension_cls = WORKER_EXTENSION
        elif pc.worker_extension_cls != WORKER_EXTENSION:
            logger.warning("S2D2: worker_extension_cls=%s is kept; vllm_s2d2.request_stats() needs %s",
                           pc.worker_extension_cls, WORKER_EXTENSION)

        # Generation-config sampling defaults.
        overrides = model_config.override_generation_config
        for key in _SAMPLING_DEFAULT_KEYS:
            overrides.setdefault(key, None)
