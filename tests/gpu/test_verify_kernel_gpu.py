"""The 2L verifier attention, compiled on the GPU, equals the dense 2L mask (fp32 and bf16)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dense_attention import dense  # noqa: E402

# Triton's default fp32 dot is TF32 (~1e-3 relative error); compare the fp32 case at full precision.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("B,contexts,hq,hkv,d,page", [
    (4, [0, 5, 16, 37, 200], 32, 8, 128, 16),
    (16, [3, 64, 1000], 16, 8, 128, 16),
    (32, [7, 511], 16, 4, 128, 16),
    (1, [1, 2, 30], 8, 2, 64, 16),
])
def test_verify_kernel_gpu(dtype, tol, B, contexts, hq, hkv, d, page):
    from vllm_s2d2.core.masks import verifier_2l, verifier_qq_bias
    from vllm_s2d2.model_executor.attention.verify_kernel import verify_attention

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(B)
    n = len(contexts)
    pages_per_seq = (max(contexts) + 2 * B + page - 1) // page
    num_pages = n * pages_per_seq + 1
    kc = torch.randn(num_pages, page, hkv, d, generator=g, device=dev).to(dtype)
    vc = torch.randn(num_pages, page, hkv, d, generator=g, device=dev).to(dtype)
    perm = torch.randperm(num_pages - 1, generator=g, device=dev)[: n * pages_per_seq] + 1
    bt = perm.view(n, pages_per_seq).to(torch.int32)
    q = torch.randn(n * 2 * B, hq, d, generator=g, device=dev).to(dtype)
    out = torch.zeros_like(q)
    cu = torch.arange(0, (n + 1) * 2 * B, 2 * B, dtype=torch.int32, device=dev)
    seqused = torch.tensor([c + 2 * B for c in contexts], dtype=torch.int32, device=dev)
    scale = d ** -0.5
    verify_attention(q, kc, vc, out, cu, seqused, bt, 2 * B, int(seqused.max()), scale,
                     verifier_qq_bias(B, device=dev))
    for r, c in enumerate(contexts):
        L = c + 2 * B
        slots = torch.arange(L, device=dev)
        pages = bt[r, slots // page].long()
        ref = dense(q[r * 2 * B:(r + 1) * 2 * B], kc[pages, slots % page], vc[pages, slots % page],
                     verifier_2l(c, B, device=dev), scale)
        err = (out[r * 2 * B:(r + 1) * 2 * B].float() - ref).abs().max().item()
        assert err < tol, (r, c, err)
