"""Counter-based random numbers: reproducible per request, independent of batch composition.

``uniform(seed, counter, stream, n)`` hashes (seed, counter, stream, index) with 32-bit murmur3 finalisers
written in int64 torch ops, so the same request draws the same numbers whether it runs alone, in a batch,
in the reference decoder or in the engine, on CPU or GPU.  No generator objects, no loops, no host syncs.

Each request advances its ``counter`` once per decoding step; ``stream`` separates the uses inside a step.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF

# Streams used inside one step (one counter value per step).
STREAM_DRAFT = 1  # draft token sampling, index = block position
STREAM_ACCEPT = 2  # acceptance uniforms, index = block position
STREAM_RESAMPLE = 3  # residual resampling at the first rejection, index 0
STREAM_FALLBACK = 4  # reserved


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow (split c into 16-bit halves)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash32(seed: torch.Tensor, counter: torch.Tensor, stream: int | torch.Tensor, index: torch.Tensor
           ) -> torch.Tensor:
    """32-bit hash of (seed, counter, stream, index); all int64 tensors broadcast together (``stream`` an int or,
    per column, a tensor)."""
    streams = stream if isinstance(stream, torch.Tensor) else torch.full_like(index, stream)
    h = _fmix32((index & _M32) ^ _mul32(streams & _M32, 0x9E3779B1))
    h = _fmix32(h ^ (counter & _M32))
    h = _fmix32(h ^ ((counter >> 32) & _M32))
    h = _fmix32(h ^ (seed & _M32))
    return _fmix32(h ^ ((seed >> 32) & _M32))


def uniform(seed: torch.Tensor, counter: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """Uniform floats in (0, 1), shape ``[R, n]`` for ``seed``/``counter`` of shape ``[R]`` (int64)."""
    index = torch.arange(n, device=seed.device, dtype=torch.int64)
    return _to_unit(hash32(seed[:, None], counter[:, None], stream, index[None, :]))


def uniform_pair(seed: torch.Tensor, counter: torch.Tensor, stream_a: int, n_a: int, stream_b: int, n_b: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uniform(seed, counter, stream_a, n_a), uniform(seed, counter, stream_b, n_b))``, the same numbers, from
    one pass of the hash over ``n_a + n_b`` columns (the hash is elementwise; on a GPU each of its ~100 integer ops
    is a kernel launch, so one pass instead of two saves about as many launches per step)."""
    col = torch.arange(n_a + n_b, device=seed.device, dtype=torch.int64)
    first = col < n_a
    index = torch.where(first, col, col - n_a)
    streams = torch.where(first, stream_a, stream_b)
    u = _to_unit(hash32(seed[:, None], counter[:, None], streams[None, :], index[None, :]))
    return u[:, :n_a], u[:, n_a:]


def _to_unit(h: torch.Tensor) -> torch.Tensor:
    # 23 random bits + 0.5 fit fp32's 24-bit significand exactly: values lie in [2**-24, 1 - 2**-24].
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
