"""The draft a verifying request keeps between its DRAFT step and its VERIFY step (per-slot buffers).

A verification takes two engine steps: the DRAFT step decides ``do_verify`` and saves the draft here (the draft
*logits*, not the fp32 probabilities: they are recomputed with the same transform when the verifier's logits
arrive); the VERIFY step loads it and runs ``core.step.verify_step`` + ``finish_step`` (docs/lifecycle.md).
"""

from __future__ import annotations

from dataclasses import fields

import torch

from vllm_s2d2.core.params import FamilyRules, StepParams
from vllm_s2d2.core.step import Draft, draft_probs

_PER_ROW = ("x0", "p0", "is_mask", "eligible", "edits", "first_half", "span", "baseline_commit")
_PER_REQ = ("span_length", "k_hat", "score", "quota", "do_verify", "routed", "bucket")
# Every field of a Draft is saved (or, probs, recomputed): checked once here, not in load (which is compiled)
assert {f.name for f in fields(Draft)} == {*_PER_ROW, *_PER_REQ, "probs"}, "DraftStore misses a Draft field"


class DraftStore:
    """Per-slot copies of what ``verify_step`` needs from the draft step (one row per slot, the last one scratch)."""

    def __init__(self, max_num_reqs: int, block_size: int, vocab_size: int, logits_dtype: torch.dtype,
                 device: torch.device):
        n, B = max_num_reqs, block_size
        self.logits = torch.zeros(n, B, vocab_size, dtype=logits_dtype, device=device)
        self.rows = {}
        for name in _PER_ROW:
            dt = torch.int64 if name in ("x0", "first_half") else (
                torch.float32 if name == "p0" else torch.bool)
            self.rows[name] = torch.zeros(n, B, dtype=dt, device=device)
        self.reqs = {}
        for name in _PER_REQ:
            dt = torch.float32 if name in ("k_hat", "score") else (
                torch.bool if name in ("do_verify", "routed") else torch.int64)
            self.reqs[name] = torch.zeros(n, dtype=dt, device=device)
        self.counter = torch.zeros(n, dtype=torch.int64, device=device)
        self.step = torch.zeros(n, dtype=torch.int64, device=device)

    def save(self, slots: torch.Tensor, keep: torch.Tensor, draft: Draft, logits: torch.Tensor,
             counter: torch.Tensor, step: torch.Tensor) -> None:
        """Store rows where ``keep`` (the verifying requests); other slots are left untouched.  The rows that are
        not kept are written to the last (scratch) row instead, so the shapes stay static and nothing is read."""
        target = torch.where(keep, slots, torch.full_like(slots, self.logits.shape[0] - 1))

        def put(buf: torch.Tensor, value: torch.Tensor) -> None:
            buf.index_copy_(0, target, value.to(buf.dtype))

        put(self.logits, logits)
        for name in _PER_ROW:
            put(self.rows[name], getattr(draft, name))
        for name in _PER_REQ:
            put(self.reqs[name], getattr(draft, name))
        put(self.counter, counter)
        put(self.step, step)

    def load(self, slots: torch.Tensor, params: StepParams, rules: FamilyRules) -> Draft:
        """The saved drafts of ``slots``; ``probs`` recomputed from the saved logits with ``core.step.draft_probs``,
        as ``draft_step`` computed them."""
        kw = {name: self.rows[name][slots] for name in _PER_ROW}
        kw.update({name: self.reqs[name][slots] for name in _PER_REQ})
        kw["probs"] = draft_probs(self.logits[slots], params, rules)
        return Draft(**kw)

