"""Helpers for offline measurement with vLLM's ``LLMEngine`` (no vLLM import here)."""

from __future__ import annotations

import time
from typing import Any, Sequence


def decode_alone(engine: Any, request_id: str, prompt_token_ids: Sequence[int],
                 sampling_params: Any) -> tuple[list[int], int, float]:
    """Run one request by itself to completion; returns (output token ids, engine steps, seconds).

    With nothing else in the batch, each engine step is one forward of this request (prefill, draft, verify
    or commit), so ``steps`` counts its forwards."""
    engine.add_request(request_id, {"prompt_token_ids": list(prompt_token_ids)}, sampling_params)
    steps, ids, t0 = 0, [], time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                ids = list(o.outputs[0].token_ids)
        steps += 1
    return ids, steps, time.perf_counter() - t0
