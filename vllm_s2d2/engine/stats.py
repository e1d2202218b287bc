"""S2D2 counters: engine totals (periodic log line) and per-request statistics (no vLLM imports).

What is counted (per request slot on the device, :class:`~vllm_s2d2.engine.stepper.S2D2Stepper`):

* ``draft_steps``      forwards that drafted (a commit is fused into the next block's first draft);
* ``verify_steps``     2L verification forwards;
* ``proposed_tokens``  draft tokens offered to verification (the span length, summed over verifications);
* ``accepted_tokens``  of those, accepted by the min(1, q/p) test (or greedy acceptance);
* ``committed_blocks`` blocks written to the KV cache;
* ``verify_restarts``  verifications interrupted by a preemption and redone (their draft is redone after the
  re-prefill);

and engine-wide only, per span position i (``BlockStates.proposed_per_pos`` / ``accepted_per_pos``, B long):
verifications whose span reached i / whose accepted prefix covered i, for vLLM's per-position acceptance.

Routes out of the engine (vLLM 0.26 has no per-request extension field on ``RequestOutput``):

* engine totals: the ``vllm:s2d2_*`` Prometheus counters and, right after vLLM's periodic stats line, one
  ``S2D2 stats (last interval): ...`` INFO line (both in the frontend, when vLLM collects stats:
  :mod:`vllm_s2d2.engine.metrics`), vLLM's own spec-decode counters and log line from the same totals
  (``vllm:spec_decode_num_drafts`` = verify steps, ``..._num_draft_tokens`` = proposed, ``..._num_accepted_tokens``
  = accepted, ``..._num_accepted_tokens_per_pos``); vLLM's own diffusion counters
  (``vllm:diffusion_num_denoising_steps`` ...) count engine steps and commits;
* per request: when vLLM removes a finished (or aborted / preempted) request from the worker, the model state
  keeps its counters (bounded, most recent 4096); :func:`request_stats` fetches and clears them through
  ``LLM.collective_rpc("s2d2_pop_request_stats")``, a method of the plugin's worker extension
  (:mod:`.worker_ext`; works with in-process and multiprocess engine cores)::

      outs = llm.generate(prompts, params)
      stats = request_stats(llm)            # {request_id: {"draft_steps": ..., "verify_rate": ..., ...}}
      stats[outs[0].request_id]
"""

from __future__ import annotations

import re
from typing import Any, Iterable

STAT_NAMES = ("draft_steps", "verify_steps", "proposed_tokens", "accepted_tokens", "committed_blocks",
              "verify_restarts")
VERIFY_RESTARTS = STAT_NAMES.index("verify_restarts")
_INTERNAL_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


RESUME_LOG_ENV = "VLLM_S2D2_LOG_RESUMES"  # "1": one INFO line per request resumed from its preemption snapshot


def resume_message(request_id: str, num_tokens: int) -> str:
    """The line the model state logs (with ``VLLM_S2D2_LOG_RESUMES=1``) when a request that had emitted tokens comes
    back after a preemption: which requests a run preempted (``benchmarks/soak.py --server-log`` reads it)."""
    return f"S2D2 resume after preemption: request {request_id}, {num_tokens} tokens re-prefilled"


def external_request_id(req_id: str) -> str:
    """vLLM 0.26 makes engine-internal ids unique as ``f"{request_id}-{8 hex}"``
    (``v1/engine/input_processor.py:assign_request_id``); the user sees ``request_id``."""
    return _INTERNAL_SUFFIX.sub("", req_id)


def derived(counters: dict[str, int]) -> dict[str, Any]:
    """Counters plus verify rate (verify / draft steps) and acceptance rate (accepted / proposed tokens)."""
    out: dict[str, Any] = dict(counters)
    out["verify_rate"] = counters["verify_steps"] / max(1, counters["draft_steps"])
    out["acceptance_rate"] = counters["accepted_tokens"] / max(1, counters["proposed_tokens"])
    return out


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters of what happened between two readings of the totals (a name missing counts as 0)."""
    return {n: after.get(n, 0) - before.get(n, 0) for n in STAT_NAMES}


def format_stats(t: dict[str, int], label: str = "S2D2 stats") -> str:
    """``S2D2 stats: ...`` with verify rate (verify / draft steps) and acceptance (accepted / proposed)."""
    d = derived(t)
    return (f"{label}: draft steps {t['draft_steps']}, verify steps {t['verify_steps']} (verify rate "
            f"{d['verify_rate']:.2f}), span tokens proposed {t['proposed_tokens']}, accepted "
            f"{t['accepted_tokens']} (acceptance {d['acceptance_rate']:.2f}), blocks committed "
            f"{t['committed_blocks']}")


def request_stats(llm: Any, request_ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per-request S2D2 statistics of finished requests (and clears them): ``{request_id: counters + verify_rate
    + acceptance_rate}``.  ``request_ids`` (the ``RequestOutput.request_id`` values) selects some; None takes
    all.  Needs an ``LLM`` running this plugin's engine (its worker extension answers the call)."""
    ids = None if request_ids is None else [str(r) for r in request_ids]
    try:
        parts = llm.collective_rpc("s2d2_pop_request_stats", args=(ids,))
    except AttributeError as e:
        raise RuntimeError("this LLM does not run the S2D2 engine's worker extension "
                           "(vllm_s2d2.engine.worker_ext.S2D2WorkerExtension); per-request statistics need a "
                           "block-diffusion model served by the plugin") from e
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for rid, counters in (part or {}).items():
            merged[rid] = derived(counters)
    return merged
