"""The first contiguous run of masked positions ("span", ``docs/algorithm.md``), batched over requests."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Span(NamedTuple):
    start: torch.Tensor  # [R] first masked position in the region (B if none)
    length: torch.Tensor  # [R] span length (0 if the region has no mask)
    mask: torch.Tensor  # [R, B] bool, True on span positions


def first_mask_span(is_mask: torch.Tensor, region: torch.Tensor | None = None) -> Span:
    """Span = first contiguous masked run inside ``region`` (all positions if None), scanned left to right.

    ``is_mask``/``region``: bool ``[R, B]``.  Example (B = 8, . = token, M = mask)::

        block   . M M . M M M .
        span    0 1 1 0 0 0 0 0      start 1, length 2
    """
    m = is_mask if region is None else is_mask & region
    R, B = m.shape
    pos = torch.arange(B, device=m.device)
    any_mask = m.any(dim=1)
    start = torch.where(any_mask, m.int().argmax(dim=1), torch.full((R,), B, device=m.device))
    after = pos[None, :] >= start[:, None]
    breaks = torch.cumsum((~m & after).int(), dim=1)
    span = m & after & (breaks == 0)
    return Span(start, span.sum(dim=1), span)
