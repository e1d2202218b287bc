"""Unit tests for ``vllm_s2d2.core.sampling`` and ``vllm_s2d2.core.rng`` (docs/algorithm.md).

Every expected value is derived by hand in the test from small explicit tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_s2d2.core import rng
from vllm_s2d2.core.sampling import categorical, sample, transform_probs


def _t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def _softmax_by_hand(logits):
    """exp(x_i) / sum_j exp(x_j) with Python floats (the hand computation)."""
    e = [math.exp(v) for v in logits]
    s = sum(e)
    return [v / s for v in e]


def _probs_logits(probs):
    """Logits whose softmax is exactly ``probs`` (log p; log 0 -> very negative)."""
    return [math.log(p) if p > 0 else -1e4 for p in probs]


# ----------------------------------------------------------------------------------------------------
# transform_probs
# ----------------------------------------------------------------------------------------------------

def test_greedy_is_plain_softmax_without_filtering_even_with_topk_topp():
    logits = [2.0, 1.0, 0.0, -1.0]
    out = transform_probs(_t([[logits]]), _t([0.0]), top_k=_t([1], torch.long), top_p=_t([0.1]))
    assert out.dtype == torch.float32
    assert out.shape == (1, 1, 4)
    torch.testing.assert_close(out[0, 0], _t(_softmax_by_hand(logits)), rtol=1e-6, atol=1e-7)
    # Greedy also ignores the temperature value itself (anything < 1e-6 is "greedy": untempered softmax).
    out2 = transform_probs(_t([[logits]]), _t([1e-7]))
    torch.testing.assert_close(out2[0, 0], _t(_softmax_by_hand(logits)), rtol=1e-6, atol=1e-7)


def test_temperature_scaling():
    logits = [2.0, 1.0, 0.0, -1.0]
    out = transform_probs(_t([[logits]]), _t([2.0]))
    torch.testing.assert_close(out[0, 0], _t(_softmax_by_hand([1.0, 0.5, 0.0, -0.5])), rtol=1e-6, atol=1e-7)
    out = transform_probs(_t([[logits]]), _t([0.5]))
    torch.testing.assert_close(out[0, 0], _t(_softmax_by_hand([4.0, 2.0, 0.0, -2.0])), rtol=1e-6, atol=1e-7)
    out = transform_probs(_t([[logits]]), _t([1.0]))
    torch.testing.assert_close(out[0, 0], _t(_softmax_by_hand(logits)), rtol=1e-6, atol=1e-7)


def test_top_k_keeps_ties_at_kth_value():
    # Sorted values 3, 2, 2, 1, 0; k = 2 -> the 2nd value is 2, so both 2's survive (3 tokens kept).
    logits = [2.0, 3.0, 0.0, 2.0, 1.0]
    out = transform_probs(_t([[logits]]), _t([1.0]), top_k=_t([2], torch.long))[0, 0]
    e3, e2 = math.exp(3.0), math.exp(2.0)
    s = e3 + 2 * e2
    torch.testing.assert_close(out, _t([e2 / s, e3 / s, 0.0, e2 / s, 0.0]), rtol=1e-6, atol=1e-7)
    # k = 1: only the max
    out = transform_probs(_t([[logits]]), _t([1.0]), top_k=_t([1], torch.long))[0, 0]
    torch.testing.assert_close(out, _t([0.0, 1.0, 0.0, 0.0, 0.0]))
    # k = 0 is "off"; k > V keeps everything
    for k in (0, 99):
        out = transform_probs(_t([[logits]]), _t([1.0]), top_k=_t([k], torch.long))[0, 0]
        torch.testing.assert_close(out, _t(_softmax_by_hand(logits)), rtol=1e-6, atol=1e-7)


def test_top_p_keeps_the_crossing_token():
    # probabilities (scrambled order) 0.15, 0.5, 0.05, 0.3.  Sorted: 0.5, 0.3, 0.15, 0.05;
    # cumulative 0.5, 0.8, 0.95, 1.0.
    probs = [0.15, 0.5, 0.05, 0.3]
    logits = _t([[_probs_logits(probs)]])
    # top_p = 0.7: 0.5 < 0.7, 0.8 crosses -> keep {0.5, 0.3}; renormalised 0.625 / 0.375.
    out = transform_probs(logits, _t([1.0]), top_p=_t([0.7]))[0, 0]
    torch.testing.assert_close(out, _t([0.0, 0.625, 0.0, 0.375]), rtol=1e-5, atol=1e-6)
    # top_p = 0.45: the very first token (0.5) already crosses -> kept alone.
    out = transform_probs(logits, _t([1.0]), top_p=_t([0.45]))[0, 0]
    torch.testing.assert_close(out, _t([0.0, 1.0, 0.0, 0.0]))
    # top_p = 0.9: 0.95 crosses -> keep 0.5, 0.3, 0.15 (sum 0.95).
    out = transform_probs(logits, _t([1.0]), top_p=_t([0.9]))[0, 0]
    torch.testing.assert_close(out, _t([0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95]), rtol=1e-5, atol=1e-6)


def test_top_p_applies_to_top_k_filtered_distribution():
    # p = 0.4, 0.3, 0.2, 0.1; top-k 2 -> 4/7, 3/7; then top-p 0.5: 4/7 = 0.571 already crosses -> only token 0.
    # (Top-p alone at 0.5 would keep two tokens: cumulative 0.4, 0.7.)
    logits = _t([[_probs_logits([0.4, 0.3, 0.2, 0.1])]])
    both = transform_probs(logits, _t([1.0]), top_k=_t([2], torch.long), top_p=_t([0.5]))[0, 0]
    torch.testing.assert_close(both, _t([1.0, 0.0, 0.0, 0.0]))
    p_only = transform_probs(logits, _t([1.0]), top_p=_t([0.5]))[0, 0]
    torch.testing.assert_close(p_only, _t([4 / 7, 3 / 7, 0.0, 0.0]), rtol=1e-5, atol=1e-6)


def test_top_p_one_removes_nothing():
    logits = [10.0, 0.0, -10.0, -20.0]
    # Row 1 uses a real top-p so the filter path runs; row 0 has top_p = 1 and must be untouched.
    out = transform_probs(_t([[logits], [logits]]), _t([1.0, 1.0]), top_p=_t([1.0, 0.5]))
    torch.testing.assert_close(out[0, 0], _t(_softmax_by_hand(logits)), rtol=1e-5, atol=1e-12)
    assert bool((out[0, 0] > 0).all())
    torch.testing.assert_close(out[1, 0], _t([1.0, 0.0, 0.0, 0.0]))


def test_per_request_parameters_in_one_batch():
    logits = [3.0, 2.0, 2.0, 1.0]
    batch = _t([[logits], [logits], [logits], [logits]])
    temperature = _t([0.0, 1.0, 0.5, 2.0])
    top_k = _t([1, 2, 0, 0], torch.long)  # row 0 greedy: ignored; row 1: keeps 3, 2, 2 (tie)
    top_p = _t([0.1, 1.0, 1.0, 0.2])  # row 3: tempered probs sorted ... first token crosses 0.2
    out = transform_probs(batch, temperature, top_k, top_p)
    torch.testing.assert_close(out[0, 0], _t(_softmax_by_hand(logits)), rtol=1e-6, atol=1e-7)
    e3, e2 = math.exp(3.0), math.exp(2.0)
    s = e3 + 2 * e2
    torch.testing.assert_close(out[1, 0], _t([e3 / s, e2 / s, e2 / s, 0.0]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[2, 0], _t(_softmax_by_hand([6.0, 4.0, 4.0, 2.0])), rtol=1e-6, atol=1e-7)
    # row 3: T = 2 -> logits 1.5, 1, 1, 0.5; top prob = e^1.5 / (...) = 0.3837 > 0.2 -> kept alone.
    torch.testing.assert_close(out[3, 0], _t([1.0, 0.0, 0.0, 0.0]))


def test_transform_probs_many_positions_and_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    out = transform_probs(logits, _t([0.0, 0.7, 1.3]), _t([0, 3, 0], torch.long), _t([1.0, 0.9, 0.6]))
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 5))
    # row 1 has top-k 3: at most 3 (+ ties) non-zero tokens per position
    assert int((out[1] > 0).sum(-1).max()) <= 3


# ----------------------------------------------------------------------------------------------------
# categorical / sample
# ----------------------------------------------------------------------------------------------------

def test_categorical_inverse_cdf_by_hand():
    probs = _t([0.1, 0.0, 0.9])  # cdf 0.1, 0.1, 1.0
    cases = {0.05: 0, 0.0: 0, 0.0999: 0, 0.1: 2, 0.5: 2, 0.99: 2}
    for u, expected in cases.items():
        assert int(categorical(probs, _t(u))) == expected, u


def test_categorical_unnormalised_probs_scale_by_total_mass():
    # residual-like weights 0, 0.2, 0.05 (mass 0.25): normalised 0, 0.8, 0.2
    w = _t([0.0, 0.2, 0.05])
    assert int(categorical(w, _t(0.7))) == 1  # 0.7 * 0.25 = 0.175 < 0.2
    assert int(categorical(w, _t(0.85))) == 2  # 0.2125 > 0.2
    assert int(categorical(w, _t(1e-6))) == 1  # token 0 has weight 0


def test_categorical_never_draws_zero_probability_tokens():
    probs = _t([0.0, 0.3, 0.0, 0.7, 0.0])
    u = torch.cat([torch.linspace(0.0, 1.0, 10001),
                   _t([1 - 2.0 ** -24, 1 - 2.0 ** -23, 0.99999994, 1.0, 2.0 ** -24, 0.3, 0.29999998])])
    idx = categorical(probs.expand(len(u), 5), u)
    assert set(idx.tolist()) <= {1, 3}
    assert int((idx == 1).sum()) > 0 and int((idx == 3).sum()) > 0
    # trailing zero-probability tokens are never reached even at u -> 1
    probs2 = _t([0.5, 0.5, 0.0, 0.0])
    for u in (1.0, 1 - 2.0 ** -24, 0.9999999):
        assert int(categorical(probs2, _t(u))) == 1


def test_categorical_batched_shapes():
    probs = _t([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]])
    u = _t([[0.6, 0.1], [0.9, 0.45]])
    torch.testing.assert_close(categorical(probs, u), _t([[1, 2], [0, 1]], torch.long))


def test_sample_greedy_argmax_and_p0():
    probs = _t([[[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]],
                [[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]])
    u = _t([[0.1, 0.95], [0.1, 0.95]])
    tokens, p0 = sample(probs, _t([True, False], torch.bool), u)
    # greedy row: argmax whatever u is
    assert tokens[0].tolist() == [1, 0]
    torch.testing.assert_close(p0[0], _t([0.5, 0.6]))
    # sampled row: inverse CDF. pos 0: u = 0.1 < 0.2 -> 0; pos 1: cdf 0.6, 0.7, 1.0, u = 0.95 -> 2
    assert tokens[1].tolist() == [0, 2]
    torch.testing.assert_close(p0[1], _t([0.2, 0.3]))


# ----------------------------------------------------------------------------------------------------
# rng
# ----------------------------------------------------------------------------------------------------

def _u(seed, counter, stream, n):
    return rng.uniform(_t([seed], torch.long), _t([counter], torch.long), stream, n)[0]


def test_rng_deterministic():
    a = _u(1234, 7, rng.STREAM_DRAFT, 256)
    b = _u(1234, 7, rng.STREAM_DRAFT, 256)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and a.shape == (256,)
    # prefix property: the i-th value depends on i only, not on n
    assert torch.equal(_u(1234, 7, rng.STREAM_DRAFT, 10), a[:10])


@pytest.mark.parametrize("other", [(1235, 7, rng.STREAM_DRAFT), (1234, 8, rng.STREAM_DRAFT),
                                   (1234, 7, rng.STREAM_ACCEPT), (1234, 7, rng.STREAM_RESAMPLE),
                                   (1234 + 2 ** 32, 7, rng.STREAM_DRAFT), (1234, 7 + 2 ** 32, rng.STREAM_DRAFT)])
def test_rng_different_seed_counter_stream_differ(other):
    a = _u(1234, 7, rng.STREAM_DRAFT, 256)
    b = _u(*other, 256)
    # independent streams: essentially no coincident values (expected ~256 / 2**24)
    assert int((a == b).sum()) <= 1
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.3


def test_rng_range_open_unit_interval_on_many_draws():
    seeds = torch.arange(100, dtype=torch.long) * 7919 + 3
    u = rng.uniform(seeds, torch.arange(100, dtype=torch.long), rng.STREAM_ACCEPT, 1000)
    assert bool((u > 0).all()) and bool((u < 1).all())


# Regression: uniform() used ((h >> 8) + 0.5) / 2**24, which rounds to exactly 1.0 in fp32 when
# h >> 8 == 2**24 - 1 (these seeds hit it at index 0).  Found by this suite; fixed with 23-bit values.
def test_rng_never_returns_one():
    assert float(_u(16075501, 0, rng.STREAM_DRAFT, 1)[0]) < 1.0
    assert float(_u(16586392, 0, rng.STREAM_ACCEPT, 1)[0]) < 1.0


def test_rng_batch_independence():
    seeds = _t([5, 2 ** 40 + 11, 0, 123456789, -3], torch.long)
    counters = _t([0, 3, 2 ** 33 + 1, 9, 4], torch.long)
    for stream in (rng.STREAM_DRAFT, rng.STREAM_ACCEPT, rng.STREAM_RESAMPLE):
        batched = rng.uniform(seeds, counters, stream, 17)
        assert batched.shape == (5, 17)
        for r in range(5):
            single = rng.uniform(seeds[r:r + 1], counters[r:r + 1], stream, 17)
            assert torch.equal(batched[r], single[0])
        # reordering the batch permutes the rows only
        perm = torch.tensor([4, 2, 0, 3, 1])
        assert torch.equal(rng.uniform(seeds[perm], counters[perm], stream, 17), batched[perm])


def test_rng_rough_uniformity():
    # 100 rows x 1000 = 100k draws.  Tolerances: mean 0.5 +- 0.005 (sd of mean 0.00091, > 5 sd);
    # variance 1/12 +- 0.002 (sd ~ 0.00024, > 8 sd); each decile 0.1 +- 0.005 (sd 0.00095, > 5 sd).
    seeds = torch.arange(100, dtype=torch.long) + 1000
    u = rng.uniform(seeds, torch.zeros(100, dtype=torch.long), rng.STREAM_DRAFT, 1000).flatten().double()
    assert u.numel() == 100_000
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    frac = torch.histc(u, bins=10, min=0.0, max=1.0) / u.numel()
    assert float((frac - 0.1).abs().max()) < 0.005
    # consecutive counters of one request are not correlated either
    u2 = rng.uniform(seeds, torch.ones(100, dtype=torch.long), rng.STREAM_DRAFT, 1000).flatten().double()
    assert abs(float(torch.corrcoef(torch.stack([u, u2]))[0, 1])) < 0.02


def test_rng_int64_values_identical_across_calls_and_no_overflow():
    # Large and negative int64 seeds/counters are accepted and give the same values on every call.
    seeds = _t([2 ** 62 - 1, -(2 ** 62), 2 ** 32, 2 ** 32 + 1, 0], torch.long)
    counters = _t([2 ** 40, 1, 0, 0, 2 ** 62], torch.long)
    a = rng.uniform(seeds, counters, rng.STREAM_ACCEPT, 33)
    b = rng.uniform(seeds.clone(), counters.clone(), rng.STREAM_ACCEPT, 33)
    assert torch.equal(a, b)
    assert bool((a > 0).all()) and bool((a < 1).all())
    # the high 32 bits of the seed matter (2**32 vs 2**32 + 1 vs 0 all differ)
    assert not torch.equal(a[2], a[3]) and not torch.equal(a[2], a[4])
    # hash values stay within 32 bits (no int64 overflow in the 32-bit emulation)
    h = rng.hash32(seeds[:, None], counters[:, None], 3, torch.arange(33)[None, :])
    assert h.dtype == torch.int64
    assert bool((h >= 0).all()) and bool((h < 2 ** 32).all())


def test_rng_mul32_and_fmix32_match_python_integers():
    # (x * c) mod 2**32 computed with Python big integers, for edge inputs.
    xs = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 0xDEADBEEF]
    for c in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B1):
        got = rng._mul32(_t(xs, torch.long), c).tolist()
        assert got == [(x * c) & 0xFFFFFFFF for x in xs]

    def fmix(h):  # MurmurHash3 fmix32 with Python ints
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    assert rng._fmix32(_t(xs, torch.long)).tolist() == [fmix(x) for x in xs]
    assert fmix(0) == 0  # sanity of the oracle


@pytest.mark.parametrize("n_a, n_b", [(4, 1), (1, 1), (32, 5)])
def test_uniform_pair_equals_two_uniform_calls(n_a, n_b):
    """One hash pass over both streams gives exactly the numbers of the two separate draws (the verify step's
    acceptance and resampling uniforms), for seeds and counters above 2**32 too."""
    seed = torch.tensor([0, 1234, 2 ** 40 + 5, 7], dtype=torch.long)
    counter = torch.tensor([0, 3, 9, 2 ** 33 + 1], dtype=torch.long)
    a, b = rng.uniform_pair(seed, counter, rng.STREAM_ACCEPT, n_a, rng.STREAM_RESAMPLE, n_b)
    assert a.shape == (4, n_a) and b.shape == (4, n_b)
    assert torch.equal(a, rng.uniform(seed, counter, rng.STREAM_ACCEPT, n_a))
    assert torch.equal(b, rng.uniform(seed, counter, rng.STREAM_RESAMPLE, n_b))
