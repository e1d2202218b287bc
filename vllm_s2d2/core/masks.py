"""Dense reference attention masks (True = the query may attend the key).

These are the ground truth the engine's paged attention kernels are checked against, and what the reference
decoder feeds its dense forward.  Keys are laid out ``[cache (C) | query tokens]``; positions are absolute.
"""

from __future__ import annotations

import torch


def causal(n: int, device=None) -> torch.Tensor:
    """Token-causal ``[n, n]``: key k visible to query q iff k <= q."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def block_causal(n: int, block_size: int, device=None) -> torch.Tensor:
    """Block-causal ``[n, n]`` over absolute positions 0..n-1: k visible to q iff k // B <= q // B."""
    blk = torch.arange(n, device=device) // block_size
    return blk[None, :] <= blk[:, None]


def committed_kv(n: int, block_size: int, token_causal: bool, prompt_len: int = 0, device=None) -> torch.Tensor:
    """What each of the first ``n`` committed tokens attended to when its KV was written ``[n, n]``.

    With AR-like caching (``cache_ver``) every row is token-causal.  Otherwise rows are block-causal over
    absolute blocks (k // B <= q // B), except that prompt rows never see generated tokens: the whole
    prompt is prefilled in one pass, so the prompt's last (partial) block is bidirectional among its
    prompt tokens only.  B = 4, prompt 6, n = 8 (P = prompt, G = generated)::

        P0  1111 0000          P4  1111 1100
        P1  1111 0000          P5  1111 1100
        P2  1111 0000          G6  1111 1111
        P3  1111 0000          G7  1111 1111
    """
    if token_causal:
        return causal(n, device)
    m = block_causal(n, block_size, device)
    idx = torch.arange(n, device=device)
    return m & ((idx[None, :] < prompt_len) | (idx[:, None] >= prompt_len))


