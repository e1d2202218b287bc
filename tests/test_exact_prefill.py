"""Exact prefill: token-causal prefill rows through the canvas kernel in W-token chunks
(:func:`vllm_s2d2.engine.attention.plan_prefill_chunks`, the kernel's ``chunks`` mode).

The property that matters under preemption and prefix caching: a query's output is the same to the last bit
whether its token is attended as part of a commit canvas, of a whole-prompt prefill, or of a prefill that starts
after a prefix-cache hit -- the kernel walks every query's keys in the same position-aligned tiles.  Checked under
Triton's CPU interpreter (the GPU version: tests/gpu/test_canvas_kernel_gpu.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_s2d2.engine.attention import exact_prefill_wanted, plan_prefill_chunks

SCRIPT = textwrap.dedent(r'''
    import json, os, sys, torch
    from types import SimpleNamespace
    from vllm_s2d2.model_executor.attention.canvas_kernel import canvas_attention
    from vllm_s2d2.engine.attention_inputs import CanvasInputs
    from vllm_s2d2.model_executor.attention.backend import s2d2_attention
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from dense_attention import dense

    DEV = sys.argv[1]
    dev = (lambda t: t.cuda()) if DEV == "cuda" else (lambda t: t)
    g = torch.Generator().manual_seed(7)
    B, W, L, hq, hkv, d, page = 4, 8, 45, 4, 2, 16, 16
    pages = (L + page - 1) // page
    num_blocks = 3 * pages + 1
    kv = torch.randn(num_blocks, hkv, page, 2 * d, generator=g)
    kc, vc = kv.transpose(1, 2).split(d, dim=-1)
    bt_row = torch.randperm(num_blocks - 1, generator=g)[:pages] + 1  # one sequence, the same pages in every row
    q_pos = torch.randn(L, hq, d, generator=g)  # the query of each position (its hidden state is fixed)
    causal = torch.ones(1, W, W, dtype=torch.int8).tril()
    scale = d ** -0.5
    problems = []

    def run(rows, chunks):
        """rows: [(committed length p, query length)]; chunks: None (one program per row) or per-row offsets."""
        qsl = torch.tensor([0] + [ql for _, ql in rows]).cumsum(0).to(torch.int32)
        q = torch.cat([q_pos[p:p + ql] for p, ql in rows])
        seq = torch.tensor([p + ql for p, ql in rows], dtype=torch.int32)
        bt = bt_row[None].expand(len(rows), -1).contiguous().to(torch.int32)
        out = dev(torch.full_like(q, -3.0))
        if chunks is None:
            slot = torch.zeros(len(rows), dtype=torch.int32)
            canvas_attention(dev(q), dev(kc), dev(vc), out, dev(causal), dev(slot), dev(bt), dev(seq), dev(qsl),
                             scale)
        else:
            row = torch.tensor([r for r, (_, ql) in enumerate(rows) for _ in range(0, ql, W)], dtype=torch.int32)
            off = torch.tensor([o for _, ql in rows for o in range(0, ql, W)], dtype=torch.int32)
            canvas_attention(dev(q), dev(kc), dev(vc), out, dev(causal), dev(torch.zeros_like(row)), dev(bt),
                             dev(seq), dev(qsl), scale, chunks=(dev(row), dev(off)))
        out = out.cpu()
        return {p + i: out[int(qsl[r]) + i] for r, (p, ql) in enumerate(rows) for i in range(ql)}

    # 1. commit canvases: block b's B tokens over the committed keys (one program per row)
    commit = run([(b, min(B, L - b)) for b in range(0, L, B)], None)
    # 2. a whole-prompt prefill, chunked; 3. a prefill after a 16-token prefix-cache hit, chunked (offsets not
    #    block-aligned relative to 2.); 4. two prefill rows of one step, split at 29
    whole = run([(0, L)], True)
    after_hit = run([(16, L - 16)], True)
    split = run([(0, 29), (29, L - 29)], True)
    pos = torch.arange(L)
    k = kc[bt_row[pos // page], pos % page]
    v = vc[bt_row[pos // page], pos % page]
    want = dense(q_pos, k, v, pos[None, :] <= pos[:, None], scale)
    worst = max((commit[t] - want[t]).abs().max().item() for t in range(L))
    for name, got in (("whole", whole), ("after_hit", after_hit), ("split", split)):
        for t, o in got.items():
            if not torch.equal(o, commit[t]):
                problems.append([name, t, (o - commit[t]).abs().max().item()])

    # 5. the dispatch, mixed step: the stock launch fills 7; canvas row 0 (slot 1), prefill rows 1 and 2 chunked
    rows = [(8, W), (0, 21), (16, 13)]
    qsl = torch.tensor([0] + [ql for _, ql in rows]).cumsum(0).to(torch.int32)
    q = torch.cat([q_pos[p:p + ql] for p, ql in rows])
    tables = torch.stack([torch.eye(W, dtype=torch.int8), causal[0]])
    md = SimpleNamespace(block_table=dev(bt_row[None].expand(3, -1).contiguous().to(torch.int32)),
                         seq_lens=dev(torch.tensor([p + ql for p, ql in rows], dtype=torch.int32)),
                         query_start_loc=dev(qsl))
    row = torch.tensor([1, 1, 1, 2, 2], dtype=torch.int32)
    off = torch.tensor([0, 8, 16, 0, 8], dtype=torch.int32)
    md.s2d2_canvas = CanvasInputs(dev(tables), dev(torch.tensor([1, -1, -1], dtype=torch.int32)), False,
                                  (dev(row), dev(off), dev(torch.zeros_like(row))), dev(causal))
    out = dev(torch.full_like(q, -3.0))
    s2d2_attention(lambda: out.fill_(7.0), dev(q), dev(kv), out, md, d, scale)
    out = out.cpu()
    for r, (p, ql) in enumerate(rows):
        for i in range(ql):
            if not torch.equal(out[int(qsl[r]) + i], commit[p + i]):
                problems.append(["dispatch", r, p + i])
    print("RESULT=" + json.dumps({"worst": worst, "problems": problems[:20], "num_problems": len(problems)}))
''')


def run_script(device: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, device], capture_output=True, text=True, env=env,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")]
    assert line, proc.stderr[-4000:]
    return json.loads(line[0][len("RESULT="):])


def test_a_query_gets_the_same_bits_however_its_row_was_cut():
    pytest.importorskip("triton")
    pytest.importorskip("vllm")
    result = run_script("cpu", dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""))
    assert result["num_problems"] == 0, result["problems"]
    assert result["worst"] < 1e-4  # and the common value is causal attention


def _batch(scheduled, prefilling, cache_ver, active=None, pipelined=False, W=8):
    n = len(scheduled)
    stepper = SimpleNamespace(
        W=W, facts=SimpleNamespace(active=np.ones(n, bool) if active is None else np.array(active),
                                   cache_ver=np.array(cache_ver)),
        layout=SimpleNamespace(rules=SimpleNamespace(pipelined=pipelined)))
    batch = SimpleNamespace(num_reqs=n, idx_mapping_np=np.arange(n), num_scheduled_tokens=np.array(scheduled),
                            is_prefilling_np=np.array(prefilling))
    return stepper, batch


def test_plan_cuts_token_causal_prefill_rows_into_w_token_chunks():
    stepper, batch = _batch([8, 21, 13, 5, 0, 9], [False, True, True, True, True, True],
                            [True, True, True, False, True, True], active=[1, 1, 1, 1, 1, 0])
    row_slot = np.array([0, -1, -1, -1, -1, -1])
    chunk_row, chunk_offset = plan_prefill_chunks(stepper, batch, row_slot)
    # row 0: a canvas row; 3: block-causal (stock launch with ranges); 4: nothing scheduled; 5: not tracked
    assert chunk_row.tolist() == [1, 1, 1, 2, 2]
    assert chunk_offset.tolist() == [0, 8, 16, 0, 8]
    assert chunk_row.dtype == chunk_offset.dtype == np.int32
    stepper, batch = _batch([21], [True], [True], pipelined=True)  # D2F: the prompt is one bidirectional segment
    assert plan_prefill_chunks(stepper, batch, np.array([-1]))[0].size == 0


def test_exact_prefill_follows_batch_invariance_unless_the_env_says_otherwise(monkeypatch):
    monkeypatch.delenv("VLLM_S2D2_EXACT_PREFILL", raising=False)
    assert exact_prefill_wanted(True) and not exact_prefill_wanted(False)
    monkeypatch.setenv("VLLM_S2D2_EXACT_PREFILL", "")
    assert exact_prefill_wanted(True)
    monkeypatch.setenv("VLLM_S2D2_EXACT_PREFILL", "1")
    assert exact_prefill_wanted(False)
    monkeypatch.setenv("VLLM_S2D2_EXACT_PREFILL", "0")
    assert not exact_prefill_wanted(True)
    monkeypatch.setenv("VLLM_S2D2_EXACT_PREFILL", "yes")
    with pytest.raises(ValueError, match="VLLM_S2D2_EXACT_PREFILL"):
        exact_prefill_wanted(True)
