"""Unit tests for ``vllm_s2d2.core.spans`` and ``vllm_s2d2.core.unmasking`` (docs/algorithm.md)."""

from __future__ import annotations

import pytest
import torch

from vllm_s2d2.core.spans import first_mask_span
from vllm_s2d2.core.unmasking import (LOW_CONFIDENCE_DYNAMIC, LOW_CONFIDENCE_STATIC, SEQUENTIAL,
                                      above_threshold_or_top_k, editing_positions, first_k_positions,
                                      remask_commit, threshold_plus_argmax, top_k_positions, transfer_quota)
from vllm_s2d2.s2d2_config import REMASKING


def B(s: str) -> list[bool]:
    """'.MM.' -> [False, True, True, False] ('M' or '1' = True)."""
    return [c in "M1" for c in s]


def bt(*rows: str) -> torch.Tensor:
    return torch.tensor([B(r) for r in rows], dtype=torch.bool)


def lt(x):
    return torch.tensor(x, dtype=torch.long)


def ft(x):
    return torch.tensor(x, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# first_mask_span
# ----------------------------------------------------------------------------------------------------

def test_first_mask_span_cases():
    is_mask = bt("........",  # no mask
                 "MM......",  # mask at start
                 ".MM.MMM.",  # gaps: only the first run
                 "MMMMMMMM",  # full block
                 ".......M",  # mask at the end
                 "M.M.M.M.")  # alternating
    span = first_mask_span(is_mask)
    assert span.start.tolist() == [8, 0, 1, 0, 7, 0]
    assert span.length.tolist() == [0, 2, 2, 8, 1, 1]
    assert span.mask.tolist() == [B("........"), B("MM......"), B(".MM....."), B("MMMMMMMM"),
                                  B(".......M"), B("M.......")]


def test_first_mask_span_region_restriction():
    is_mask = bt("MM.MMMMM",
                 "MMMMMMMM",
                 "MMMM....",
                 ".MMMMMMM")
    region = bt("....1111",   # sub-block 4..7: span = 4..7 (the earlier masks lie outside)
                "..11....",   # sub-block 2..3 inside a full mask run: span cut at the region end
                "....1111",   # no mask inside the region
                "1111....")   # 1..3
    span = first_mask_span(is_mask, region)
    assert span.start.tolist() == [4, 2, 8, 1]
    assert span.length.tolist() == [4, 2, 0, 3]
    assert span.mask.tolist() == [B("....MMMM"), B("..MM...."), B("........"), B(".MMM....")]


def test_first_mask_span_dtypes():
    span = first_mask_span(bt(".MM."))
    assert span.mask.dtype == torch.bool
    assert span.start.dtype == torch.long or span.start.dtype == torch.int64
    assert int(span.length[0]) == 2


# ----------------------------------------------------------------------------------------------------
# transfer_quota
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,s,expected", [(4, 4, [1, 1, 1, 1]), (10, 4, [3, 3, 2, 2]), (16, 16, [1] * 16),
                                          (32, 1, [32]), (7, 3, [3, 2, 2]), (3, 5, [1, 1, 1, 0, 0])])
def test_transfer_quota(b, s, expected):
    q = transfer_quota(b, s)
    assert q == expected
    assert sum(q) == b


@pytest.mark.parametrize("b,s", [(4, 0), (0, 4), (-1, 2), (4, -3)])
def test_transfer_quota_errors(b, s):
    with pytest.raises(ValueError):
        transfer_quota(b, s)


# ----------------------------------------------------------------------------------------------------
# top_k_positions / first_k_positions
# ----------------------------------------------------------------------------------------------------

def test_top_k_positions_ties_lower_position_first_and_per_row_k():
    score = ft([[0.5, 0.9, 0.5, 0.5, 0.1],
                [0.5, 0.9, 0.5, 0.5, 0.1],
                [0.5, 0.9, 0.5, 0.5, 0.1],
                [0.3, 0.3, 0.3, 0.3, 0.3]])
    eligible = bt("11111", "11111", ".1111", "11111")
    k = lt([2, 3, 2, 0])
    out = top_k_positions(score, eligible, k)
    assert out.tolist() == [B("11..."),    # 0.9 (pos 1), then the first 0.5 (pos 0)
                            B("111.."),    # 0.9, 0.5 @0, 0.5 @2
                            B(".11.."),    # pos 0 ineligible: 0.9 @1, 0.5 @2
                            B(".....")]    # k = 0


def test_top_k_positions_never_picks_ineligible_even_if_k_exceeds():
    score = ft([[0.9, 0.1, 0.8, 0.2]])
    out = top_k_positions(score, bt(".1.1"), lt([4]))
    assert out.tolist() == [B(".1.1")]
    out = top_k_positions(score, bt("...."), lt([2]))
    assert out.tolist() == [B("....")]


def test_top_k_positions_all_equal_scores():
    # ties everywhere: strictly left to right
    score = torch.zeros(1, 6)
    for k in range(7):
        out = top_k_positions(score, bt("111111"), lt([k]))
        assert out[0].tolist() == [i < k for i in range(6)]


def test_first_k_positions():
    eligible = bt(".11.1", ".11.1", "1....", ".....")
    out = first_k_positions(eligible, lt([2, 0, 3, 1]))
    assert out.tolist() == [B(".11.."), B("....."), B("1...."), B(".....")]
    out = first_k_positions(eligible[:1], lt([3]))
    assert out.tolist() == [B(".11.1")]


# ----------------------------------------------------------------------------------------------------
# above_threshold_or_top_k (low_confidence_dynamic)
# ----------------------------------------------------------------------------------------------------

