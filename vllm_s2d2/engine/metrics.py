"""S2D2 counters on vLLM's Prometheus ``/metrics`` (frontend side).

vLLM 0.26's stat loggers live in the frontend process and see only what the engine core sends them
(``SchedulerStats``: a fixed set of dataclass fields, nothing a plugin can add to without patching the scheduler,
its output and the message schema).  The S2D2 counters live on the worker (:class:`~vllm_s2d2.engine.stepper.
S2D2Stepper`, engine totals of every request).  So the frontend *polls*: each time vLLM writes its periodic stats
(``AsyncLLM.do_log_stats``, every ``VLLM_LOG_STATS_INTERVAL`` s in ``vllm serve``; ``LLMEngine.do_log_stats`` for
an ``LLM`` made with ``disable_log_stats=False``), :mod:`vllm_s2d2.patches.stats_metrics` asks the worker for its
totals (``collective_rpc("s2d2_engine_totals")``, worker extension) and :class:`S2D2Counters` adds the change to
these Prometheus counters (``_total`` is appended by the client library):

=================================  ======================================================================
``vllm:s2d2_draft_steps``           forwards that drafted (a commit is fused into the next block's draft)
``vllm:s2d2_verify_steps``          verification forwards (2L / causal)
``vllm:s2d2_proposed_tokens``       draft tokens offered to verification
``vllm:s2d2_accepted_tokens``       of those, accepted
``vllm:s2d2_committed_blocks``      blocks written to the KV cache
=================================  ======================================================================

Labels as vLLM's own: ``model_name`` (served model name) and ``engine`` (engine index).  Verify rate =
``rate(verify_steps) / rate(draft_steps)``, acceptance = ``rate(accepted_tokens) / rate(proposed_tokens)``.
The values trail the engine by at most one stats interval.  The same poll writes one INFO line after vLLM's
own periodic line, with the interval's counts (``S2D2 stats (last interval): draft steps ..., verify rate ...,
acceptance ...``; nothing when the interval had no step).  With ``--disable-log-stats`` (the default of
``LLM``) vLLM collects no metrics and neither does this; ``vllm_s2d2.request_stats(llm)`` always works.
"""

from __future__ import annotations

from typing import Any

from vllm_s2d2.engine.stats import STAT_NAMES

METRIC_PREFIX = "vllm:s2d2_"
LABELS = ("model_name", "engine")
DOCS = {
    "draft_steps": "S2D2: forwards that drafted masked positions (diffusion mode).",
    "verify_steps": "S2D2: verification forwards (AR-mode re-scoring of the first masked span).",
    "proposed_tokens": "S2D2: draft tokens offered to verification.",
    "accepted_tokens": "S2D2: draft tokens accepted by verification.",
    "committed_blocks": "S2D2: blocks committed to the KV cache.",
}
_COUNTERS: dict[str, Any] = {}  # one prometheus Counter per name and process (the registry refuses duplicates)


def _counter(name: str) -> Any:
    if name not in _COUNTERS:
        import prometheus_client

        _COUNTERS[name] = prometheus_client.Counter(METRIC_PREFIX + name, DOCS[name], labelnames=list(LABELS))
    return _COUNTERS[name]


class S2D2Counters:
    """The Prometheus children of one engine; :meth:`observe` turns engine totals into increments."""

    def __init__(self, model_name: str, engine: int | str = 0):
        self.children = {n: _counter(n).labels(str(model_name), str(engine)) for n in STAT_NAMES}
        self.last = dict.fromkeys(STAT_NAMES, 0)

    def observe(self, totals: dict[str, int] | None) -> dict[str, int]:
        """Add ``totals - last seen`` to each counter; returns the increments.  Totals below the last seen
        (an engine that restarted) count from zero again."""
        if not totals:
            return {}
        inc = {}
        for n in STAT_NAMES:
            now = int(totals.get(n, 0))
            inc[n] = now - self.last[n] if now >= self.last[n] else now
            if inc[n]:
                self.children[n].inc(inc[n])
            self.last[n] = now
        return inc


def first_totals(parts: Any) -> dict[str, int] | None:
    """``collective_rpc`` returns one answer per worker; tensor-parallel ranks hold the same counters, so the
    first answer is the engine's."""
    for p in parts or ():
        if p:
            return p
    return None


def read_s2d2_metrics(text: str) -> dict[str, int]:
    """The ``vllm:s2d2_*`` totals in a ``/metrics`` page (summed over label sets), by counter name
    (``draft_steps`` ...); names absent from the page are absent from the result."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith(METRIC_PREFIX):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0][len(METRIC_PREFIX):]
        if name.endswith("_total") and name[:-len("_total")] in DOCS:
            key = name[:-len("_total")]
            out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out
