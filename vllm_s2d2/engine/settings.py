"""Engine-wide and per-request S2D2 settings, shared by the config hook, the sampling-params shim and the worker.

Where the knobs live in vLLM 0.26 (docs/architecture.md):

* the engine-wide :class:`~vllm_s2d2.s2d2_config.S2D2Config` travels in ``VllmConfig.additional_config["s2d2"]``
  (a plain dict: it is hashed and pickled into every process).  The ``speculative_config="s2d2"`` alias
  (:mod:`vllm_s2d2.patches.spec_alias`) writes it; without the alias a user can pass
  ``additional_config={"s2d2": {...}}`` directly, and a block-diffusion checkpoint with no S2D2 settings at all
  runs the plain block-diffusion baseline (``verify=False``);
* the canvas width W is ``DiffusionConfig.canvas_length`` = ``hf_config.canvas_length`` = 2·B (room for the
  fused commit+draft canvas and the 2L verifier);
* per request, ``SamplingParams.extra_args["s2d2"]`` (a dict of S2D2Config keys; over OpenAI's ``vllm_xargs``, which
  takes only flat string / number values, a JSON string or ``"s2d2.<option>"`` keys: :func:`request_overrides`) overrides
  knobs that change neither the canvas nor the committed KV: everything except ``block_size``,
  ``sub_block_size`` and ``cache_ver``.

This module imports nothing from vLLM, so the CPU tests and the frontend can use it freely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from vllm_s2d2.configs import ARCH_TO_FAMILY, FamilyInfo, family_info
from vllm_s2d2.s2d2_config import PRESETS, S2D2Config

ADDITIONAL_CONFIG_KEY = "s2d2"
EXTRA_ARGS_KEY = "s2d2"

# Architectures the engine runs (models registered by ``register()``): every block-diffusion family.
ENGINE_ARCHS = tuple(ARCH_TO_FAMILY)


def canvas_length(block_size: int) -> int:
    """Canvas width W for block size B: the fused [final block | next block] commit canvas and the 2L verifier
    need 2·B slots."""
    return 2 * block_size


def window_canvas_length(block_size: int, num_blocks: int, shifted: bool) -> int:
    """Canvas width W of a pipelined (D2F) engine: its window of A blocks (Dream's causal verify) or twice it
    (LLaDA's 2L verify)."""
    return num_blocks * block_size * (1 if shifted else 2)


@dataclass(frozen=True)
class EngineSettings:
    info: FamilyInfo
    config: S2D2Config  # resolved engine default

    @property
    def block_size(self) -> int:
        return int(self.config.block_size)

    @property
    def canvas_length(self) -> int:
        if self.info.pipelined:
            return window_canvas_length(self.block_size, int(self.config.max_active_blocks), self.info.shifted)
        return canvas_length(self.block_size)

    @property
    def mask_token_id(self) -> int:
        return self.info.mask_token_id


def resolve_engine_settings(hf_config: Any, s2d2: Mapping[str, Any] | S2D2Config | None) -> EngineSettings:
    """Validate the engine-wide S2D2 settings against the checkpoint; every error is a clear ``ValueError``.

    ``s2d2`` None means "no S2D2 requested": the plain block-diffusion baseline (``verify=False``)."""
    info = family_info(hf_config)
    if s2d2 is None:
        cfg = S2D2Config(verify=False)
    elif isinstance(s2d2, S2D2Config):
        cfg = s2d2
    else:
        cfg = S2D2Config.from_dict(dict(s2d2))
    return EngineSettings(info=info, config=cfg.resolve(info.family, info.block_size))


def _xarg_value(v: Any) -> Any:
    """A flat ``vllm_xargs`` value (str / int / float): JSON literals (``true``, ``0.9``, ``null``) decoded,
    other strings kept."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def request_overrides(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The S2D2 options of one request from ``SamplingParams.extra_args``, in any of three spellings:

    * ``{"s2d2": {"verify_policy": "score_hysteresis"}}`` (Python ``SamplingParams``);
    * ``{"s2d2": "{\"verify_policy\": \"score_hysteresis\"}"}`` (a JSON object as a string);
    * ``{"s2d2.verify_policy": "score_hysteresis", "s2d2.confidence_threshold": 0.9}`` (flat keys: OpenAI's
      ``vllm_xargs`` accepts only string / number values).

    Raises ``ValueError`` for anything malformed."""
    if not extra_args:
        return {}
    if not isinstance(extra_args, Mapping):
        raise ValueError(f"extra_args must be a mapping, got {type(extra_args).__name__}")
    raw = extra_args.get(EXTRA_ARGS_KEY)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] is not valid JSON: {e}") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a mapping of S2D2 options (or a JSON object "
                         f"string), got {raw!r}")
    out = dict(raw or {})
    prefix = EXTRA_ARGS_KEY + "."
    for k, v in extra_args.items():
        if isinstance(k, str) and k.startswith(prefix):
            name = k[len(prefix):]
            if name in out:
                raise ValueError(f"S2D2 option {name!r} given twice (in {EXTRA_ARGS_KEY!r} and as {k!r})")
            out[name] = _xarg_value(v)
    return out


def request_config(engine: S2D2Config, extra_args: Mapping[str, Any] | None, family: str,
                   checkpoint_block_size: int) -> S2D2Config:
    """The resolved config of one request: the engine config with ``extra_args["s2d2"]`` applied.

    Raises ``ValueError`` for unknown keys, bad values or a different engine-fixed option (``block_size``,
    ``sub_block_size``, ``cache_ver``, D2F's ``max_active_blocks`` and ``verify_block_size``)."""
    overrides = request_overrides(extra_args)
    if not overrides:
        return engine
    overrides.pop("method", None)
    preset = overrides.pop("preset", None)
    if preset is not None:
        # a preset names a set of options; explicit keys of the request win, engine-fixed ones are checked below
        if preset not in PRESETS:
            raise ValueError(f"unknown S2D2 preset {preset!r}; valid presets: {sorted(PRESETS)}")
        overrides = {**PRESETS[preset], **overrides}
    if "block_size" in overrides and overrides["block_size"] != engine.block_size:
        raise ValueError(
            f"per-request block_size={overrides['block_size']!r} differs from the engine's block_size="
            f"{engine.block_size}; the block size (and canvas) is fixed per engine")
    if "sub_block_size" in overrides and overrides["sub_block_size"] != engine.sub_block_size:
        raise ValueError("sub_block_size is fixed per engine")
    if "cache_ver" in overrides and overrides["cache_ver"] != engine.cache_ver:
        raise ValueError(
            f"per-request cache_ver={overrides['cache_ver']!r} differs from the engine's cache_ver="
            f"{engine.cache_ver}; committed-KV semantics (and prefix caching) are fixed per engine")
    for name, what in (("max_active_blocks", "the window (and canvas)"), ("verify_block_size", "the 2L verify pattern")):
        if name in overrides and overrides[name] != getattr(engine, name):
            raise ValueError(f"per-request {name}={overrides[name]!r} differs from the engine's {name}="
                             f"{getattr(engine, name)}; {what} is fixed per engine")
    return engine.replace(**overrides).resolve(family, checkpoint_block_size)  # validates keys and values


def is_engine_arch(architectures: Any) -> bool:
    archs = [architectures] if isinstance(architectures, str) else list(architectures or [])
    return any(a in ENGINE_ARCHS for a in archs)

