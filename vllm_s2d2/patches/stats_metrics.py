"""S2D2 counters on ``/metrics``: poll the worker when vLLM writes its periodic stats (:mod:`vllm_s2d2.engine.
metrics` says why a poll: vLLM 0.26's ``SchedulerStats`` has no room for plugin counters).

Wraps ``AsyncLLM.do_log_stats`` (``v1/engine/async_llm.py``; ``vllm serve`` calls it every
``VLLM_LOG_STATS_INTERVAL`` s) and ``LLMEngine.do_log_stats`` (``v1/engine/llm_engine.py``).  After vLLM's own
loggers ran, an engine that runs this plugin (its ``worker_extension_cls`` is the plugin's) and collects stats
(``logger_manager`` set) asks its worker for the S2D2 totals, updates the counters (``vllm:s2d2_*`` and vLLM's
own ``vllm:spec_decode_*``, :mod:`vllm_s2d2.engine.metrics`) and logs the interval's counts under vLLM's line
(the ``S2D2 stats`` line, then vLLM's ``SpecDecoding metrics`` line when the interval verified).  With several
API servers only the first (client index 0) does, so that each increment is counted once.  A failing poll logs
one warning and never breaks vLLM's logging loop.
"""

from __future__ import annotations

from typing import Any

from vllm_s2d2.patches import require_vllm_version, wrap_once

_MARK = "_s2d2_metrics_wrapped"
RPC_METHOD = "s2d2_engine_totals"
RPC_ARGS = (True,)  # per_position: the per-span-position counts for vllm:spec_decode_*_per_pos
RPC_TIMEOUT_S = 5.0


def _counters_for(engine: Any) -> Any:
    """The engine's :class:`S2D2Counters`, made on first use; None where nothing is to be polled."""
    cached = engine.__dict__.get("_s2d2_counters", False)
    if cached is not False:
        return cached
    from vllm_s2d2.engine.worker_ext import QUALNAME as WORKER_EXTENSION
    from vllm_s2d2.engine.metrics import S2D2Counters

    counters = None
    cfg = getattr(engine, "vllm_config", None)
    core = getattr(engine, "engine_core", None)
    if (cfg is not None and getattr(engine, "logger_manager", None) is not None
            and cfg.parallel_config.worker_extension_cls == WORKER_EXTENSION
            and getattr(core, "client_index", 0) == 0):
        counters = S2D2Counters(cfg.model_config.served_model_name)
    engine.__dict__["_s2d2_counters"] = counters
    return counters


def _poll_failed(engine: Any, err: BaseException) -> None:
    if not engine.__dict__.get("_s2d2_poll_warned"):
        engine.__dict__["_s2d2_poll_warned"] = True
        from vllm_s2d2.log import get_logger

        get_logger(__name__).warning("S2D2: reading the engine's S2D2 counters for /metrics failed (%s: %s); "
                                      "the vllm:s2d2_* counters stay where they are", type(err).__name__, err)


def _observe(counters: Any, parts: Any) -> None:
    from vllm_s2d2.engine.metrics import first_totals
    from vllm_s2d2.engine.stats import format_stats

    inc = counters.observe(first_totals(parts))
    if inc.get("draft_steps"):
        from vllm_s2d2.log import get_logger

        get_logger(__name__).info(format_stats(inc, "S2D2 stats (last interval)"))
    spec_decoding_line(counters, inc)


def spec_decoding_line(counters: Any, inc: dict[str, Any], log_fn: Any = None) -> None:
    """vLLM's own ``SpecDecoding metrics: ...`` line for an interval's S2D2 increments (nothing without a
    verification), written by vLLM's ``SpecDecodingLogging`` with its non-diffusion framing: drafts = verify
    steps, drafted = proposed span tokens, accepted = accepted span tokens, per-position acceptance over the
    span.  (vLLM's own logger writes ``DiffusionDecoding metrics`` for the plugin's models.)"""
    if not inc.get("verify_steps"):
        return
    from vllm.v1.spec_decode.metrics import SpecDecodingLogging, SpecDecodingStats

    if counters.spec_logging is None:
        counters.spec_logging = SpecDecodingLogging(is_diffusion=False)
    per_pos = [int(v) for v in inc.get("accepted_per_pos") or []]
    counters.spec_logging.observe(SpecDecodingStats(
        num_spec_tokens=len(per_pos), num_drafts=int(inc["verify_steps"]),
        num_draft_tokens=int(inc["proposed_tokens"]), num_accepted_tokens=int(inc["accepted_tokens"]),
        num_accepted_tokens_per_pos=per_pos))
    if log_fn is None:
        counters.spec_logging.log()
    else:
        counters.spec_logging.log(log_fn=log_fn)


def install() -> None:
    """Wrap ``AsyncLLM.do_log_stats`` and ``LLMEngine.do_log_stats`` (idempotent)."""
    require_vllm_version("stats_metrics")
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    def make_async(original):
        async def do_log_stats(self, *args, **kwargs):
            out = await original(self, *args, **kwargs)
            counters = _counters_for(self)
            if counters is not None:
                try:
                    _observe(counters, await self.collective_rpc(RPC_METHOD, timeout=RPC_TIMEOUT_S,
                                                                  args=RPC_ARGS))
                except Exception as e:  # noqa: BLE001 - never break vLLM's stats loop
                    _poll_failed(self, e)
            return out
        return do_log_stats

    def make_sync(original):
        def do_log_stats(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            counters = _counters_for(self)
            if counters is not None:
                try:
                    _observe(counters, self.collective_rpc(RPC_METHOD, timeout=RPC_TIMEOUT_S, args=RPC_ARGS))
                except Exception as e:  # noqa: BLE001
                    _poll_failed(self, e)
            return out
        return do_log_stats

    wrap_once(AsyncLLM, "do_log_stats", _MARK, make_async)
    wrap_once(LLMEngine, "do_log_stats", _MARK, make_sync)
