"""``MODELS_CONFIG_MAP`` hook for the plugin's block-diffusion architectures (docs/architecture.md).

vLLM runs ``verify_and_update_config(vllm_config)`` as the first step of ``VllmConfig.__post_init__`` (before the
runner choice, async scheduling and CUDA-graph resolution), in the process that builds the config; the result
is pickled to the engine core and the workers.  The hook:

* resolves the engine-wide S2D2 settings (``additional_config["s2d2"]``; none = plain block diffusion) against
  the checkpoint and stores the normalised dict back (errors are ``ValueError`` at start-up);
* makes the model a vLLM diffusion model: ``hf_config.canvas_length = W = 2B`` (``is_diffusion``, which forces
  Model Runner V2), ``DiffusionConfig(canvas_length=W)``; a mismatching user ``diffusion_config`` is an error;
* attention: the plugin's backend (CUSTOM = TRITON_ATTN + the canvas kernel, :mod:`.attention`); any other
  backend is rejected with a clear message (FLASHINFER has no per-request masks; FA/FLEX are not wired); no
  sliding window (the canvas kernel has none): ``use_sliding_window: true`` is rejected, and a ``sliding_window``
  value that the checkpoint does not use (LLaDA2's config default) is dropped;
* CUDA graphs: FULL_AND_PIECEWISE by default (FULL graphs for uniform batches, every query W tokens: decode
  steps; PIECEWISE for prefill / mixed steps); NONE, PIECEWISE and FULL_DECODE_ONLY are accepted, plain FULL
  (FULL graphs for mixed batches) is rejected, as is ``VLLM_USE_BREAKABLE_CUDAGRAPH`` (its PIECEWISE capture
  would build canvas-only attention metadata); ``enforce_eager`` wins.  Without user capture sizes, the sizes
  are ``W * r`` for ``r`` = 1, 2, 4, 8, 16, .. (step 8, step 16 from 256), ``max_num_seqs``, so every decode batch
  size gets a graph (vLLM's default caps graphs at 512 tokens, i.e. 512 / W requests);
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
_CUDAGRAPH_MODES = ("NONE", "PIECEWISE", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY")


def capture_sizes(max_num_seqs: int, W: int) -> list[int]:
    """CUDA-graph token counts ``W * r``: r = 1, 2, 4, then steps of 8 below 256, of 16 from 256, and
    ``max_num_seqs`` (each a FULL graph of r canvases and a PIECEWISE graph of that many tokens)."""
    rs = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, max_num_seqs + 1, 16)) + [max_num_seqs]
    return sorted({W * r for r in rs if r <= max_num_seqs})


# -- no CUDA GPU -----------------------------------------------------------------------------------------------
# vLLM's CUDA wheel on a machine without a visible CUDA GPU resolves no platform, and building a ``DeviceConfig``
# stops with "Failed to infer device type" / "Device string must not be empty", which never says a GPU is
# missing.  That happens before any model config or this hook: in ``EngineArgs.create_engine_config`` (its
# first line; ``LLM(...)``) and, for ``vllm serve``, already while the CLI parser is built (a ``DeviceConfig``
# default), right after vLLM loads the general plugins.  So the plugin checks at both points, and only for a
# block-diffusion model: :func:`install_device_check` wraps ``create_engine_config`` (under the ``s2d2`` alias
# shim, so a bad alias request is named first) and ``register()`` runs :func:`require_gpu_for_serve`.  vLLM's CPU
# platform (no CUDA, but a device type) is left alone: the CPU tests build engine configs there
# (tests/engine_cpu_probe.py).
_DEVICE_MARK = "_s2d2_device_checked"


def _block_diffusion_architecture(model: str, revision: str | None = None, ours: bool = False) -> str | None:
    """The plugin architecture of checkpoint ``model`` (``ours``: the s2d2 alias asked for it), or None."""
    from vllm_s2d2.engine.settings import ENGINE_ARCHS

    try:
        from vllm.transformers_utils.repo_utils import get_hf_file_to_dict

        cfg = get_hf_file_to_dict("config.json", str(model), revision)
    except Exception:  # noqa: BLE001 - unreadable here: vLLM reports it later
        cfg = None
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    archs = [archs] if isinstance(archs, str) else list(archs or [])
    found = [a for a in archs if a in ENGINE_ARCHS]
    if found:
        return found[0]
    return "S2D2 requested" if ours else None


def _no_gpu_error(model: str, arch: str) -> RuntimeError:
    return RuntimeError(
        f"vllm-s2d2: {model!r} is a block-diffusion model ({arch}); the plugin's engine needs a CUDA GPU and vLLM "
        f"found none on this machine (no CUDA device visible, so no platform: vLLM would stop with 'Failed to "
        f"infer device type'). Run it on a host with an NVIDIA GPU, or decode on the CPU with the reference "
        f"decoder: python -m vllm_s2d2.reference --model PATH --prompt TEXT")


def _no_platform() -> bool:
    from vllm.platforms import current_platform

    return not current_platform.device_type


def require_gpu_platform(engine_args) -> None:
    """Raise :func:`_no_gpu_error` where vLLM found no device platform and ``engine_args`` load a block-diffusion
    model (its config.json, or the ``s2d2`` alias's settings in ``additional_config``)."""
    if not _no_platform():
        return
    additional = getattr(engine_args, "additional_config", None)
    ours = isinstance(additional, dict) and ADDITIONAL_CONFIG_KEY in additional
    arch = _block_diffusion_architecture(engine_args.model, getattr(engine_args, "revision", None), ours)
    if arch is not None:
        raise _no_gpu_error(engine_args.model, arch)


def require_gpu_for_serve(argv: list[str] | None = None) -> None:
    """``vllm serve MODEL ...`` (``argv``: ``sys.argv``) of a block-diffusion model where vLLM found no device
    platform: raise :func:`_no_gpu_error` (run by ``register()``, before vLLM builds the serve parser)."""
    import sys

    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 3 or argv[1] != "serve":
        return
    model = argv[2] if not argv[2].startswith("-") else None
    ours = False
    for i, tok in enumerate(argv[2:], 2):
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if tok == "--model":
            model = nxt
        elif tok.startswith("--model="):
            model = tok.split("=", 1)[1]
        elif tok == "--speculative-config":
            ours = ours or "s2d2" in nxt
        elif tok.startswith("--speculative-config="):
            ours = ours or "s2d2" in tok
    if not model or not _no_platform():
        return
    arch = _block_diffusion_architecture(model, None, ours)
    if arch is not None:
        raise _no_gpu_error(model, arch)


def install_device_check() -> None:
    """Wrap ``EngineArgs.create_engine_config`` with :func:`require_gpu_platform` (idempotent)."""
    import functools

    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _DEVICE_MARK, False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        require_gpu_platform(self)
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _DEVICE_MARK, True)
    EngineArgs.create_engine_config = create_engine_config


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

        # No sliding window (the canvas kernel attends to every committed key).
        text_config = model_config.hf_text_config
        if getattr(text_config, "use_sliding_window", False):
            raise ValueError("S2D2's canvas attention has no sliding window; the checkpoint sets "
                             "use_sliding_window=true")
        if vllm_config.cache_config.sliding_window is not None or getattr(text_config, "sliding_window", None):
            logger.info("S2D2: dropping sliding_window=%s (use_sliding_window is false)",
                        getattr(text_config, "sliding_window", None))
            vllm_config.cache_config.sliding_window = None
            if hasattr(text_config, "sliding_window"):
                text_config.sliding_window = None

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

        # CUDA graphs: FULL for uniform (decode) batches, PIECEWISE for the rest; decode batches of any size.
        cc = vllm_config.compilation_config
        if cc.cudagraph_mode is None:
            if not model_config.enforce_eager:
                cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        elif cc.cudagraph_mode.name not in _CUDAGRAPH_MODES:
            raise ValueError(f"cudagraph_mode={cc.cudagraph_mode.name} is not supported by S2D2 (FULL graphs hold "
                             "only for uniform batches, every query W tokens); use FULL_AND_PIECEWISE (default), "
                             "FULL_DECODE_ONLY, PIECEWISE or NONE")
        graphs = not model_config.enforce_eager and cc.cudagraph_mode != CUDAGraphMode.NONE
        if graphs and envs.VLLM_USE_BREAKABLE_CUDAGRAPH:
            raise ValueError("VLLM_USE_BREAKABLE_CUDAGRAPH=1 is not supported by S2D2 (its PIECEWISE capture would "
                             "run canvas-only attention); unset it, or set enforce_eager=True")
        if graphs and cc.cudagraph_capture_sizes is None and cc.max_cudagraph_capture_size is None:
            cc.cudagraph_capture_sizes = capture_sizes(sc.max_num_seqs, W)
            cc.max_cudagraph_capture_size = cc.cudagraph_capture_sizes[-1]

        # Prefix caching and chunked prefill only where prompt KV is token-causal (never for D2F, whose prompt is
        # one bidirectional segment).
        cache = vllm_config.cache_config
        causal_prompt = bool(cfg.cache_ver) and not settings.info.pipelined
        if not causal_prompt and cache.enable_prefix_caching:
            logger.info("S2D2: disabling prefix caching (the prompt's KV is not token-causal, so it is not "
                        "reusable across prompt lengths)")
            cache.enable_prefix_caching = False
        if not causal_prompt:
            if sc.enable_chunked_prefill:
                logger.info("S2D2: disabling chunked prefill (a prompt chunk cut inside a bidirectional segment "
                            "would write KV that never saw the segment's later prompt tokens)")
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
