"""Unit tests for ``vllm_s2d2.core.masks`` (docs/lifecycle.md draws the masks)."""

from __future__ import annotations

import pytest
import torch

from vllm_s2d2.core.masks import block_causal, causal, causal_rows, committed_kv, draft_rows, verifier_2l


def rows(*bits: str) -> torch.Tensor:
    """Rows written as in the ``core.masks`` docstrings ('11 1000 0000'; spaces ignored)."""
    return torch.tensor([[c == "1" for c in b.replace(" ", "")] for b in bits], dtype=torch.bool)


def test_verifier_2l_matches_spec_table_l4_c2():
    # the 2L mask of docs/lifecycle.md (verify), rows written as cache | first | mask
    expected = rows(
        "11 1000 0000",  # q0
        "11 1100 0000",  # q1
        "11 1110 0000",  # q2
        "11 1111 0000",  # q3
        "11 0000 1000",  # m0
        "11 1000 0100",  # m1
        "11 1100 0010",  # m2
        "11 1110 0001",  # m3
    )
    m = verifier_2l(2, 4)
    assert m.dtype == torch.bool
    assert m.shape == (8, 2 + 8)
    for i in range(8):
        for j in range(10):
            assert bool(m[i, j]) == bool(expected[i, j]), (i, j)


@pytest.mark.parametrize("C,L", [(0, 3), (5, 6), (1, 1), (3, 32)])
def test_verifier_2l_rule_other_sizes(C, L):
    m = verifier_2l(C, L)
    assert m.shape == (2 * L, C + 2 * L)
    for i in range(2 * L):
        for j in range(C + 2 * L):
            if j < C:
                want = True  # every query sees the whole cache
            elif i < L:  # first-half (draft-filled) rows
                k = j - C
                want = k < L and k <= i  # token-causal over the first half, nothing of the mask half
            else:  # mask-half rows
                r = i - L
                if j < C + L:
                    want = (j - C) < r  # strictly earlier drafts (own draft excluded)
                else:
                    want = (j - C - L) == r  # itself only
            assert bool(m[i, j]) == want, (C, L, i, j)


def test_verifier_2l_mask_row_counts():
    # mask-half row i sees C + i + 1 keys; first-half row i sees C + i + 1 keys
    C, L = 3, 5
    m = verifier_2l(C, L)
    assert m[:L].sum(1).tolist() == [C + i + 1 for i in range(L)]
    assert m[L:].sum(1).tolist() == [C + i + 1 for i in range(L)]


def test_causal():
    assert causal(3).tolist() == rows("100", "110", "111").tolist()
    assert causal(1).tolist() == [[True]]


def test_block_causal():
    # n = 6, B = 2: blocks {0,1}, {2,3}, {4,5}; k visible iff k // 2 <= q // 2
    expected = rows("110000", "110000", "111100", "111100", "111111", "111111")
    assert block_causal(6, 2).tolist() == expected.tolist()
    # n not a multiple of B: positions aligned to 0
    assert block_causal(5, 4).tolist() == rows("11110", "11110", "11110", "11110", "11111").tolist()
    # B = 1 is token-causal
    assert block_causal(4, 1).tolist() == causal(4).tolist()


def test_committed_kv():
    assert committed_kv(6, 2, token_causal=False).tolist() == block_causal(6, 2).tolist()
    assert committed_kv(6, 2, token_causal=True).tolist() == causal(6).tolist()
    # cache_ver: token-causal whatever the prompt
    assert committed_kv(8, 4, token_causal=True, prompt_len=6).tolist() == causal(8).tolist()


def test_committed_kv_partial_prompt_block():
    # B = 4, prompt 6, n = 8: the whole prompt is prefilled at once, so prompt rows 4, 5 (partial block 1)
    # see the prompt only; generated rows 6, 7 see blocks 0 and 1 entirely.
    expected = rows("1111 0000", "1111 0000", "1111 0000", "1111 0000",
                    "1111 1100", "1111 1100", "1111 1111", "1111 1111")
    assert committed_kv(8, 4, token_causal=False, prompt_len=6).tolist() == expected.tolist()
    # prompt ending on a block boundary: plain block-causal
    assert committed_kv(8, 4, token_causal=False, prompt_len=4).tolist() == block_causal(8, 4).tolist()
    # prompt covering everything: block-causal among prompt tokens
    assert committed_kv(6, 4, token_causal=False, prompt_len=6).tolist() == block_causal(6, 4).tolist()


def test_draft_rows_without_causal_prefix():
    m = draft_rows(2, 4)
    assert m.shape == (4, 6)
    assert bool(m.all())
    assert bool(draft_rows(0, 3).all())


def test_draft_rows_with_causal_prefix_doc_example():
    # L = 4, C = 2, causal_prefix = 2 (docstring example; draft_ver)
    expected = rows("11 1000", "11 1100", "11 1111", "11 1111")
    assert draft_rows(2, 4, 2).tolist() == expected.tolist()
    assert draft_rows(2, 4, torch.tensor(2)).tolist() == expected.tolist()


@pytest.mark.parametrize("prefix", [0, 1, 3, 4])
def test_draft_rows_prefix_rule(prefix):
    C, L = 3, 4
    m = draft_rows(C, L, prefix)
    for i in range(L):
        for j in range(C + L):
            want = True if (j < C or i >= prefix) else (j - C) <= i
            assert bool(m[i, j]) == want, (prefix, i, j)


def test_draft_rows_prefix_all_rows_equals_causal_rows():
    assert draft_rows(2, 4, 4).tolist() == causal_rows(2, 4).tolist()


def test_causal_rows():
    expected = rows("111 100", "111 110", "111 111")
    assert causal_rows(3, 3).tolist() == expected.tolist()
    assert causal_rows(0, 2).tolist() == causal(2).tolist()


def test_qq_bias_layout():
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
