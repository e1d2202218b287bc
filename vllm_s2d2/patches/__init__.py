"""Version-guarded shims on vLLM 0.26.0 internals, installed only by :func:`vllm_s2d2.register`.

* :mod:`.spec_alias` -- ``speculative_config="s2d2"`` / ``{"method": "s2d2", ...}`` on
  ``EngineArgs.create_engine_config`` (every entry point: ``LLM``, ``AsyncLLM``, ``vllm serve``);
* :mod:`.sampling_validation` -- ``SamplingParams._validate_diffusion`` for the plugin's architectures;
* :mod:`.cli_alias` -- ``--speculative-config s2d2`` (a bare word) on ``FlexibleArgumentParser.parse_args``; also
  installed early by the ``vllm.platform_plugins`` entry point ``s2d2_cli`` (before vLLM parses its CLI);
* :mod:`.stats_metrics` -- ``AsyncLLM.do_log_stats`` / ``LLMEngine.do_log_stats`` also update the ``vllm:s2d2_*``
  Prometheus counters from the worker's totals.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

SUPPORTED_VLLM = "0.26.0"


def require_vllm_version(what: str) -> None:
    """Raise a clear error when the installed vLLM is not the one these shims were written against."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version != SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm-s2d2 {what} patches vLLM internals of version {SUPPORTED_VLLM}, but vLLM {version} is "
            f"installed; install vllm=={SUPPORTED_VLLM}")


def wrap_once(owner: Any, name: str, mark: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` by ``make(original)`` unless it is already wrapped (the wrapper carries the
    attribute ``mark``), so that every shim can be installed any number of times."""
    original = getattr(owner, name)
    if getattr(original, mark, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, mark, True)
    setattr(owner, name, wrapper)
