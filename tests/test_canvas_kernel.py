"""Canvas attention (one kernel, per-request W x W table) against dense masks; the table against the range
semantics of the stock backend and the 2L pattern (see ``model_executor/attention/canvas_kernel.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_s2d2.core.masks import verifier_qq_bias
from vllm_s2d2.engine.attention import kernel_visibility
from vllm_s2d2.model_executor.attention.canvas_kernel import canvas_visibility


def test_table_equals_the_range_semantics_and_the_2l_pattern():
    g = torch.Generator().manual_seed(0)
    B = 4
    W = 2 * B
    pattern = verifier_qq_bias(B) == 0
    specs, ps, qls = [], [], []
    for _ in range(40):
        p = int(torch.randint(0, 30, (1,), generator=g))
        ql = int(torch.randint(1, W + 1, (1,), generator=g))
        r = torch.randint(0, W + 2, (4,), generator=g) + p - 1
        specs.append(r.tolist())
        ps.append(p)
        qls.append(ql)
    spec = torch.tensor(specs)
    p, ql = torch.tensor(ps), torch.tensor(qls)
    verifying = torch.arange(40) % 5 == 0
    vis = canvas_visibility(spec, p, ql, verifying, pattern)
    for r in range(40):
        if verifying[r]:
            assert torch.equal(vis[r], pattern)
            continue
        seq_len = ps[r] + qls[r]
        lo1, hi1, lo2, hi2 = specs[r]
        ranges = [(lo, min(hi, seq_len - 1)) for lo, hi in ((lo1, hi1), (lo2, hi2))]
        dense = kernel_visibility(torch.arange(ps[r], seq_len), seq_len, ranges)  # [ql, seq_len]
        assert dense[:, :ps[r]].all()  # the cache is fully visible to every canvas row
        assert torch.equal(vis[r, :qls[r], :qls[r]], dense[:, ps[r]:]), r


SCRIPT = textwrap.dedent(r'''
    import json, os, sys, torch
    from vllm_s2d2.model_executor.attention.canvas_kernel import canvas_attention
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from dense_attention import dense

    worst = 0.0
    DEV = sys.argv[2] if len(sys.argv) > 2 else "cpu"
    for W, contexts, qlens, hq, hkv, d, page in json.loads(sys.argv[1]):
        g = torch.Generator().manual_seed(W * 100 + len(contexts))
        n = len(contexts)
        pages = (max(contexts) + W + page - 1) // page
        num_blocks = n * pages + 1
        kv = torch.randn(num_blocks, 2, hkv, page, d, generator=g)  # any strided layout
        kc, vc = kv[:, 0].transpose(1, 2), kv[:, 1].transpose(1, 2)  # [blocks, page, hkv, d] views
        bt = (torch.randperm(num_blocks - 1, generator=g)[: n * pages] + 1).view(n, pages).to(torch.int32)
        qsl = torch.tensor([0] + qlens).cumsum(0).to(torch.int32)
        T = int(qsl[-1])
        q = torch.randn(max(T, 1), hq, d, generator=g)
        vis = torch.rand(n, W, W, generator=g) < 0.5
        vis |= torch.eye(W, dtype=torch.bool)
        seq = torch.tensor([c + ql for c, ql in zip(contexts, qlens)], dtype=torch.int32)
        out = torch.zeros_like(q)
        if DEV == "cuda":
            oc = out.cuda()
            canvas_attention(q.cuda(), kc.cuda(), vc.cuda(), oc, vis.cuda(), bt.cuda(), seq.cuda(), qsl.cuda(),
                             d ** -0.5, tile=16)
            out = oc.cpu()
        else:
            canvas_attention(q, kc, vc, out, vis, bt, seq, qsl, d ** -0.5, tile=16)
        for r in range(n):
            ql, c = qlens[r], contexts[r]
            if ql == 0:
                continue
            L = c + ql
            pos = torch.arange(L)
            k = kc[bt[r, pos // page].long(), pos % page]
            v = vc[bt[r, pos // page].long(), pos % page]
            visible = torch.ones(ql, L, dtype=torch.bool)
            visible[:, c:] = vis[r, :ql, :ql]
            want = dense(q[qsl[r]:qsl[r + 1]], k, v, visible, d ** -0.5)
            worst = max(worst, (out[qsl[r]:qsl[r + 1]] - want).abs().max().item())
    print("WORST=" + str(worst))
''')

CASES = [
    [8, [0, 5, 16, 33], [8, 8, 8, 8], 4, 2, 16, 16],  # B = 4, GQA 2, contexts around pages
    [8, [3, 20, 7], [8, 5, 0], 2, 2, 32, 16],  # truncated canvas, a padding request
    [2, [1, 17, 40], [2, 2, 2], 4, 1, 16, 16],  # AR mode (B = 1): W * G = 8 rows padded to 16
    [32, [2, 30], [32, 32], 2, 1, 16, 16],  # B = 16
]


def test_kernel_equals_dense_masks_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORST=")]
    assert line, proc.stderr[-4000:]
    assert float(line[0][6:]) < 1e-4
