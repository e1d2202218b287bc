"""Sampling-parameter validation for the plugin's block-diffusion models.

vLLM 0.26's ``SamplingParams._validate_diffusion`` (``sampling_params.py:884-903``) rejects temperature != 1
(greedy included), ``seed`` and more for every diffusion model, because DiffusionGemma samples on a fixed
schedule.  The S2D2 engine honours temperature (0 = greedy), top-k, top-p and per-request seeds, so for the
plugin's architectures this shim replaces that check with the plugin's own, which rejects -- with a clear
``ValueError`` in the frontend, before the request reaches the engine -- what the engine cannot honour:
``n > 1``, ``logprobs`` / ``prompt_logprobs`` (and so beam search and log-likelihood evaluations, e.g.
lm-eval's loglikelihood tasks, which ask for ``prompt_logprobs``: an error naming the reason, never a wrong
score), ``min_p``, repetition / presence / frequency penalties, ``min_tokens``, ``logit_bias``, ``bad_words``,
``allowed_token_ids`` and structured outputs, and validates per-request S2D2 options in ``extra_args["s2d2"]``.
Every other model keeps vLLM's check unchanged.
"""

from __future__ import annotations

from typing import Any

from vllm_s2d2.patches import require_vllm_version, wrap_once

_MARK = "_s2d2_validation_wrapped"
NO_LOGLIKELIHOOD = ("a block-diffusion model gives no left-to-right log-likelihood of a given text, so "
                    "log-likelihood scoring -- lm-eval's loglikelihood, multiple-choice and perplexity tasks -- "
                    "cannot be served; evaluate with generate-until tasks")
_EPS = 1e-5


def validate_s2d2_sampling(sp: Any, model_config: Any) -> None:
    """The plugin's check (``sp``: ``SamplingParams``; ``model_config``: vLLM ``ModelConfig``)."""
    bad = []
    if getattr(sp, "n", 1) != 1:
        bad.append(f"n={sp.n} (one sequence per request; send several requests instead)")
    if sp.logprobs is not None:  # vLLM's beam search (use_beam_search / LLM.beam_search) asks for logprobs too
        bad.append("logprobs (the engine computes no per-token log-probabilities; beam search needs them, so it "
                   "is not supported either)")
    if sp.prompt_logprobs is not None:  # lm-eval's loglikelihood requests (vllm and local-completions models)
        bad.append(f"prompt_logprobs ({NO_LOGLIKELIHOOD})")
    if sp.min_p > _EPS:
        bad.append("min_p")
    if abs(sp.repetition_penalty - 1.0) > _EPS or abs(sp.presence_penalty) > _EPS or abs(
            sp.frequency_penalty) > _EPS:
        bad.append("repetition/presence/frequency penalties")
    if sp.min_tokens:
        bad.append("min_tokens")
    if sp.logit_bias:
        bad.append("logit_bias")
    if sp.bad_words:
        bad.append("bad_words")
    if sp.allowed_token_ids:
        bad.append("allowed_token_ids")
    if getattr(sp, "structured_outputs", None) is not None:
        bad.append("structured outputs")
    if bad:
        raise ValueError(
            "block-diffusion decoding (vllm-s2d2) does not support these sampling parameters: "
            + ", ".join(bad) + ". Supported: temperature (0 = greedy), top_k, top_p, seed, max_tokens, "
            "stop / stop_token_ids, ignore_eos, and S2D2 decoding options in extra_args['s2d2'] (OpenAI: "
            "vllm_xargs {'s2d2': '<JSON object>'} or {'s2d2.<option>': value}).")
    extra = getattr(sp, "extra_args", None)
    if extra:
        from vllm_s2d2.engine.settings import request_overrides

        if request_overrides(extra):  # (raises ValueError for malformed S2D2 options)
            _validate_request_options(extra, model_config)


def _validate_request_options(extra: dict, model_config: Any) -> None:
    from vllm_s2d2.engine.settings import request_config, resolve_engine_settings
    from vllm_s2d2.s2d2_config import S2D2Config

    hf = model_config.hf_config
    canvas = getattr(hf, "canvas_length", None)
    base = S2D2Config(verify=False, block_size=canvas // 2 if canvas else None)
    settings = resolve_engine_settings(hf, base)
    request_config(settings.config, extra, settings.info.family, settings.info.block_size)


def _is_plugin_model(model_config: Any) -> bool:
    from vllm_s2d2.engine.settings import is_engine_arch

    return is_engine_arch(getattr(model_config, "architectures", None) or [])


def install() -> None:
    """Wrap ``SamplingParams._validate_diffusion`` (idempotent)."""
    require_vllm_version("sampling_validation")
    from vllm.sampling_params import SamplingParams

    def make(original):
        def _validate_diffusion(self, model_config):
            if model_config.is_diffusion and _is_plugin_model(model_config):
                return validate_s2d2_sampling(self, model_config)
            return original(self, model_config)
        return _validate_diffusion

    wrap_once(SamplingParams, "_validate_diffusion", _MARK, make)
