"""Engine side of S2D2 verification: the draft kept between the draft and the verify step, the 2L canvas,
its positions, and the verify group handed to the attention backend.

A verification takes two engine steps (S2D2_SPEC.md §3.1, cost 2 forwards):

1. DRAFT step: ``core.step.draft_step`` decides ``do_verify`` for some rows.  Those rows commit nothing now;
   their :class:`~vllm_s2d2.core.step.Draft` is saved in :class:`DraftStore` (per-slot persistent buffers;
   the draft *logits* are kept instead of the fp32 probabilities, and the probabilities are recomputed with
   the same transform when the verifier's logits arrive) and the next canvas is the 2L layout below.
2. VERIFY step: the forward runs with the 2L mask (:mod:`vllm_s2d2.model_executor.attention.backend`); the
   mask-half logits are q; ``core.step.verify_step`` + ``finish_step`` commit the accepted prefix, the
   correction and the quota top-up, exactly as the reference decoder does.

2L canvas of a request whose block has ``Lb`` uncommitted positions (``off = B - Lb`` already cached)::

    local slot   0 .. Lb-1        Lb .. B-1     B .. B+Lb-1        B+Lb .. 2B-1
    tokens       first half       MASK filler   MASK (mask half)   MASK filler
    RoPE pos     p .. p+Lb-1      p+Lb ..       p .. p+Lb-1        (runner's)
"""

from __future__ import annotations

from dataclasses import fields

import torch

from vllm_s2d2.core.params import StepParams
from vllm_s2d2.core.sampling import exclude_token, transform_probs
from vllm_s2d2.core.step import Draft

_PER_ROW = ("x0", "p0", "is_mask", "eligible", "edits", "first_half", "span", "baseline_commit")
_PER_REQ = ("span_length", "k_hat", "score", "quota", "do_verify", "routed", "bucket")


class DraftStore:
    """Per-slot copies of what ``verify_step`` needs from the draft step (``max_num_reqs`` rows)."""

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
        """Store rows where ``keep`` (the verifying requests); other slots are left untouched."""
        def put(buf: torch.Tensor, value: torch.Tensor) -> None:
            k = keep.view(-1, *([1] * (value.dim() - 1)))
            buf[slots] = torch.where(k, value.to(buf.dtype), buf[slots])

        put(self.logits, logits)
        for name in _PER_ROW:
            put(self.rows[name], getattr(draft, name))
        for name in _PER_REQ:
            put(self.reqs[name], getattr(draft, name))
        put(self.counter, counter)
        put(self.step, step)

    def load(self, slots: torch.Tensor, params: StepParams, mask_token_id: int) -> Draft:
        """The saved drafts of ``slots``; ``probs`` recomputed from the saved logits exactly as
        ``core.step.draft_step`` computed them."""
        logits = exclude_token(self.logits[slots], mask_token_id)
        kw = {name: self.rows[name][slots] for name in _PER_ROW}
        kw.update({name: self.reqs[name][slots] for name in _PER_REQ})
        kw["probs"] = transform_probs(logits, params.temperature, params.top_k, params.top_p)
        assert {f.name for f in fields(Draft)} == set(kw)
        return Draft(**kw)


def verify_canvas(first_half: torch.Tensor, off: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``[R, 2B]`` canvas: the first half's uncached part at slots ``[0, Lb)``, masks elsewhere."""
    R, B = first_half.shape
    w = torch.arange(2 * B, device=first_half.device)
    src = (off[:, None] + w[None, :]).clamp(max=B - 1)
    Lb = B - off
    return torch.where(w[None, :] < Lb[:, None], first_half.gather(1, src), torch.full_like(src, mask_id))


def verify_position_shift(token_req: torch.Tensor, local: torch.Tensor, verifying: torch.Tensor,
                          block_size: int) -> torch.Tensor:
    """Amount to subtract from the runner's positions (``p + local``) so that the mask half of a verifying
    request sits at the first half's positions: ``B`` on local slots ``>= B`` of verifying requests."""
    return torch.where(verifying[token_req] & (local >= block_size), block_size, 0)
