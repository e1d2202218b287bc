"""Engine counters in the reference decoder's forward accounting (so both decoders' forwards compare)."""

from __future__ import annotations

from typing import Mapping


def reference_forwards(counters: Mapping[str, int]) -> dict[str, int]:
    """One request's forwards in the reference decoder's accounting, from the engine's counters
    (:data:`vllm_s2d2.engine.stats.STAT_NAMES`, as ``vllm_s2d2.request_stats`` returns them): the prefill, each
    draft, each verification and one commit forward per block.  The engine fuses a block's commit into the next
    block's first draft, so ``commit`` forwards cost it nothing; they are listed so that tokens per forward
    compare with the reference (``tokens / sum`` = every forward counted, ``tokens / (sum - commit)`` = fused)."""
    return {"prefill": 1, "draft": counters["draft_steps"], "verify": counters["verify_steps"],
            "commit": counters["committed_blocks"]}
