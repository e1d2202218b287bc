"""The sampling transform shared by drafting, verification and the residual (docs/algorithm.md).

One transform for every distribution S2D2 compares, so p (draft) and q (verifier) always agree:

* greedy (temperature < 1e-6): plain softmax of the raw logits, no top-k/top-p (the reference's
  ``_probs_from_logits`` and the SDAR/LLaDA2 greedy samplers); the token is its argmax.
* otherwise: logits / T, top-k (ties at the k-th value kept), top-p on the top-k-filtered softmax (the
  token that crosses p is kept), softmax; the token is drawn by inverse CDF from one uniform.

Per-request parameters are tensors ``[R]``; logits are ``[R, L, V]``.  Filtering runs only when the caller
passes ``top_k`` / ``top_p`` tensors (pass ``None`` when no request uses them: that is a host-side fact the
caller knows, so no device sync is needed to skip the sort).
"""

from __future__ import annotations

import torch

from vllm_s2d2.core import reductions

GREEDY_TEMPERATURE = 1e-6


def exclude_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """``logits`` with one token made impossible (a copy).  Block diffusion never outputs the mask token:
    committing it would leave the position masked and the block could never finish (the reference code has
    no such guard and can loop forever on a model that predicts ``<MASK>``; docs/deviations.md)."""
    if not 0 <= token_id < logits.shape[-1]:
        return logits  # an id outside the vocabulary is never drawn anyway
    out = logits.clone()
    out[..., token_id] = float("-inf")
    return out


def transform_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None = None,
                    top_p: torch.Tensor | None = None, exclude_id: int | None = None) -> torch.Tensor:
    """fp32 probabilities ``[R, L, V]`` under each request's sampling transform; ``exclude_id``: a token made
    impossible first (as :func:`exclude_token`, without its extra copy of the logits)."""
    x = logits.to(torch.float32, copy=True)  # the one full-vocabulary copy; later passes work in place
    if exclude_id is not None and 0 <= exclude_id < x.shape[-1]:
        x[..., exclude_id] = float("-inf")
    greedy = temperature < GREEDY_TEMPERATURE  # [R]
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    x.div_(t[:, None, None])
    if top_k is not None or top_p is not None:
        filtered = _filter(x, top_k, top_p)
        x = torch.where(greedy[:, None, None], x, filtered)
    return reductions.softmax(x)


def _filter(x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    V = x.shape[-1]
    sorted_x, sorted_idx = torch.sort(x, dim=-1, descending=True)
    neg_inf = torch.finfo(x.dtype).min
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V)).long()  # 0 = off
        kth = sorted_x.gather(-1, (k - 1)[:, None, None].expand(*x.shape[:-1], 1))
        x = torch.where(x >= kth, x, torch.full_like(x, neg_inf))
        sorted_x = torch.where(sorted_x >= kth, sorted_x, torch.full_like(sorted_x, neg_inf))
    if top_p is not None:
        sp = reductions.softmax(sorted_x)
        exclusive = reductions.cumsum(sp) - sp
        remove_sorted = (exclusive > top_p[:, None, None]) & (top_p < 1.0)[:, None, None]
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
        x = torch.where(remove, torch.full_like(x, neg_inf), x)
    return x


def categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from ``probs [..., V]`` with one uniform ``u [...]`` per row; never picks p = 0."""
    cdf = reductions.cumsum(probs.float())
    target = (u.clamp(max=1.0 - 2.0 ** -24) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def sample(probs: torch.Tensor, greedy: torch.Tensor, u: torch.Tensor | None, any_sampled: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[R, L]`` and their probabilities p0 under ``probs``; argmax for greedy requests ``[R]``.
    ``any_sampled=False`` (a host-side fact: every request is greedy) skips the inverse-CDF draw, two passes
    over the vocabulary whose result no greedy row uses (``u`` may then be None)."""
    tokens = probs.argmax(dim=-1)
    if any_sampled:
        tokens = torch.where(greedy[:, None], tokens, categorical(probs, u))
    p0 = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, p0
