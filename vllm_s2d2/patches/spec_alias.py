"""``speculative_config="s2d2"`` / ``{"method": "s2d2", ...}``: an alias translated at engine-config time.

vLLM 0.26 validates ``SpeculativeConfig.method`` against a fixed literal set (``"s2d2"`` -> ``literal_error``),
and every entry point (``LLM``, ``AsyncLLM``, ``vllm serve``, gRPC) builds its config through
``EngineArgs.create_engine_config`` (``docs/architecture.md``, vLLM integration).  This shim wraps that one
method: when the speculative config names ``s2d2`` (also ``spec_method="s2d2"``), it

1. validates the remaining keys as an :class:`~vllm_s2d2.s2d2_config.S2D2Config` (unknown keys or bad values ->
   ``ValueError`` naming them),
2. reads the checkpoint's ``config.json``: a non-block-diffusion architecture -> ``ValueError`` naming it,
3. resolves the config for the family,
4. sets ``diffusion_config = {"canvas_length": 2B, ...}``, ``hf_overrides["canvas_length"] = 2B`` and
   ``additional_config["s2d2"]`` and clears ``speculative_config``, then calls the original method (the
   config hook, :mod:`vllm_s2d2.engine.config_hooks`, does the rest).

From the CLI: ``--speculative-config s2d2`` (:mod:`.cli_alias` turns the bare word into the JSON string) or
``--speculative-config '{"method": "s2d2", "verify": false}'``.
"""

from __future__ import annotations

import json
from typing import Any

from vllm_s2d2.patches import require_vllm_version, wrap_once

METHOD = "s2d2"
_MARK = "_s2d2_alias_wrapped"


def _s2d2_request(engine_args: Any) -> dict[str, Any] | None:
    """The S2D2 options if ``engine_args`` asks for the alias, else None."""
    spec = engine_args.speculative_config
    if isinstance(spec, str):
        text = spec.strip()
        if text == METHOD:
            spec = {"method": METHOD}
        elif text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError:
                return None
        else:
            return None
    method_flag = getattr(engine_args, "spec_method", None)
    if method_flag == METHOD:
        spec = dict(spec or {})
        if spec.get("method", METHOD) != METHOD:
            raise ValueError("spec_method='s2d2' conflicts with speculative_config['method']")
        spec["method"] = METHOD
    if not isinstance(spec, dict) or spec.get("method") != METHOD:
        return None
    opts = {k.replace("-", "_"): v for k, v in spec.items() if k != "method"}
    return opts


def _read_checkpoint_config(engine_args: Any) -> dict[str, Any]:
    from vllm.transformers_utils.repo_utils import get_hf_file_to_dict

    cfg = get_hf_file_to_dict("config.json", engine_args.model, engine_args.revision)
    if cfg is None:
        raise ValueError(f"speculative_config method 's2d2': cannot read config.json of {engine_args.model!r}")
    if isinstance(engine_args.hf_overrides, dict):
        cfg = {**cfg, **engine_args.hf_overrides}
    return cfg


def translate(engine_args: Any) -> bool:
    """Rewrite ``engine_args`` in place when it asks for ``s2d2``; returns whether it did."""
    from vllm_s2d2.engine.settings import ADDITIONAL_CONFIG_KEY, ENGINE_ARCHS, is_engine_arch, resolve_engine_settings
    from vllm_s2d2.s2d2_config import S2D2Config

    opts = _s2d2_request(engine_args)
    if opts is None:
        return False
    cfg = S2D2Config.from_dict(opts)  # unknown keys / bad values -> ValueError
    ckpt = _read_checkpoint_config(engine_args)
    archs = ckpt.get("architectures") or []
    if not is_engine_arch(archs):
        raise ValueError(
            f"speculative_config method 's2d2' needs a block-diffusion checkpoint (the engine serves "
            f"{list(ENGINE_ARCHS)}); {engine_args.model!r} has architectures {list(archs)}")
    settings = resolve_engine_settings(ckpt, cfg)
    W = settings.canvas_length
    if engine_args.diffusion_config is not None:
        raise ValueError("pass either speculative_config='s2d2' or diffusion_config, not both")
    engine_args.diffusion_config = {"canvas_length": W, "max_denoising_steps": settings.config.denoising_steps}
    hf = engine_args.hf_overrides
    if hf is None:
        engine_args.hf_overrides = {"canvas_length": W}
    elif isinstance(hf, dict):
        engine_args.hf_overrides = {**hf, "canvas_length": W}
    else:  # a callable: apply it, then set the canvas
        def _with_canvas(config, _fn=hf):
            config = _fn(config)
            config.canvas_length = W
            return config
        engine_args.hf_overrides = _with_canvas
    additional = dict(engine_args.additional_config or {})
    additional[ADDITIONAL_CONFIG_KEY] = settings.config.to_dict()
    engine_args.additional_config = additional
    engine_args.speculative_config = None
    if getattr(engine_args, "spec_method", None) == METHOD:
        engine_args.spec_method = None
    return True


def install() -> None:
    """Wrap ``EngineArgs.create_engine_config`` (idempotent)."""
    require_vllm_version("spec_alias")
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def create_engine_config(self, *args, **kwargs):
            translate(self)
            return original(self, *args, **kwargs)
        return create_engine_config

    wrap_once(EngineArgs, "create_engine_config", _MARK, make)