def committed_kv_from_prompt(n: int, block_size: int, prompt_len: int, token_causal: bool,
                             device=None) -> torch.Tensor:
    """D2F committed KV ``[n, n]``: blocks counted from the prompt end ``P`` (``docs/plans/d2f.md`` §1).

    Prompt rows (< P) see the whole prompt (one bidirectional segment) and nothing generated; a generated row
    q sees the whole prompt and generated keys k with ``(k - P) // B <= (q - P) // B`` (block-causal), or
    ``k <= q`` with ``token_causal`` (``cache_ver``).  B = 2, P = 3, n = 7 (P = prompt, G = generated)::

        P0  111 0000           G3  111 1100
        P1  111 0000           G4  111 1100
        P2  111 0000           G5  111 1111
                               G6  111 1111
    """
    idx = torch.arange(n, device=device)
    q, k = idx[:, None], idx[None, :]
    q_gen, k_gen = q >= prompt_len, k >= prompt_len
    gen_visible = (k <= q) if token_causal else (
        (k - prompt_len).clamp_min(0) // block_size <= (q - prompt_len).clamp_min(0) // block_size)
    return torch.where(q_gen, ~k_gen | gen_visible, ~k_gen)


def window_rows(cache_len: int, num_blocks: int, block_size: int, causal_len: int = 0,
                device=None) -> torch.Tensor:
    """D2F draft rows over a window of ``A = num_blocks`` blocks of ``B`` after ``C`` keys ``[A*B, C + A*B]``.

    Every row sees the whole cache; window keys block-causally (blocks aligned to the window start).  The first
    ``causal_len`` rows (to-cache blocks whose KV this forward writes with ``cache_ver``) are token-causal over
    the window instead.  A = 2, B = 2, C = 1 (causal_len = 2 on the right)::

        q0  1 1100        q0  1 1000
        q1  1 1100        q1  1 1100
        q2  1 1111        q2  1 1111
        q3  1 1111        q3  1 1111
    """
    n = num_blocks * block_size
    rows = torch.ones(n, cache_len + n, dtype=torch.bool, device=device)
    idx = torch.arange(n, device=device)
    rows[:, cache_len:] = torch.where(idx[:, None] < causal_len, causal(n, device), block_causal(n, block_size, device))
    return rows


def draft_rows(cache_len: int, block_len: int, causal_prefix: torch.Tensor | int = 0,
               device=None) -> torch.Tensor:
    """Rows of a draft forward over one block ``[L, C + L]``: the whole cache, the block bidirectionally.

    With ``draft_ver`` the block's committed prefix before its first mask (``causal_prefix`` rows) is
    token-causal instead.  L = 4, C = 2, causal_prefix = 2::

        q0  11 1000
        q1  11 1100
        q2  11 1111
        q3  11 1111
    """
    rows = torch.ones(block_len, cache_len + block_len, dtype=torch.bool, device=device)
    prefix = torch.arange(block_len, device=device) < torch.as_tensor(causal_prefix, device=device)
    in_block = rows[:, cache_len:]
    in_block[prefix] = causal(block_len, device)[prefix]
    return rows


def causal_rows(cache_len: int, block_len: int, device=None) -> torch.Tensor:
    """Token-causal rows over ``[cache | block]`` ``[L, C + L]`` (AR-like commit, Fast-dLLM v2 verify)."""
    rows = torch.ones(block_len, cache_len + block_len, dtype=torch.bool, device=device)
    rows[:, cache_len:] = causal(block_len, device)
    return rows


def verifier_2l(cache_len: int, block_len: int, device=None, tbs: int = 1) -> torch.Tensor:
    """The 2L verifier mask ``[2L, C + 2L]`` (``docs/algorithm.md``; reference ``SDAR/generate_ssd_policy.py:107-127``).

    Input ``[first half = draft-filled block | mask half = L x MASK]``, both at the block's positions
    (duplicated position ids).  First-half rows are token-causal over the first half; mask-half row i sees
    the first half strictly before i (its own draft excluded) and itself, so it predicts token i exactly as
    block-size-1 (AR) decoding would given the drafts before it.  L = 4, C = 2 (cache | first | mask)::

        q0  11 1000 0000        m0  11 0000 1000
        q1  11 1100 0000        m1  11 1000 0100
        q2  11 1110 0000        m2  11 1100 0010
        q3  11 1111 0000        m3  11 1110 0001

    ``tbs`` (D2F target block size; target blocks aligned to the first input column): first-half rows are
    tbs-block-causal; mask-half row i sees the first-half keys of target blocks strictly before i's and the
    mask-half keys of its own target block.  ``tbs = 1`` is the mask above.  L = 4, C = 1, tbs = 2::

        q0  1 1100 0000         m0  1 0000 1100
        q1  1 1100 0000         m1  1 0000 1100
        q2  1 1111 0000         m2  1 1100 0011
        q3  1 1111 0000         m3  1 1100 0011
    """
    L, C = block_len, cache_len
    m = torch.zeros(2 * L, C + 2 * L, dtype=torch.bool, device=device)
    m[:, :C] = True
    target = torch.arange(L, device=device) // tbs
    m[:L, C:C + L] = target[None, :] <= target[:, None]
    m[L:, C:C + L] = target[None, :] < target[:, None]
    m[L:, C + L:] = target[None, :] == target[:, None]
    return m


def target_causal_rows(cache_len: int, block_len: int, tbs: int, device=None) -> torch.Tensor:
    """Rows of the shifted (Dream) D2F verifier ``[L, C + L]``: the whole cache, tbs-block-causal over the input
    (target blocks aligned to its first column; ``tbs = 1`` is :func:`causal_rows`).  L = 4, C = 1, tbs = 2::

        q0  1 1100
        q1  1 1100
        q2  1 1111
        q3  1 1111
    """
    rows = torch.ones(block_len, cache_len + block_len, dtype=torch.bool, device=device)
    rows[:, cache_len:] = block_causal(block_len, tbs, device)
    return rows


def verifier_qq_bias(block_size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`verifier_2l` with an empty cache as a ``[2B, 2B]`` additive bias (0 = visible, -inf = hidden):
    the one pattern of every verify canvas in the engine, whatever part of the block is already cached (the
    canvas layout is drawn in docs/lifecycle.md)."""
    visible = verifier_2l(0, block_size, device)
    bias = torch.zeros(2 * block_size, 2 * block_size, dtype=dtype, device=device)
    return bias.masked_fill_(~visible, float("-inf"))


def canvas_visibility(spec: torch.Tensor, p: torch.Tensor, q_len: torch.Tensor, verifying: torch.Tensor,
                      verify_pattern: torch.Tensor) -> torch.Tensor:
    """``[R, W, W]`` bool table of a canvas starting at position ``p [R]``: query slot i sees canvas key j (every
    key below ``p`` is visible, so the table is all a step's attention needs; docs/lifecycle.md).

    ``spec [R, 4]``: the ranges ``lo1, hi1, lo2, hi2`` of :func:`vllm_s2d2.core.block.attention_ranges`
    (inclusive; ``lo >= hi`` = none): token-causal OR both inside one range, clipped to the keys present
    (``< p + q_len``); ``verifying [R]`` rows take ``verify_pattern [W, W]`` (the 2L mask,
    :func:`verifier_2l` with an empty cache) instead."""
    R, W = spec.shape[0], verify_pattern.shape[0]
    idx = torch.arange(W, device=spec.device)
    q = p[:, None] + idx[None, :]  # [R, W] absolute positions of the canvas slots
    vis = (idx[:, None] >= idx[None, :]).expand(R, W, W)  # token-causal inside the canvas
    last = (p + q_len - 1)[:, None]
    for c in (0, 2):
        lo, hi = spec[:, c:c + 1].long(), torch.minimum(spec[:, c + 1:c + 2].long(), last)
        inside = (q >= lo) & (q <= hi) & (lo < hi)  # [R, W]
        vis = vis | (inside[:, :, None] & inside[:, None, :])
    return torch.where(verifying[:, None, None], verify_pattern[None].expand(R, W, W), vis)


def prefill_visibility(start: torch.Tensor, prompt_len: torch.Tensor, block_size: int, width: int,
                       token_causal: torch.Tensor) -> torch.Tensor:
    """``[R, W, W]`` bool table of a prefill chunk of ``width`` tokens from ``start`` (every key below ``start``
    is visible): token-causal rows (``cache_ver``), else block-causal with the last block split at the prompt
    end, as :func:`committed_kv` writes the prompt's KV."""
    idx = torch.arange(width, device=start.device)
    pos = start[:, None] + idx[None, :]  # [R, W]
    segment = pos // block_size * 2 + (pos >= prompt_len[:, None]).long()
    same = segment[:, :, None] == segment[:, None, :]
    causal_ = idx[:, None] >= idx[None, :]
    return causal_[None] | (~token_causal[:, None, None] & same)


def prefill_visibility_from_prompt(start: torch.Tensor, prompt_len: torch.Tensor, block_size: int, width: int,
                                   token_causal: torch.Tensor) -> torch.Tensor:
    """D2F's ``[R, W, W]`` prefill table (blocks counted from the prompt end, ``docs/plans/d2f.md``): the prompt is
    one bidirectional segment and generated positions (a re-prefill after preemption) are block-causal from the
    prompt end, or token-causal with ``cache_ver`` -- what :func:`committed_kv_from_prompt` writes.  Keys below
    ``start`` are all visible; a generated row never sees a later block, a prompt row never a generated key."""
    idx = torch.arange(width, device=start.device)
    pos = start[:, None] + idx[None, :]  # [R, W]
    P = prompt_len[:, None]
    segment = torch.where(pos < P, torch.full_like(pos, -1), (pos - P) // block_size)  # -1: the prompt
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    causal_ = (idx[:, None] >= idx[None, :])[None]
    prompt_rows = (q_seg < 0) & (k_seg < 0)
    generated_rows = (q_seg >= 0) & torch.where(token_causal[:, None, None], causal_, k_seg <= q_seg)
    return prompt_rows | generated_rows
