"""Dense attention with a boolean mask: the oracle of the Triton kernel tests (imported by their subprocess
scripts)."""

import torch


def dense(q, k, v, visible, scale):
    """``q [Lq, Hq, D]``, ``k / v [Lk, Hkv, D]`` (GQA: each KV head serves ``Hq / Hkv`` query heads),
    ``visible [Lq, Lk]`` bool -> ``[Lq, Hq, D]`` in float32 (low-precision inputs are upcast)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    s = s.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