def test_above_threshold_strict_and_all_if_enough_else_top_k():
    conf = ft([[0.85, 0.9, 0.86, 0.1, 0.2]] * 4)
    eligible = bt("11111", "11111", "11111", ".1111")
    thr = ft([0.85, 0.85, 0.85, 0.95])
    k = lt([1, 2, 3, 1])
    out = above_threshold_or_top_k(conf, eligible, k, thr)
    # row 0: above 0.85 strictly = {1, 2} (0.85 itself is not above); 2 >= 1 -> commit both
    # row 1: 2 >= 2 -> both
    # row 2: 2 < 3 -> top-3 = 0.9 @1, 0.86 @2, 0.85 @0
    # row 3: none above 0.95 -> top-1 = 0.9 @1
    assert out.tolist() == [B(".11.."), B(".11.."), B("111.."), B(".1...")]


def test_quota_zero_commits_nothing_for_every_rule():
    # k = 0 (a fallback whose quota is already met) commits nothing, even with confident positions
    # (SDAR fallback runs only `if decoded_this_step < min_k`).
    conf = ft([[0.99, 0.95, 0.2, 0.9]] * 3)
    eligible = bt("1111", "1111", "1111")
    rule = lt([SEQUENTIAL, LOW_CONFIDENCE_STATIC, LOW_CONFIDENCE_DYNAMIC])
    out = remask_commit(rule, conf, eligible, lt([0, 0, 0]), ft([0.85] * 3))
    assert not out.any()
    assert not above_threshold_or_top_k(conf[:1], eligible[:1], lt([0]), ft([0.5])).any()


def test_above_threshold_ignores_ineligible_positions():
    conf = ft([[0.99, 0.99, 0.2, 0.3]])
    out = above_threshold_or_top_k(conf, bt("..11"), lt([1]), ft([0.5]))
    assert out.tolist() == [B("...1")]


# ----------------------------------------------------------------------------------------------------
# remask_commit
# ----------------------------------------------------------------------------------------------------

def test_rule_ids_follow_config_order():
    assert (SEQUENTIAL, LOW_CONFIDENCE_STATIC, LOW_CONFIDENCE_DYNAMIC) == (0, 1, 2)
    assert REMASKING == ("sequential", "low_confidence_static", "low_confidence_dynamic")


def test_remask_commit_per_rule_in_one_batch():
    row = [0.3, 0.95, 0.2, 0.9, 0.96, 0.1]
    conf = ft([row] * 6)
    eligible = bt("111111", "111111", "111111", ".11111", ".11111", ".11111")
    rule = lt([SEQUENTIAL, LOW_CONFIDENCE_STATIC, LOW_CONFIDENCE_DYNAMIC] * 2)
    k = lt([2, 2, 1, 1, 2, 4])
    thr = ft([0.85] * 6)
    out = remask_commit(rule, conf, eligible, k, thr)
    assert out.tolist() == [
        B("11...."),  # sequential, k 2: first two eligible
        B(".1..1."),  # static, k 2: 0.96 @4, 0.95 @1
        B(".1.11."),  # dynamic, k 1: all > 0.85 = {1, 3, 4}
        B(".1...."),  # sequential, k 1, eligible from 1
        B(".1..1."),  # static, k 2
        B(".1111."),  # dynamic, k 4: only 3 above -> top-4 = 0.96, 0.95, 0.9, 0.2
    ]


# ----------------------------------------------------------------------------------------------------
# threshold_plus_argmax (Fast-dLLM v2)
# ----------------------------------------------------------------------------------------------------

def test_threshold_plus_argmax():
    conf = ft([[0.5, 0.7, 0.6, 0.2],
               [0.95, 0.5, 0.92, 0.91],
               [0.95, 0.5, 0.92, 0.91],
               [0.99, 0.99, 0.99, 0.99]])
    eligible = bt("1111", "1111", ".1.1", "....")
    thr = ft([0.9, 0.9, 0.9, 0.9])
    out = threshold_plus_argmax(conf, eligible, thr)
    assert out.tolist() == [B(".1.."),   # none above: just the argmax 0.7
                            B("1.11"),   # 0.95, 0.92, 0.91 above (argmax included)
                            B("...1"),   # eligible {1, 3}: 0.91 above, argmax = 3 too
                            B("....")]   # nothing eligible -> nothing
    # strict >: a confidence equal to the threshold only gets in as the argmax
    out = threshold_plus_argmax(ft([[0.9, 0.9, 0.3]]), bt("111"), ft([0.9]))
    assert out.tolist() == [B("1..")]


# ----------------------------------------------------------------------------------------------------
# editing_positions (LLaDA2.1 T2T)
# ----------------------------------------------------------------------------------------------------

def test_editing_positions():
    M = 99
    tokens = lt([[5, 6, M, 7, 8, 9]])
    draft = lt([[5, 1, 2, 3, 4, 9]])
    conf = ft([[0.99, 0.99, 0.99, 0.95, 0.5, 0.99]])
    is_mask = tokens == M
    editable = bt("..1111")  # positions 0, 1 are prompt
    out = editing_positions(draft, conf, tokens, is_mask, editable, ft([0.9]))
    # 0: same token; 1: prompt; 2: mask; 3: changed, 0.95 > 0.9 -> edit; 4: 0.5 too low; 5: same
    assert out.tolist() == [B("...1..")]
    # threshold above 1 disables editing
    assert not editing_positions(draft, conf, tokens, is_mask, editable, ft([2.0])).any()
    # strict >
    out = editing_positions(draft, conf, tokens, is_mask, editable, ft([0.95]))
    assert not out.any()
