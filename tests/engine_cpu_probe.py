"""Runs vLLM 0.26 config-level scenarios on a CPU-only machine and prints one JSON object (test helper).

Started as a subprocess by ``tests/test_engine_config.py`` so the CPU-platform override never leaks into other
tests.  vLLM 0.26's CUDA wheel on a machine without a GPU resolves no platform (config creation fails with
"Device string must not be empty") and ignores ``VLLM_TARGET_DEVICE=cpu``; the override is
``vllm.platforms._current_platform = CpuPlatform()`` plus ``CUDA_VISIBLE_DEVICES=""`` (so Triton, which Model
Runner V2 requires, still counts as available).
Usage: ``python tests/engine_cpu_probe.py CKPT_DIR QWEN3_DIR [FAST_DLLM_DIR LLADA2_DIR]``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def _platform() -> None:
    import vllm.platforms as P
    from vllm.platforms.cpu import CpuPlatform

    P._current_platform = CpuPlatform()


def _engine_config(model: str, **kw):
    from vllm.engine.arg_utils import EngineArgs

    kw.setdefault("skip_tokenizer_init", True)
    kw.setdefault("load_format", "dummy")
    kw.setdefault("max_model_len", 256)
    return EngineArgs(model=model, **kw).create_engine_config()


def _err(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def _breakable(ckpt: str):
    os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "1"
    try:
        return _err(lambda: _engine_config(ckpt, speculative_config={"method": "s2d2", "verify": False}))
    finally:
        del os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"]


ARCHS = ("SDARForCausalLM", "SDARMoeForCausalLM", "Fast_dLLM_QwenForCausalLM", "LLaDA2MoeModelLM")


def main(ckpt: str, qwen3: str, fast: str | None = None, llada2: str | None = None, d2f: str | None = None) -> dict:
    _platform()
    out: dict = {}
    import vllm

    import vllm_s2d2

    # register(): the entry point ran in EngineArgs.__post_init__; calling again is a no-op.
    vllm_s2d2.register()
    vllm_s2d2.register()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.sampling_params import SamplingParams

    out["vllm"] = vllm.__version__
    out["alias_wrapped"] = bool(getattr(EngineArgs.create_engine_config, "_s2d2_alias_wrapped", False))
    out["validation_wrapped"] = bool(getattr(SamplingParams._validate_diffusion, "_s2d2_validation_wrapped", False))
    out["hooks"] = {a: MODELS_CONFIG_MAP.get(a).__name__ for a in ARCHS}
    out["supported_archs"] = [a for a in ARCHS if a in ModelRegistry.get_supported_archs()]

    def summary(cfg):
        return {
            "is_diffusion": cfg.model_config.is_diffusion,
            "v2": cfg.use_v2_model_runner,
            "canvas": cfg.diffusion_config.canvas_length if cfg.diffusion_config else None,
            "num_spec": cfg.num_speculative_tokens,
            "backend": cfg.attention_config.backend.name if cfg.attention_config.backend else None,
            "async": cfg.scheduler_config.async_scheduling,
            "spec": cfg.speculative_config is not None,
            "s2d2": (cfg.additional_config or {}).get("s2d2"),
            "batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "prefix_caching": cfg.cache_config.enable_prefix_caching,
            "chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
            "gen_defaults": cfg.model_config.get_diff_sampling_param(),
            "arch": cfg.model_config.architectures,
            "worker_ext": cfg.parallel_config.worker_extension_cls,
            "sliding_window": cfg.cache_config.sliding_window,
        }

    # CUDA-graph settings as VllmConfig resolves them (_set_cudagraph_sizes, before the CPU platform clears the
    # capture sizes), and what Model Runner V2 resolves with the backend's CUDA-graph support.
    from vllm.config import VllmConfig
    from vllm.config.compilation import CUDAGraphMode

    seen: list = []
    original = VllmConfig._set_cudagraph_sizes

    def snapshot(self):
        original(self)
        cc = self.compilation_config
        seen.append({"mode": cc.cudagraph_mode.name, "sizes": list(cc.cudagraph_capture_sizes or []),
                     "max": cc.max_cudagraph_capture_size})

    VllmConfig._set_cudagraph_sizes = snapshot
    import vllm.platforms as P

    platform_cls = type(P._current_platform)
    static_graphs = platform_cls.__dict__.get("support_static_graph_mode")
    platform_cls.support_static_graph_mode = classmethod(lambda cls: True)  # (as on CUDA)

    def graphs(**kw):
        seen.clear()
        cfg = _engine_config(ckpt, **kw)
        res = dict(seen[-1]) if seen else {"mode": None}
        res["batched_tokens"] = cfg.scheduler_config.max_num_batched_tokens
        res["sliding_window"] = cfg.cache_config.sliding_window
        if res["mode"] not in (None, "NONE"):
            from vllm_s2d2.model_executor.attention.backend import S2D2AttentionBackend

            support = S2D2AttentionBackend.get_builder_cls().get_cudagraph_support(cfg, None)
            cc = cfg.compilation_config
            cc.cudagraph_mode = CUDAGraphMode[res["mode"]]
            res["support"] = support.name
            res["runner_mode"] = cc.resolve_cudagraph_mode_and_sizes(
                support, "CUSTOM", cfg.diffusion_config.canvas_length, use_v2_model_runner=True).name
        return res

    s2d2 = {"method": "s2d2", "verify": False, "block_size": 4}
    out["graphs"] = {
        "default": graphs(max_num_seqs=40, speculative_config=s2d2),
        "big": graphs(max_num_seqs=300, speculative_config=s2d2),
        "eager": graphs(max_num_seqs=40, enforce_eager=True, speculative_config=s2d2),
        "piecewise": graphs(max_num_seqs=40, compilation_config={"cudagraph_mode": "PIECEWISE"},
                            speculative_config=s2d2),
        "decode_only": graphs(max_num_seqs=40, compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"},
                              speculative_config=s2d2),
        "user_sizes": graphs(max_num_seqs=40, compilation_config={"cudagraph_capture_sizes": [8, 24]},
                             speculative_config=s2d2),
        "none": graphs(max_num_seqs=40, compilation_config={"cudagraph_mode": "NONE"}, speculative_config=s2d2),
    }
    VllmConfig._set_cudagraph_sizes = original
    if static_graphs is None:
        del platform_cls.support_static_graph_mode
    else:
        platform_cls.support_static_graph_mode = static_graphs

    out["dict"] = summary(_engine_config(ckpt, speculative_config={"method": "s2d2", "verify": False,
                                                                     "block_size": 8, "denoising_steps": 4}))
    out["dict_moe_path"] = None
    out["ar"] = summary(_engine_config(ckpt, speculative_config={"method": "s2d2", "verify": False,
                                                                   "block_size": 1}))
    out["blockcausal"] = summary(_engine_config(ckpt, enable_prefix_caching=True, speculative_config={
        "method": "s2d2", "verify": False, "cache_ver": False, "draft_ver": False}))
    out["budget"] = summary(_engine_config(ckpt, max_num_seqs=512, max_num_batched_tokens=1024,
                                           speculative_config={"method": "s2d2", "verify": False}))
    out["no_alias"] = summary(_engine_config(ckpt))
    out["string_json"] = summary(_engine_config(ckpt, speculative_config='{"method": "s2d2", "verify": false}'))
    # The other families (Engine III): engine configs from their own checkpoints, presets included.
    if fast is not None:
        out["fast"] = summary(_engine_config(fast, speculative_config={"method": "s2d2", "preset": "fast-a"}))
        out["fast_cache_ver"] = summary(_engine_config(fast, speculative_config={"method": "s2d2",
                                                                                  "cache_ver": True}))
        out["errors_fast"] = {
            "block_size": _err(lambda: _engine_config(fast, speculative_config={"method": "s2d2", "block_size": 4})),
            "draft_ver": _err(lambda: _engine_config(fast, speculative_config={"method": "s2d2", "draft_ver": True})),
        }
    if d2f is not None:  # D2F LLaDA: a window of blocks; its prompt is bidirectional even with cache_ver
        out["d2f"] = summary(_engine_config(d2f, speculative_config={"method": "s2d2", "cache_ver": True,
                                                                     "max_active_blocks": 3}))
    if llada2 is not None:
        out["llada2"] = summary(_engine_config(llada2, speculative_config={
            "method": "s2d2", "preset": "llada2-quality", "block_size": 4}))
        out["llada2_plain"] = summary(_engine_config(llada2))
        out["errors_llada2"] = {
            "ucb": _err(lambda: _engine_config(llada2, speculative_config={
                "method": "s2d2", "verify_policy": "contextual_bandit_ucb"})),
        }

    out["errors"] = {
        "bare_string_verify": _err(lambda: _engine_config(ckpt, speculative_config="s2d2")),
        "unknown_key": _err(lambda: _engine_config(ckpt, speculative_config={"method": "s2d2", "blok_size": 4})),
        "bad_value": _err(lambda: _engine_config(ckpt, speculative_config={"method": "s2d2", "verify": False,
                                                                           "remasking": "nope"})),
        "non_diffusion": _err(lambda: _engine_config(qwen3, speculative_config={"method": "s2d2",
                                                                                "verify": False})),
        "flashinfer": _err(lambda: _engine_config(ckpt, attention_backend="FLASHINFER",
                                                  speculative_config={"method": "s2d2", "verify": False})),
        "full_graphs": _err(lambda: _engine_config(ckpt, compilation_config={"cudagraph_mode": "FULL"},
                                                   speculative_config={"method": "s2d2", "verify": False})),
        "breakable": _breakable(ckpt),
        "sliding": _err(lambda: _engine_config(ckpt, hf_overrides={"use_sliding_window": True},
                                               speculative_config={"method": "s2d2", "verify": False})),
        "async": _err(lambda: _engine_config(ckpt, async_scheduling=True,
                                             speculative_config={"method": "s2d2", "verify": False})),
    }

    # Sampling-parameter validation against the real ModelConfig of an s2d2 engine.
    cfg = _engine_config(ckpt, speculative_config={"method": "s2d2", "verify": False})
    mc = cfg.model_config

    def verify(**kw):
        SamplingParams(**kw).verify(mc, cfg.speculative_config, cfg.structured_outputs_config, None)

    out["sampling"] = {
        "greedy_seed_topk": _err(lambda: verify(temperature=0.0, seed=3, top_k=5, top_p=0.9, max_tokens=4)),
        "temperature": _err(lambda: verify(temperature=0.7, seed=1)),
        "extra_ok": _err(lambda: verify(extra_args={"s2d2": {"remasking": "low_confidence_static"}})),
        "n2": _err(lambda: verify(n=2)),
        "logprobs": _err(lambda: verify(logprobs=2)),
        # what vLLM 0.26's beam search sends per beam step (entrypoints/generate/beam_search/online.py)
        "beam_search": _err(lambda: verify(logprobs=2 * 4, max_tokens=1, temperature=0.0, detokenize=False)),
        "min_p": _err(lambda: verify(min_p=0.1)),
        "penalty": _err(lambda: verify(repetition_penalty=1.3)),
        "extra_block": _err(lambda: verify(extra_args={"s2d2": {"block_size": 8}})),
        "extra_verify": _err(lambda: verify(extra_args={"s2d2": {"verify": True}})),
        "extra_unknown": _err(lambda: verify(extra_args={"s2d2": {"nope": 1}})),
    }
    # Other diffusion models keep vLLM's own check.
    class _Other:
        is_diffusion = True
        architectures = ["DiffusionGemmaForBlockDiffusion"]

    out["sampling"]["other_model"] = _err(lambda: SamplingParams(temperature=0.0)._validate_diffusion(_Other()))
    return out


if __name__ == "__main__":
    try:
        result = main(*sys.argv[1:6])
    except Exception:  # noqa: BLE001
        result = {"fatal": traceback.format_exc()}
    print("S2D2_PROBE_JSON=" + json.dumps(result, default=str))
