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
``vllm:s2d2_verify_restarts``       verifications interrupted by a preemption (redone after the re-prefill)
=================================  ======================================================================

The same poll fills vLLM's own speculative-decoding counters, which vLLM itself leaves unregistered for
diffusion models (it exports ``vllm:diffusion_*`` for them instead), so spec-decode dashboards, ``vllm bench
serve``'s acceptance report and vLLM's ``SpecDecoding metrics`` log line show S2D2's verification:

=================================================  ====================================================
``vllm:spec_decode_num_drafts``                     = ``verify_steps`` (one "draft" = one verified span)
``vllm:spec_decode_num_draft_tokens``               = ``proposed_tokens`` (span tokens verified)
``vllm:spec_decode_num_accepted_tokens``            = ``accepted_tokens`` (accepted span prefix)
``vllm:spec_decode_num_accepted_tokens_per_pos``    label ``position`` = i: verifications whose accepted
                                                    prefix covered span position i (0 .. B - 1)
=================================================  ====================================================

vLLM's derived numbers then read: acceptance rate = accepted / draft tokens (S2D2's acceptance), per-position
acceptance = per_pos / drafts, and "mean acceptance length" = 1 + accepted / drafts, vLLM's convention of one
bonus token per draft; an S2D2 verification commits min(a + 1, |span|) span tokens (docs/algorithm.md), so
that convention counts one token too many whenever the whole span was accepted.

Labels as vLLM's own: ``model_name`` (served model name) and ``engine`` (engine index).  Verify rate =
``rate(verify_steps) / rate(draft_steps)``, acceptance = ``rate(accepted_tokens) / rate(proposed_tokens)``.
The values trail the engine by at most one stats interval.  The same poll writes one INFO line after vLLM's
own periodic line, with the interval's counts (``S2D2 stats (last interval): draft steps ..., verify rate ...,
acceptance ...``; nothing when the interval had no step), and, when the interval verified, vLLM's own
``SpecDecoding metrics: ...`` line (vLLM's ``SpecDecodingLogging``).  With ``--disable-log-stats`` (the default
of ``LLM``) vLLM collects no metrics and neither does this; ``vllm_s2d2.request_stats(llm)`` always works.
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
    "verify_restarts": "S2D2: verifications interrupted by a preemption and redone.",
}
# vLLM's speculative-decoding counters (names, help texts and labels as ``vllm/v1/spec_decode/metrics.py``
# SpecDecodingProm registers them for a non-diffusion engine), filled from these S2D2 totals.
SPEC_DECODE = {
    "vllm:spec_decode_num_drafts": ("verify_steps", "Number of spec decoding drafts."),
    "vllm:spec_decode_num_draft_tokens": ("proposed_tokens", "Number of draft tokens."),
    "vllm:spec_decode_num_accepted_tokens": ("accepted_tokens", "Number of accepted tokens."),
}
SPEC_DECODE_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
SPEC_DECODE_PER_POS_DOC = "Accepted tokens per draft position."
_COUNTERS: dict[str, Any] = {}  # one prometheus Counter per name and process (the registry refuses duplicates)


def _metric(name: str, doc: str, labels: tuple[str, ...]) -> Any:
    """The process's Counter ``name``, registered in the default registry.  vLLM's ``PrometheusStatLogger``
    unregisters every ``vllm:`` collector when an engine starts (``unregister_vllm_metrics``); a counter made for
    an earlier engine of this process is registered again (its values kept)."""
    import prometheus_client

    c = _COUNTERS.get(name)
    if c is None:
        c = _COUNTERS[name] = prometheus_client.Counter(name, doc, labelnames=list(labels))
    else:
        _reregister(c)
    return c


def _reregister(collector: Any) -> None:
    import prometheus_client

    registry = prometheus_client.REGISTRY
    if collector not in getattr(registry, "_collector_to_names", {collector: None}):
        registry.register(collector)


def _counter(name: str) -> Any:
    return _metric(METRIC_PREFIX + name, DOCS[name], LABELS)


def _delta(now: int, last: int) -> int:
    """Increment of a monotone total; a total below the last seen (an engine that restarted) counts from 0."""
    return now - last if now >= last else now


class S2D2Counters:
    """The Prometheus children of one engine; :meth:`observe` turns engine totals into increments."""

    def __init__(self, model_name: str, engine: int | str = 0):
        self.labels = (str(model_name), str(engine))
        self.children = {n: _counter(n).labels(*self.labels) for n in STAT_NAMES}
        self.last = dict.fromkeys(STAT_NAMES, 0)
        self.spec = {stat: _metric(name, doc, LABELS).labels(*self.labels)
                     for name, (stat, doc) in SPEC_DECODE.items()}
        self.per_pos: list[Any] = []  # children of SPEC_DECODE_PER_POS, one per span position (made on first use)
        self.last_pos = [0]
        self.spec_logging: Any = None  # vLLM's SpecDecodingLogging for the interval line (patches/stats_metrics)

    def observe(self, totals: dict[str, Any] | None) -> dict[str, Any]:
        """Add ``totals - last seen`` to each counter; returns the increments (``STAT_NAMES``, plus
        ``accepted_per_pos`` / ``proposed_per_pos`` lists where the totals carry them).  Totals below the last
        seen (an engine that restarted) count from zero again."""
        if not totals:
            return {}
        for c in _COUNTERS.values():  # after vLLM's unregister_vllm_metrics (another engine started)
            _reregister(c)
        inc: dict[str, Any] = {}
        for n in STAT_NAMES:
            now = int(totals.get(n, 0))
            inc[n] = _delta(now, self.last[n])
            if inc[n]:
                self.children[n].inc(inc[n])
            self.last[n] = now
        for stat, child in self.spec.items():
            if inc[stat]:
                child.inc(inc[stat])
        accepted = totals.get("accepted_per_pos")
        if accepted is not None:
            if len(self.per_pos) < len(accepted):
                base = _metric(SPEC_DECODE_PER_POS, SPEC_DECODE_PER_POS_DOC, LABELS + ("position",))
                self.per_pos += [base.labels(*self.labels, str(i)) for i in range(len(self.per_pos), len(accepted))]
            last = self.last_pos + [0] * (len(accepted) - len(self.last_pos))
            now_pos = [int(v) for v in accepted]
            inc["accepted_per_pos"] = [_delta(n, l) for n, l in zip(now_pos, last)]
            for child, d in zip(self.per_pos, inc["accepted_per_pos"]):
                if d:
                    child.inc(d)
            self.last_pos = now_pos
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
