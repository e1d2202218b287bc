"""Canvas attention (one kernel, per-slot W x W tables through ``row_slot``) and the backend's row dispatch
(:func:`~vllm_s2d2.model_executor.attention.backend.s2d2_attention`) against dense masks, under Triton's CPU
interpreter; the table against the range semantics of the stock backend and the 2L pattern."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_s2d2.core.masks import canvas_visibility, verifier_qq_bias
from vllm_s2d2.engine.attention import kernel_visibility


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


# Each case: W, contexts (committed length p per row; negative = capture-time seq_lens < query length), query
# lengths, row_slot, number of table slots, Hq, Hkv, D, page size, extra padding tokens after the last row.
SCRIPT = textwrap.dedent(r'''
    import json, os, sys, torch
    from vllm_s2d2.model_executor.attention.canvas_kernel import canvas_attention
    from vllm_s2d2.engine.attention_inputs import CanvasInputs
    try:  # (vLLM importable: the backend's row dispatch too)
        from vllm_s2d2.model_executor.attention.backend import s2d2_attention
    except ImportError:
        s2d2_attention = None
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from dense_attention import dense

    class Meta:  # the fields of TritonAttentionMetadata the dispatch reads
        pass

    DEV = sys.argv[2] if len(sys.argv) > 2 else "cpu"
    worst, problems = 0.0, []
    for case_no, (W, contexts, qlens, row_slot, num_slots, hq, hkv, d, page, pad) in enumerate(
            json.loads(sys.argv[1])):
        g = torch.Generator().manual_seed(1000 + case_no)
        n = len(contexts)
        seqs = [c + ql for c, ql in zip(contexts, qlens)]
        pages = (max(max(seqs), 1) + page - 1) // page
        num_blocks = n * pages + 1
        kv = torch.randn(num_blocks, hkv, page, 2 * d, generator=g)  # vLLM's logical TRITON layout
        kc, vc = kv.transpose(1, 2).split(d, dim=-1)  # [blocks, page, hkv, d] views
        bt = (torch.randperm(num_blocks - 1, generator=g)[: n * pages] + 1).view(n, pages).to(torch.int32)
        qsl = torch.tensor([0] + qlens).cumsum(0).to(torch.int32)
        T = int(qsl[-1]) + pad
        q = torch.randn(max(T, 1), hq, d, generator=g)
        tables = (torch.rand(num_slots, W, W, generator=g) < 0.5) | torch.eye(W, dtype=torch.bool)
        tables = tables.to(torch.int8)
        seq = torch.tensor(seqs, dtype=torch.int32)
        rs = torch.tensor(row_slot, dtype=torch.int32)
        scale = d ** -0.5

        def want_row(r):
            ql, c = qlens[r], contexts[r]
            L = seqs[r]
            pos = torch.arange(L)
            k = kc[bt[r, pos // page].long(), pos % page]
            v = vc[bt[r, pos // page].long(), pos % page]
            j = pos - c
            tab = tables[row_slot[r]].bool()
            visible = (j < 0)[None, :].expand(ql, L).clone()
            inside = (j >= 0) & (j < W)
            visible[:, inside] = tab[:ql][:, j[inside]]
            out = dense(q[qsl[r]:qsl[r + 1]], k, v, visible, scale)
            return torch.where(visible.any(1)[:, None, None], out, torch.zeros_like(out))

        def dev(t):
            return t.cuda() if DEV == "cuda" else t

        # 1. the kernel alone; 2. the dispatch, canvas_only; 3. the dispatch, mixed (stock fills 7).
        for mode in ("kernel", "canvas_only", "mixed") if s2d2_attention else ("kernel",):
            out = dev(torch.full_like(q, -3.0))
            calls = []

            def stock():
                calls.append(1)
                return out.view(out.shape[0], -1).fill_(7.0)

            if mode == "kernel":
                canvas_attention(dev(q), dev(kc), dev(vc), out, dev(tables), dev(rs), dev(bt), dev(seq), dev(qsl),
                                 scale, tile=16)
            else:
                md = Meta()
                md.block_table, md.seq_lens, md.query_start_loc = dev(bt), dev(seq), dev(qsl)
                md.s2d2_canvas = CanvasInputs(dev(tables), dev(rs), mode == "canvas_only")
                flat = out.view(out.shape[0], -1)  # vLLM hands [T, H * D] or [T, H, D]
                res = s2d2_attention(stock, dev(q), dev(kv), flat, md, d, scale)
                assert res.data_ptr() == out.data_ptr()
                if len(calls) != (mode == "mixed"):
                    problems.append([case_no, mode, "stock calls", len(calls)])
            out = out.cpu()
            other = 7.0 if mode == "mixed" else -3.0
            covered = torch.zeros(out.shape[0], dtype=torch.bool)
            for r in range(n):
                rows = slice(int(qsl[r]), int(qsl[r + 1]))
                if row_slot[r] >= 0 and qlens[r] > 0:
                    covered[rows] = True
                    got = out[rows]
                    if not torch.isfinite(got).all():
                        problems.append([case_no, mode, r, "not finite"])
                        continue
                    worst = max(worst, (got - want_row(r)).abs().max().item())
            if not (out[~covered] == other).all():
                problems.append([case_no, mode, "rows outside the canvas rows changed"])
    print("RESULT=" + json.dumps({"worst": worst, "problems": problems, "dispatch": s2d2_attention is not None}))
''')

CASES = [
    # W, contexts, qlens, row_slot, slots, hq, hkv, d, page, pad
    [8, [0, 5, 16, 33], [8, 8, 8, 8], [3, 0, 2, 1], 5, 4, 2, 16, 16, 0],  # B = 4, GQA 2, slots permuted
    [8, [3, 20, 7, 9], [8, 5, 0, 8], [1, 2, 0, 1], 3, 2, 2, 32, 16, 8],  # truncated canvas, a zero-length row,
    #                                                                       slot 1 shared by two rows, padding
    [8, [0, 11, 4, 0], [13, 8, 20, 8], [-1, 0, -1, 1], 2, 2, 1, 16, 16, 0],  # mixed: prefill rows (-1, > W)
    [8, [-7, -7, -7], [8, 8, 8], [2, 2, 2], 3, 4, 2, 16, 16, 0],  # capture: seq_lens = 1, query length W
    [2, [1, 17, 40], [2, 2, 2], [0, 1, -1], 2, 4, 1, 16, 16, 0],  # AR mode (B = 1): W * G = 8 rows padded to 16
    [32, [2, 30], [32, 32], [1, 0], 2, 2, 1, 16, 16, 0],  # B = 16
]


def run_script(device: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES), device], capture_output=True,
                          text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")]
    assert line, proc.stderr[-4000:]
    return json.loads(line[0][len("RESULT="):])


def test_kernel_and_dispatch_equal_dense_masks_under_the_interpreter():
    pytest.importorskip("triton")
    result = run_script("cpu", dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""))
    assert result["problems"] == [] and result["dispatch"]
    assert result["worst"] < 1e-4
