"""Fixed-order vocabulary reductions (:mod:`vllm_s2d2.core.reductions`, :mod:`vllm_s2d2.kernels.row_reductions`).

The property that matters for the batch-invariant soak: a request's step math -- its probabilities under the
sampling transform (top-k / top-p included), entropy, Renyi sum, expected accepted length (a product scan over
the block), drawn tokens, acceptance and the resampled
correction -- has the same bits whether the request is computed alone or among other rows.  The script below
runs the core functions on a batch and on each request alone and compares bit for bit, and compares the kernels
with the plain torch operations.  Under Triton's CPU interpreter here; compiled on CUDA in
tests/gpu/test_canvas_kernel_gpu.py, which also records how many rows the plain torch path changes there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vllm_s2d2.core import reductions

SCRIPT = textwrap.dedent(r'''
    import json, os, sys, torch
    from vllm_s2d2.core import reductions
    from vllm_s2d2.core.sampling import transform_probs, sample, categorical
    from vllm_s2d2.core.estimators import draft_stats, expected_accepted
    from vllm_s2d2.core.acceptance import accept_span

    DEV, V = sys.argv[1], int(sys.argv[2])
    g = torch.Generator().manual_seed(3)
    R, B, EXTRA = 6, 4, 29  # EXTRA other requests make the batch larger than R
    n = R + EXTRA
    dev = lambda t: t.to(DEV)
    logits = dev(torch.randn(n, B, V, generator=g) * 3)
    logits[0, :, 7] += 30.0  # a peaked row
    verifier = dev(torch.randn(n, B, V, generator=g) * 3)
    temperature = dev(torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 0.9] * 6)[:n])
    top_k = dev(torch.tensor([0, 50, 0, 200, 0, 0] * 6)[:n])
    top_p = dev(torch.tensor([1.0, 0.9, 0.95, 1.0, 1.0, 0.8] * 6)[:n])
    u = dev(torch.rand(n, B, generator=g))
    u_res = dev(torch.rand(n, generator=g))
    greedy = temperature < 1e-6

    def step(sl):
        p = transform_probs(logits[sl], temperature[sl], top_k[sl], top_p[sl], exclude_id=5)
        q = transform_probs(verifier[sl], temperature[sl], top_k[sl], top_p[sl], exclude_id=5)
        stats = draft_stats(p)
        tokens, p0 = sample(p, greedy[sl], u[sl])
        r = p.shape[0]
        ones = torch.ones(r, device=p.device)
        verdict = accept_span(tokens, p, q, torch.ones(r, B, dtype=torch.bool, device=p.device), u[sl], u_res[sl],
                              greedy=greedy[sl], ratio_tempering=ones, allow_resample=torch.ones_like(greedy[sl]),
                              ratio_threshold=-ones, keep_rejected_draft=True)
        k_hat = expected_accepted(p0, torch.ones(r, B, dtype=torch.bool, device=p.device))
        return {"p": p, "q": q, "entropy": stats.entropy, "margin": stats.margin, "renyi2": stats.renyi2, "k_hat": k_hat,
                "tokens": tokens, "p0": p0, "commit": verdict.commit, "verdict_tokens": verdict.tokens,
                "ratio": verdict.ratio}

    def rows_differing(batch, alone_fn):
        bad = []
        for r in range(R):
            alone = alone_fn(r)
            for k, v in batch.items():
                if not torch.equal(v[r:r + 1], alone[k]):
                    bad.append([r, k])
        return bad

    os.environ[reductions.FIXED_ORDER_ENV] = "1"
    fixed = step(slice(0, n))
    fixed_small = step(slice(0, R))
    problems = rows_differing(fixed, lambda r: step(slice(r, r + 1)))
    problems += [["small batch", k] for k in fixed if not torch.equal(fixed[k][:R], fixed_small[k])]
    os.environ[reductions.FIXED_ORDER_ENV] = "0"
    plain = step(slice(0, n))
    torch_variant = rows_differing(plain, lambda r: step(slice(r, r + 1)))
    # a top-p cut can move by one token when the prefix sum rounds the other way; compare the positions whose
    # support (the tokens with probability > 0) is the same, and count the others
    same_support = {k: ((fixed[k] > 0) == (plain[k] > 0)).all(-1) for k in ("p", "q")}
    moved_cuts = sum(int((~m).sum()) for m in same_support.values())
    worst = max([float((fixed[k] - plain[k])[same_support[k]].abs().max()) for k in ("p", "q")]
                + [float((fixed[k] - plain[k]).abs().max()) for k in ("entropy", "renyi2", "p0", "k_hat")])
    same_tokens = bool(torch.equal(fixed["tokens"], plain["tokens"]) and torch.equal(fixed["commit"], plain["commit"]))
    # the kernels alone: prefix sums stay monotone for non-negative rows, a row of -inf but one entry is one-hot
    x = dev(torch.full((3, V), float("-inf")))
    x[:, 11] = 0.0
    os.environ[reductions.FIXED_ORDER_ENV] = "1"
    onehot = bool(torch.equal(reductions.softmax(x)[:, 11], dev(torch.ones(3))))
    c = reductions.cumsum(fixed["p"])
    monotone = bool((c[..., 1:] >= c[..., :-1]).all())
    flat_at_zeros = bool((c[..., 1:] == c[..., :-1])[fixed["p"][..., 1:] == 0].all())
    used_kernels = reductions._use_kernels(x)
    print("RESULT=" + json.dumps({"problems": problems, "moved_cuts": moved_cuts, "torch_variant": torch_variant, "worst": worst,
                                  "same_tokens": same_tokens, "onehot": onehot, "monotone": monotone, "flat_at_zeros": flat_at_zeros,
                                  "used_kernels": used_kernels}))
''')


def run_script(device: str, env: dict, vocab: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, device, str(vocab)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")]
    assert line, proc.stderr[-4000:]
    return json.loads(line[0][len("RESULT="):])


def test_a_request_gets_the_same_step_bits_alone_and_in_a_batch_under_the_interpreter():
    pytest.importorskip("triton")
    result = run_script("cpu", dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""), vocab=5003)
    assert result["used_kernels"]
    assert result["problems"] == []
    assert result["worst"] < 1e-5  # the same numbers as the torch operations, up to summation order
    assert result["moved_cuts"] <= 2  # of 140 positions
    assert result["same_tokens"] and result["onehot"] and result["monotone"] and result["flat_at_zeros"]


def test_the_switch_follows_batch_invariant_mode(monkeypatch):
    monkeypatch.delenv(reductions.FIXED_ORDER_ENV, raising=False)
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    assert not reductions.fixed_order_wanted()
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    assert reductions.fixed_order_wanted()
    monkeypatch.setenv(reductions.FIXED_ORDER_ENV, "0")
    assert not reductions.fixed_order_wanted()
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    monkeypatch.setenv(reductions.FIXED_ORDER_ENV, "1")
    assert reductions.fixed_order_wanted()
    monkeypatch.delenv(reductions.FIXED_ORDER_ENV)
    for value, on in (("2", True), ("0", False), ("", False), ("true", False)):  # as vLLM parses it: bool(int(v))
        monkeypatch.setenv("VLLM_BATCH_INVARIANT", value)
        assert reductions.fixed_order_wanted() is on, value
    monkeypatch.setenv(reductions.FIXED_ORDER_ENV, "yes")
    with pytest.raises(ValueError, match=reductions.FIXED_ORDER_ENV):
        reductions.fixed_order_wanted()


def test_cpu_tensors_take_the_torch_path_without_the_interpreter(monkeypatch):
    """(The fixed-order prefix sum needs no kernel: integers, on every device; the next test.)"""
    import torch

    monkeypatch.setenv(reductions.FIXED_ORDER_ENV, "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 40)
    assert not reductions._use_kernels(x)
    assert torch.equal(reductions.softmax(x), torch.softmax(x, -1))
    assert torch.equal(reductions.row_sum(x), x.sum(-1))
    p = torch.softmax(x, -1)
    entropy, collision = reductions.entropy_and_collision(p)
    assert torch.equal(entropy, torch.special.entr(p).sum(-1)) and torch.equal(collision, torch.linalg.vecdot(p, p))


def test_fixed_order_cumsum_is_exact_in_integers(monkeypatch):
    import torch

    monkeypatch.setenv(reductions.FIXED_ORDER_ENV, "1")
    p = torch.softmax(torch.randn(3, 5000) * 5, -1)
    p[:, 100:200] = 0.0
    c = reductions.cumsum(p)
    assert torch.allclose(c, torch.cumsum(p, -1), atol=1e-6, rtol=0)
    assert bool((c[:, 1:] >= c[:, :-1]).all()) and bool((c[:, 100:200] == c[:, 99:100]).all())
    assert torch.equal(reductions.cumsum(p[1:2]), c[1:2])
    # the same bits however the row is cut: integer sums do not depend on their order
    assert torch.equal(reductions.cumsum(p.flip(-1)).flip(-1)[:, 0], c[:, -1])


def test_fixed_order_cumprod_is_the_product_scan(monkeypatch):
    import torch

    x = torch.rand(5, 7) * 1.5
    monkeypatch.setenv(reductions.FIXED_ORDER_ENV, "0")
    assert torch.equal(reductions.cumprod(x), torch.cumprod(x, -1))
    monkeypatch.setenv(reductions.FIXED_ORDER_ENV, "1")
    scan = reductions.cumprod(x)
    assert torch.allclose(scan, torch.cumprod(x, -1), rtol=1e-6, atol=0)
    assert torch.equal(reductions.cumprod(x[2:3]), scan[2:3])
    assert torch.equal(reductions.cumprod(x[:, :1]), x[:, :1])
