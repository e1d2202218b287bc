"""The 2L verifier attention on vLLM's Triton kernel equals the dense 2L mask (``docs/algorithm.md``).

The kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1) in a subprocess, so this check runs in
CPU CI on the real vLLM 0.26 kernel; the GPU suite repeats it compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import os, sys, json
    import torch
    sys.path.insert(0, os.getcwd())
    import vllm.platforms as P
    from vllm.platforms.cpu import CpuPlatform
    P._current_platform = CpuPlatform()
    from vllm_s2d2.core.masks import verifier_2l, verifier_qq_bias
    from vllm_s2d2.model_executor.attention.verify_kernel import verify_attention

    # Triton's interpreter runs kernel code as Python, where `a >= 0 and a < n` on tensors is not the
    # elementwise AND the compiler makes of it; vLLM's qq-bias tile loader uses that form, so under the
    # interpreter it reads bias values for cache keys.  Swap in the same loader written with `&` (what the
    # compiled kernel computes); the GPU suite runs the compiled kernel unchanged.
    import triton, triton.language as tl
    import vllm.v1.attention.ops.triton_unified_attention as tua

    @triton.jit
    def load_qq_bias_tile(qq_bias_row_ptrs, seq_offset, context_len, qq_bias_stride_0):
        key_rel_pos = seq_offset - context_len
        is_query_key = (key_rel_pos >= 0) & (key_rel_pos < qq_bias_stride_0)
        return tl.load(qq_bias_row_ptrs + key_rel_pos[None, :], mask=is_query_key[None, :], other=0.0)

    tua.load_qq_bias_tile = load_qq_bias_tile

    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from dense_attention import dense

    worst = 0.0
    cases = json.loads(sys.argv[1])
    for B, contexts, hq, hkv, d, page in cases:
        g = torch.Generator().manual_seed(B * 100 + len(contexts))
        n = len(contexts)
        pages_per_seq = (max(contexts) + 2 * B + page - 1) // page
        num_pages = n * pages_per_seq + 1
        kc = torch.randn(num_pages, page, hkv, d, generator=g)
        vc = torch.randn(num_pages, page, hkv, d, generator=g)
        perm = torch.randperm(num_pages - 1, generator=g)[: n * pages_per_seq] + 1  # scattered pages
        bt = perm.view(n, pages_per_seq).to(torch.int32)
        q = torch.randn(n * 2 * B, hq, d, generator=g)
        out = torch.zeros_like(q)
        cu = torch.arange(0, (n + 1) * 2 * B, 2 * B, dtype=torch.int32)
        seqused = torch.tensor([c + 2 * B for c in contexts], dtype=torch.int32)
        scale = d ** -0.5
        verify_attention(q, kc, vc, out, cu, seqused, bt, 2 * B, int(seqused.max()), scale, verifier_qq_bias(B))
        for r, c in enumerate(contexts):
            L = c + 2 * B
            slots = torch.arange(L)
            pages = bt[r, slots // page].long()
            k = kc[pages, slots % page]; v = vc[pages, slots % page]
            visible = verifier_2l(c, B)
            ref = dense(q[r * 2 * B:(r + 1) * 2 * B], k, v, visible, scale)
            worst = max(worst, (out[r * 2 * B:(r + 1) * 2 * B] - ref).abs().max().item())
    print(json.dumps({"max_abs_err": worst}))
''')

CASES = [
    # (B, per-request cache lengths p, query heads, kv heads, head dim, page size)
    (4, [0, 5, 16, 37], 4, 2, 32, 16),
    (8, [3, 64], 8, 2, 64, 16),
    (1, [1, 2, 30], 2, 1, 16, 16),
    (16, [11], 4, 4, 32, 32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-n{len(c[1])}-gqa{c[2] // c[3]}")
def test_verify_kernel_matches_dense_2l_mask(case, tmp_path):
    import json

    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, str(script), json.dumps([case])], capture_output=True, text=True,
                         env=env, timeout=600, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-3000:]
    err = json.loads(out.stdout.strip().splitlines()[-1])["max_abs_err"]
    assert err < 1e-4, err


def test_qq_bias_layout():
    import torch

    from vllm_s2d2.core.masks import verifier_qq_bias

    b = verifier_qq_bias(3)
    visible = (b == 0).int().tolist()
    # first half token-causal, no mask-half keys; mask half: strictly earlier first-half keys + itself
    assert visible == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0],
                       [1, 0, 0, 0, 1, 0],
                       [1, 1, 0, 0, 0, 1]]
    assert torch.isinf(b[b != 0]).all() and (b[b != 0] < 0).all()
