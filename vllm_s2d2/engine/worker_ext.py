"""Worker extension (vLLM's ``parallel_config.worker_extension_cls``, set by the config hook): methods that
``LLM.collective_rpc`` can call by name on every worker.  Named methods are what vLLM's message serializer
accepts in multiprocess engines (a function would need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``)."""

from __future__ import annotations

from typing import Any

QUALNAME = "vllm_s2d2.engine.worker_ext.S2D2WorkerExtension"


class S2D2WorkerExtension:
    def s2d2_pop_request_stats(self, request_ids: list[str] | None = None) -> dict[str, dict[str, int]]:
        """Per-request S2D2 counters of requests that left this worker (see ``vllm_s2d2.request_stats``)."""
        state: Any = getattr(self.model_runner, "model_state", None)  # type: ignore[attr-defined]
        pop = getattr(state, "pop_request_stats", None)
        return {} if pop is None else pop(request_ids)

    def s2d2_engine_totals(self, per_position: bool = False) -> dict[str, Any] | None:
        """Engine-wide S2D2 counters as of the last finished step (the host copy the stepper keeps; no GPU
        wait), for the ``vllm:s2d2_*`` and ``vllm:spec_decode_*`` Prometheus counters
        (:mod:`vllm_s2d2.engine.metrics`).  With ``per_position`` also ``proposed_per_pos`` /
        ``accepted_per_pos`` (one count per span position, block size B long) where the stepper keeps them."""
        state: Any = getattr(self.model_runner, "model_state", None)  # type: ignore[attr-defined]
        stepper = getattr(state, "stepper", None)
        if stepper is None:
            return None
        from vllm_s2d2.engine.stats import STAT_NAMES

        out: dict[str, Any] = dict(zip(STAT_NAMES, stepper.totals_host.tolist()))
        mirror = getattr(stepper, "mirror", None)
        if per_position and getattr(mirror, "accepted_per_pos", None) is not None:
            out["proposed_per_pos"] = mirror.proposed_per_pos.tolist()  # (same no-wait read as the totals)
            out["accepted_per_pos"] = mirror.accepted_per_pos.tolist()
        return out
