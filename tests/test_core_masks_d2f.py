"""Unit tests for the D2F additions to ``vllm_s2d2.core.masks`` (docs/plans/d2f.md §1-§2, hand-drawn matrices)."""

from __future__ import annotations

import pytest
import torch

from vllm_s2d2.core.masks import (block_causal, causal, causal_rows, committed_kv_from_prompt, target_causal_rows,
                                  verifier_2l, window_rows)


def rows(*bits: str) -> torch.Tensor:
    """Rows written as in the ``core.masks`` docstrings ('11 1000 0000'; spaces ignored)."""
    return torch.tensor([[c == "1" for c in b.replace(" ", "")] for b in bits], dtype=torch.bool)


# ---------------------------------------------------------------- committed KV with a prompt segment

def test_committed_kv_from_prompt_block_causal_doc_example():
    # B = 2, P = 3: generated blocks {3, 4}, {5, 6} counted from the prompt end (not from position 0)
    expected = rows("111 0000", "111 0000", "111 0000",
                    "111 1100", "111 1100", "111 1111", "111 1111")
    m = committed_kv_from_prompt(7, 2, 3, token_causal=False)
    assert m.dtype == torch.bool and m.shape == (7, 7)
    assert m.tolist() == expected.tolist()


def test_committed_kv_from_prompt_token_causal():
    # cache_ver: generated rows token-causal; prompt rows stay one bidirectional segment
    expected = rows("111 0000", "111 0000", "111 0000",
                    "111 1000", "111 1100", "111 1110", "111 1111")
    assert committed_kv_from_prompt(7, 2, 3, token_causal=True).tolist() == expected.tolist()


def test_committed_kv_from_prompt_partial_block_and_prompt_only():
    # B = 3, P = 2, n = 6: one whole generated block {2, 3, 4} and the start of the next {5}
    expected = rows("11 0000", "11 0000", "11 1110", "11 1110", "11 1110", "11 1111")
    assert committed_kv_from_prompt(6, 3, 2, token_causal=False).tolist() == expected.tolist()
    # n inside the prompt: all-visible (bidirectional prompt)
    assert bool(committed_kv_from_prompt(4, 2, 5, token_causal=False).all())
    # empty prompt: plain block-causal / causal from position 0
    assert committed_kv_from_prompt(6, 2, 0, False).tolist() == block_causal(6, 2).tolist()
    assert committed_kv_from_prompt(6, 2, 0, True).tolist() == causal(6).tolist()


@pytest.mark.parametrize("n,B,P,tc", [(9, 2, 4, False), (10, 3, 1, False), (8, 4, 3, True), (5, 1, 2, False)])
def test_committed_kv_from_prompt_rule(n, B, P, tc):
    m = committed_kv_from_prompt(n, B, P, tc)
    for q in range(n):
        for k in range(n):
            if q < P:
                want = k < P
            elif k < P:
                want = True
            else:
                want = k <= q if tc else (k - P) // B <= (q - P) // B
            assert bool(m[q, k]) == want, (q, k)


# ---------------------------------------------------------------- window draft rows

def test_window_rows_doc_example():
    assert window_rows(1, 2, 2).tolist() == rows("1 1100", "1 1100", "1 1111", "1 1111").tolist()
    assert window_rows(1, 2, 2, causal_len=2).tolist() == rows("1 1000", "1 1100", "1 1111", "1 1111").tolist()


def test_window_rows_three_blocks():
    # A = 3, B = 2, C = 2
    expected = rows("11 110000", "11 110000", "11 111100", "11 111100", "11 111111", "11 111111")
    m = window_rows(2, 3, 2)
    assert m.dtype == torch.bool and m.shape == (6, 8)
    assert m.tolist() == expected.tolist()
    # no cache, causal over the first block only
    assert window_rows(0, 2, 3, causal_len=3).tolist() == rows(
        "100000", "110000", "111000", "111111", "111111", "111111").tolist()
    # B = 1 is token-causal; A = 1 a bidirectional block
    assert window_rows(0, 4, 1).tolist() == causal(4).tolist()
    assert bool(window_rows(3, 1, 4).all())


# ---------------------------------------------------------------- verifier with a target block size

def test_verifier_2l_tbs2_doc_example():
    expected = rows("1 1100 0000", "1 1100 0000", "1 1111 0000", "1 1111 0000",
                    "1 0000 1100", "1 0000 1100", "1 1100 0011", "1 1100 0011")
    m = verifier_2l(1, 4, tbs=2)
    assert m.dtype == torch.bool and m.shape == (8, 9)
    assert m.tolist() == expected.tolist()


def test_verifier_2l_tbs3_l6_no_cache():
    expected = rows("111000 000000", "111000 000000", "111000 000000",
                    "111111 000000", "111111 000000", "111111 000000",
                    "000000 111000", "000000 111000", "000000 111000",
                    "111000 000111", "111000 000111", "111000 000111")
    assert verifier_2l(0, 6, tbs=3).tolist() == expected.tolist()
    # one target block covering everything: first half bidirectional, mask half sees only itself
    m = verifier_2l(2, 3, tbs=3)
    assert bool(m[:3, :5].all()) and not m[:3, 5:].any()
    assert bool(m[3:, :2].all()) and not m[3:, 2:5].any() and bool(m[3:, 5:].all())


@pytest.mark.parametrize("C,L", [(0, 3), (5, 6), (1, 1), (3, 32), (2, 4)])
def test_verifier_2l_tbs1_is_the_existing_mask(C, L):
    assert torch.equal(verifier_2l(C, L, tbs=1), verifier_2l(C, L))
    # and the existing mask, written by its rule
    for i in range(2 * L):
        for j in range(C + 2 * L):
            if j < C:
                want = True
            elif i < L:
                want = (j - C) < L and (j - C) <= i
            else:
                want = (j - C) < i - L if j < C + L else (j - C - L) == i - L
            assert bool(verifier_2l(C, L, tbs=1)[i, j]) == want


@pytest.mark.parametrize("C,L,tbs", [(0, 4, 2), (3, 8, 4), (1, 6, 2), (2, 8, 8)])
def test_verifier_2l_tbs_rule(C, L, tbs):
    m = verifier_2l(C, L, tbs=tbs)
    for i in range(2 * L):
        for j in range(C + 2 * L):
            if j < C:
                want = True
            elif i < L:
                want = (j - C) < L and (j - C) // tbs <= i // tbs
            elif j < C + L:
                want = (j - C) // tbs < (i - L) // tbs
            else:
                want = (j - C - L) // tbs == (i - L) // tbs
            assert bool(m[i, j]) == want, (i, j)


# ---------------------------------------------------------------- shifted (Dream) verifier rows

def test_target_causal_rows():
    assert target_causal_rows(1, 4, 2).tolist() == rows("1 1100", "1 1100", "1 1111", "1 1111").tolist()
    assert target_causal_rows(2, 3, 3).tolist() == rows("11 111", "11 111", "11 111").tolist()
    for C, L in ((0, 3), (3, 5), (2, 1)):
        assert target_causal_rows(C, L, 1).tolist() == causal_rows(C, L).tolist()


def test_target_causal_rows_match_verifier_first_half():
    # the shifted verifier's rows are the 2L mask's first half
    for C, L, tbs in ((2, 4, 2), (0, 6, 3), (1, 4, 1)):
        assert torch.equal(target_causal_rows(C, L, tbs), verifier_2l(C, L, tbs=tbs)[:L, :C + L])
