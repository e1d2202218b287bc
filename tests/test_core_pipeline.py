"""Unit tests for ``vllm_s2d2.core.pipeline`` (the D2F window) and the D2F knobs of ``core.acceptance.accept_span``
(docs/plans/d2f.md §1-§2): hand-computed cases per function, batched == per-row, one fullgraph trace, no host
reads, and a random walk against a slow per-block loop."""

from __future__ import annotations

import random

import pytest
import torch

from sync_guard import no_host_reads
from vllm_s2d2.core import pipeline as pl
from vllm_s2d2.core.acceptance import accept_span
from vllm_s2d2.core.pipeline import ACTIVE, EMPTY, TO_CACHE, Window

M = 99  # mask id
E, A_, C = EMPTY, ACTIVE, TO_CACHE


def blk(s: str) -> list[int]:
    """A block written as '12M4' (digits = tokens, M = mask)."""
    return [M if c == "M" else int(c) for c in s]


def win(blocks, status, full=None, opened=None, stopped=None) -> Window:
    """A window from rows of block strings; EMPTY slots may be written '' (all masks)."""
    R, A = len(status), len(status[0])
    B = max(len(b) for row in blocks for b in row)
    tokens = torch.tensor([[blk(b) if b else [M] * B for b in row] for row in blocks], dtype=torch.long)
    full = torch.zeros(R, A, dtype=torch.bool) if full is None else torch.tensor(full, dtype=torch.bool)
    opened = torch.zeros(R, dtype=torch.long) if opened is None else torch.tensor(opened, dtype=torch.long)
    stopped = torch.zeros(R, dtype=torch.bool) if stopped is None else torch.tensor(stopped, dtype=torch.bool)
    return Window(tokens, torch.tensor(status, dtype=torch.long), full, opened, stopped)


def ft(x):
    return torch.tensor(x, dtype=torch.float32)


def lt(x):
    return torch.tensor(x, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- add_block

def test_new_window():
    w = pl.new_window(2, 3, 4, M)
    assert w.tokens.shape == (2, 3, 4) and w.tokens.dtype == torch.long and bool((w.tokens == M).all())
    assert w.status.dtype == torch.long and w.status.tolist() == [[E] * 3] * 2
    assert w.full.dtype == torch.bool and not w.full.any()
    assert w.blocks_opened.tolist() == [0, 0] and w.stopped.tolist() == [False, False]


def test_add_block_cases():
    w = win([["", "", ""],           # 0: empty window: the first block is added at once
             ["12MM", "", ""],       # 1: progress 2/4 = 0.5 >= 0.5 -> slot 1
             ["12MM", "", ""],       # 2: 0.5 < 0.75 -> nothing
             ["1234", "", ""],       # 3: stopped -> nothing
             ["1234", "", ""],       # 4: max_blocks reached -> nothing
             ["1234", "1234", "1MMM"],  # 5: window full -> nothing
             ["1234", "1234", ""],   # 6: TO_CACHE then a finished ACTIVE block -> slot 2
             ["", "", ""]],          # 7: blocks already shifted out, window empty -> slot 0
            [[E, E, E], [A_, E, E], [A_, E, E], [A_, E, E], [A_, E, E], [C, A_, A_], [C, A_, E], [E, E, E]],
            full=[[False] * 3, [True, False, False], [True, False, False], [True, False, False],
                  [True, False, False], [False, True, True], [False, True, True], [False] * 3],
            opened=[0, 1, 1, 1, 3, 5, 5, 5], stopped=[False, False, False, True, False, False, False, False])
    thr = ft([0.5, 0.5, 0.75, 0.1, 0.1, 0.1, 1.0, 1.0])
    out = pl.add_block(w, thr, lt([8, 8, 8, 8, 3, 8, 8, 8]), M)
    assert out.status.tolist() == [[A_, E, E], [A_, A_, E], [A_, E, E], [A_, E, E], [A_, E, E], [C, A_, A_],
                                   [C, A_, A_], [A_, E, E]]
    assert out.blocks_opened.tolist() == [1, 2, 1, 1, 3, 5, 6, 6]
    # the new block is all masks and not fully activated; other slots untouched
    assert out.full.tolist()[1] == [True, False, False] and out.full.tolist()[6] == [False, True, False]
    assert bool((out.tokens[1, 1] == M).all()) and out.tokens[1, 0].tolist() == blk("12MM")
    assert torch.equal(out.stopped, w.stopped)


def test_add_block_at_most_one_per_call_and_float_threshold():
    w = pl.new_window(1, 4, 3, M)
    w = pl.add_block(w, ft([0.0]), lt([10]), M)
    assert w.status.tolist() == [[A_, E, E, E]]
    # threshold 0: the next call adds one more even though the last block has no token
    w = pl.add_block(w, ft([0.0]), lt([10]), M)
    assert w.status.tolist() == [[A_, A_, E, E]] and w.blocks_opened.tolist() == [2]
    # 1/3 decoded against threshold 1/3 (both float32): added
    w = w._replace(tokens=w.tokens.clone())
    w.tokens[0, 1, 0] = 5
    assert pl.add_block(w, ft([1 / 3]), lt([10]), M).status.tolist() == [[A_, A_, A_, E]]
    assert pl.add_block(w, ft([0.34]), lt([10]), M).status.tolist() == [[A_, A_, E, E]]


# ---------------------------------------------------------------------------------------------- activate

def test_activate_cases():
    w = win([["123M", "1MMM", "MMMM"],   # ratios 0.75, 0.25, 0
             ["1234", "12MM", "MMMM"],   # TO_CACHE predecessor: ratio 1
             ["1MMM", "MMMM", ""]],
            [[A_, A_, A_], [C, A_, A_], [A_, A_, E]],
            full=[[False, False, True], [False, False, False], [False, False, False]])
    out = pl.activate(w, ft([0.75, 0.75, 0.0]), M)
    assert out.full.tolist() == [[True, True, True],     # slot 0 at once; slot 1: 0.75 >= 0.75; slot 2 sticky
                                 [False, True, False],   # TO_CACHE is not activated; 0.5 < 0.75
                                 [True, True, False]]    # threshold 0: every ACTIVE block; EMPTY never
    assert torch.equal(out.tokens, w.tokens) and torch.equal(out.status, w.status)


# ---------------------------------------------------------------------------------------------- baseline_commit

def test_baseline_commit_cases():
    w = win([["1MMM", "MMMM", "MMMM"],
             ["MMMM", "MMMM", "1234"]],
            [[A_, A_, A_], [A_, A_, C]],
            full=[[True, True, False], [False, False, False]])
    p0 = ft([[[0.99, 0.5, 0.95, 0.3], [0.5, 0.6, 0.2, 0.1], [0.95, 0.91, 0.5, 0.2]],
             [[0.5, 0.9, 0.3, 0.2], [0.2, 0.3, 0.95, 0.1], [0.99] * 4]])
    got = pl.baseline_commit(w, p0, ft([0.9, 0.9]), M)
    assert got.dtype == torch.bool and got.shape == (2, 3, 4)
    assert got.tolist() == [
        [[False, False, True, False],   # full: > 0.9 (pos 2; pos 0 is filled)
         [False, True, False, False],   # full, none above: the top-1
         [True, True, False, False]],   # semi: > 0.9 only
        [[False, False, False, False],  # semi: 0.9 is not > 0.9 -> nothing
         [False, False, True, False],
         [False, False, False, False]]]  # TO_CACHE: nothing


def test_baseline_commit_empty_slots_and_no_masks():
    w = win([["1234", ""]], [[A_, E]], full=[[True, False]])
    assert not pl.baseline_commit(w, torch.ones(1, 2, 4), ft([0.5]), M).any()


# ---------------------------------------------------------------------------------------------- fallback_commit

def test_fallback_commit_cases():
    w = win([["MMMM", "MMMM", "MMMM"],
             ["1MMM", "12MM", "1MMM"]],
            [[A_, A_, A_], [A_, A_, A_]],
            full=[[True, True, False], [True, True, True]])
    p0 = ft([[[0.99, 0.95, 0.92, 0.1], [0.9, 0.5, 0.3, 0.8], [0.99] * 4],
             [[0.0, 0.1, 0.2, 0.3], [0.0, 0.0, 0.95, 0.96], [0.0, 0.97, 0.1, 0.2]]])
    committed = torch.zeros(2, 3, 4, dtype=torch.bool)
    committed[0, 0, 0] = True      # block 0: one from the span -> need 1
    committed[1, 0, 1:3] = True    # row 1 block 0: two -> need 0
    got = pl.fallback_commit(w, p0, committed, ft([0.9, 0.9]), lt([2, 2]), M)
    assert got.tolist() == [
        [[False, True, True, False],    # need 1, two >= 0.9 remain: both
         [True, False, False, True],    # need 2, one >= 0.9 (0.9 inclusive): top-2 = pos 0 (0.9), pos 3 (0.8)
         [False, False, False, False]],  # semi: nothing
        [[False, False, False, False],  # already 2 committed
         [False, False, True, True],    # need 2, exactly 2 above
         [False, True, False, True]]]   # need 2, one above: top-2 of the remaining (0.97, 0.2 > 0.1)
    # fewer masks than need: all of them; min_k 1 with a committed token: nothing
    w1 = win([["123M"]], [[A_]], full=[[True]])
    assert pl.fallback_commit(w1, ft([[[0, 0, 0, 0.1]]]), torch.zeros(1, 1, 4, dtype=torch.bool), ft([0.9]),
                              lt([3]), M).tolist() == [[[False, False, False, True]]]
    done = torch.tensor([[[False, False, True, False]]])
    w2 = win([["1MMM"]], [[A_]], full=[[True]])
    assert not pl.fallback_commit(w2, torch.ones(1, 1, 4), done, ft([0.9]), lt([1]), M).any()


# ---------------------------------------------------------------------------------------------- spans, stops, commit

def test_window_span_crosses_blocks():
    w = win([["1234", "5MMM", "MM6M"],   # span = flat 5..9 (across blocks 1 -> 2)
             ["1MM2", "", ""],           # EMPTY slots hold masks but are outside the region
             ["1234", "", ""],           # no mask
             ["MMMM", "MMMM", "MMMM"]],  # all masks of three ACTIVE blocks
            [[C, A_, A_], [A_, E, E], [C, E, E], [A_, A_, A_]])
    s = pl.window_span(w, M)
    assert s.start.tolist() == [5, 1, 12, 0]
    assert s.length.tolist() == [5, 2, 0, 12]
    assert s.mask.shape == (4, 12)
    assert s.mask[0].tolist() == [i in (5, 6, 7, 8, 9) for i in range(12)]
    assert s.mask[1].tolist() == [i in (1, 2) for i in range(12)]


def test_stop_detection_and_apply_commit():
    w = win([["1MMM"], ["7MMM"], ["MMMM"]], [[A_], [A_], [A_]], full=[[True]] * 3)
    x = lt([[[1, 7, 3, 4]], [[7, 5, 7, 5]], [[7, 7, 7, 7]]])
    commit = torch.tensor([[[False, True, False, False]],   # commits a stop id
                           [[False, True, False, False]],   # the stop id sits at an uncommitted / old position
                           [[True, True, False, False]]])   # stop ids of this row: none (padding)
    stops = lt([[7, -1], [7, -1], [-1, -1]])
    assert pl.stop_committed(commit, x, stops).tolist() == [True, False, False]
    out = pl.apply_commit(w, commit, x, stops)
    assert out.tokens.tolist() == [[blk("17MM")], [blk("75MM")], [blk("77MM")]]
    assert out.stopped.tolist() == [True, False, False]
    # K = 0 stop ids
    assert pl.stop_committed(commit, x, torch.zeros(3, 0, dtype=torch.long)).tolist() == [False] * 3
    # a stopped row adds no block
    assert pl.add_block(out, ft([0.0] * 3), lt([9] * 3), M).blocks_opened.tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------- to-cache, shift

def test_mark_to_cache_cases():
    w = win([["1234", "1234", "1MMM"],
             ["1MMM", "1234", ""],
             ["1234", "1234", "1234"],
             ["1MMM", "1234", "MMMM"],
             ["1234", "1234", "1234"]],
            [[A_, A_, A_], [A_, A_, E], [C, A_, A_], [A_, A_, A_], [A_, A_, E]])
    out = pl.mark_to_cache(w, M)
    assert out.status.tolist() == [[C, C, A_],     # consecutive finished blocks flip together
                                   [A_, A_, E],    # finished behind an unfinished one waits
                                   [C, C, C],
                                   [A_, A_, A_],
                                   [C, C, E]]


def test_shift_window_cases():
    w = win([["1234", "5678", "1MMM"],
             ["1MMM", "1234", ""],
             ["1234", "1234", "1234"],
             ["1234", "1MM2", "3MMM"]],
            [[C, C, A_], [A_, A_, E], [C, C, C], [C, A_, A_]],
            full=[[True, True, True], [True, False, False], [True, True, True], [True, True, False]])
    s = pl.shift_window(w, M)
    assert s.num_dropped.tolist() == [2, 0, 3, 1]
    assert s.window.status.tolist() == [[A_, E, E], [A_, A_, E], [E, E, E], [A_, A_, E]]
    assert s.window.full.tolist() == [[True, False, False], [True, False, False], [False] * 3, [True, False, False]]
    assert s.window.tokens.tolist() == [[blk("1MMM"), [M] * 4, [M] * 4],
                                        [blk("1MMM"), blk("1234"), [M] * 4],
                                        [[M] * 4] * 3,
                                        [blk("1MM2"), blk("3MMM"), [M] * 4]]
    assert torch.equal(s.window.blocks_opened, w.blocks_opened) and torch.equal(s.window.stopped, w.stopped)


def test_window_final_prefix():
    w = win([["1234", "5M7M", ""],     # run 0..4 (stops at the first mask), stop id 7 is after it
             ["1274", "5678", "12MM"],  # run 0..9, first stop at 2
             ["1234", "", ""],          # run ends at the EMPTY slot
             ["MMMM", "", ""],
             ["1234", "1234", "1234"]],
            [[C, A_, E], [C, A_, A_], [A_, E, E], [A_, E, E], [C, C, A_]])
    pre = pl.window_final_prefix(w, M, lt([[7, -1]] * 5))
    assert pre.length.tolist() == [5, 10, 4, 0, 12]
    assert pre.stop.tolist() == [False, True, False, False, False]
    assert pre.first_stop.tolist() == [12, 2, 12, 12, 12]
    assert pl.window_final_prefix(w, M, torch.zeros(5, 0, dtype=torch.long)).stop.tolist() == [False] * 5


def test_decoded_count():
    w = win([["12MM", "MMMM", ""]], [[A_, A_, E]])
    assert pl.decoded_count(w, M).tolist() == [[2, 0, 0]]


# ---------------------------------------------------------------------------------------------- random walk

def _step(w, p0, x0, params, stops, min_k, verify_span):
    """One D2F step built from the pipeline functions (add, activate, shift, commit, mark)."""
    add_thr, dec_thr, skip, max_blocks = params
    w = pl.add_block(w, add_thr, max_blocks, M)
    w = pl.activate(w, dec_thr, M)
    w = pl.shift_window(w, M).window
    R, A, B = w.tokens.shape
    if verify_span:
        span = pl.window_span(w, M).mask
        span = (span & (torch.cumsum(span.int(), 1) <= 2)).view(R, A, B)  # verified: the span's first 2
        commit = span | pl.fallback_commit(w, p0, span, skip, min_k, M)
    else:
        commit = pl.baseline_commit(w, p0, skip, M)
    w = pl.apply_commit(w, commit, x0, stops)
    return pl.mark_to_cache(w, M), commit


class SlowWindow:
    """Per-block Python bookkeeping of one request (lists), written from docs/plans/d2f.md §1-§2 directly."""

    def __init__(self, A, B):
        self.A, self.B, self.blocks, self.opened, self.stopped = A, B, [], 0, False

    def step(self, p0, x0, add_thr, dec_thr, skip, max_blocks, stops, min_k, verify_span):
        B = self.B
        last_progress = 1.0 if not self.blocks else sum(t != M for t in self.blocks[-1]["tok"]) / B
        if (not self.stopped and self.opened < max_blocks and len(self.blocks) < self.A
                and torch.tensor(last_progress, dtype=torch.float32) >= add_thr):
            self.blocks.append({"tok": [M] * B, "state": "active", "full": False})
            self.opened += 1
        prev_ratio = 1.0
        for b in self.blocks:
            ratio = torch.tensor(prev_ratio, dtype=torch.float32)
            if b["state"] == "active" and ratio >= dec_thr:
                b["full"] = True
            prev_ratio = sum(t != M for t in b["tok"]) / B
        self.blocks = [b for b in self.blocks if b["state"] != "to_cache"]  # written by this step's forward
        commit = [[False] * B for _ in range(self.A)]
        if verify_span:
            flat = [(a, i) for a, b in enumerate(self.blocks) if b["state"] == "active" for i in range(B)]
            started, taken = False, 0
            for a, i in flat:
                if self.blocks[a]["tok"][i] == M and taken < 2:
                    commit[a][i], started, taken = True, True, taken + 1
                elif started:
                    break
            for a, b in enumerate(self.blocks):
                masks = [i for i in range(B) if b["tok"][i] == M and not commit[a][i]]
                need = min_k - sum(commit[a])
                if b["state"] != "active" or not b["full"] or need <= 0:
                    continue
                above = [i for i in masks if p0[a][i] >= skip]
                if len(above) >= need:
                    chosen = above
                else:
                    chosen = sorted(masks, key=lambda i: (-p0[a][i], i))[:need]
                for i in chosen:
                    commit[a][i] = True
        else:
            for a, b in enumerate(self.blocks):
                masks = [i for i in range(B) if b["tok"][i] == M]
                if b["state"] != "active" or not masks:
                    continue
                chosen = [i for i in masks if p0[a][i] > skip]
                if b["full"] and not chosen:
                    chosen = [max(masks, key=lambda i: (p0[a][i], -i))]
                for i in chosen:
                    commit[a][i] = True
        for a, b in enumerate(self.blocks):
            for i in range(B):
                if commit[a][i]:
                    b["tok"][i] = x0[a][i]
                    self.stopped |= x0[a][i] in stops
        earlier_unfinished = False
        for b in self.blocks:
            if b["state"] == "active":
                if M in b["tok"]:
                    earlier_unfinished = True
                elif not earlier_unfinished:
                    b["state"] = "to_cache"
        return commit


def _as_window(slow_rows, A, B):
    code = {"active": A_, "to_cache": C}
    tokens = [[b["tok"] for b in s.blocks] + [[M] * B] * (A - len(s.blocks)) for s in slow_rows]
    status = [[code[b["state"]] for b in s.blocks] + [E] * (A - len(s.blocks)) for s in slow_rows]
    full = [[b["full"] for b in s.blocks] + [False] * (A - len(s.blocks)) for s in slow_rows]
    return tokens, status, full


@pytest.mark.parametrize("verify_span", [False, True])
def test_random_walk_matches_slow_loop_and_batched_equals_per_row(verify_span):
    rnd = random.Random(7 + verify_span)
    g = torch.Generator().manual_seed(3 + verify_span)
    R, A, B, steps = 6, 3, 4, 40
    add_thr = ft([1.0, 0.5, 0.25, 0.0, 0.75, 0.5])
    dec_thr = ft([1.0, 0.75, 0.5, 0.0, 1.0, 0.25])
    skip = ft([0.9, 0.5, 0.7, 0.95, 0.6, 0.8])
    max_blocks = lt([3, 5, 8, 9, 4, 6])
    stops = lt([[7, -1], [-1, -1], [7, 8], [-1, -1], [8, -1], [-1, -1]])
    min_k = lt([1, 2, 1, 3, 2, 1])
    params = (add_thr, dec_thr, skip, max_blocks)
    w = pl.new_window(R, A, B, M)
    slow = [SlowWindow(A, B) for _ in range(R)]
    max_active, waits = [0] * R, 0
    for _ in range(steps):
        # ties and threshold equalities happen; later slots are more confident, so they may finish first
        p0 = (torch.rand(R, A, B, generator=g) ** ft([1.0, 0.3, 0.3])[None, :, None]).round(decimals=1)
        x0 = torch.randint(0, 10 if rnd.random() < 0.3 else 7, (R, A, B), generator=g)
        opened_now = pl.add_block(w, add_thr, max_blocks, M)
        with_masks = ((opened_now.status == A_) & (opened_now.tokens == M).any(-1)).sum(1)
        max_active = [max(a, int(n)) for a, n in zip(max_active, with_masks)]
        batched = _step(w, p0, x0, params, stops, min_k, verify_span)
        per_row = [_step(Window(*(t[r:r + 1] for t in w)), p0[r:r + 1], x0[r:r + 1],
                         tuple(t[r:r + 1] for t in params), stops[r:r + 1], min_k[r:r + 1], verify_span)
                   for r in range(R)]
        for i, part in enumerate(batched[0]):
            assert torch.equal(part, torch.cat([pr[0][i] for pr in per_row]))
        assert torch.equal(batched[1], torch.cat([pr[1] for pr in per_row]))
        w, commit = batched
        for r in range(R):
            want = slow[r].step(p0[r].tolist(), x0[r].tolist(), add_thr[r], dec_thr[r], float(skip[r]),
                                int(max_blocks[r]), [s for s in stops[r].tolist() if s >= 0], int(min_k[r]),
                                verify_span)
            assert commit[r].tolist() == want, r
        shifted = pl.shift_window(w, M).window
        tokens, status, full = _as_window(slow, A, B)
        slow_shifted = [[(t, st, f) for t, st, f in zip(*row) if st != C] for row in zip(tokens, status, full)]
        for r in range(R):
            n = len(slow_shifted[r])
            assert shifted.status[r, :n].tolist() == [x[1] for x in slow_shifted[r]]
            assert shifted.tokens[r, :n].tolist() == [x[0] for x in slow_shifted[r]]
            assert shifted.full[r, :n].tolist() == [x[2] for x in slow_shifted[r]]
        assert torch.equal(w.status, torch.tensor(status)) and torch.equal(w.tokens, torch.tensor(tokens))
        assert torch.equal(w.full, torch.tensor(full))
        assert w.blocks_opened.tolist() == [s.opened for s in slow]
        assert w.stopped.tolist() == [s.stopped for s in slow]
        # invariants: occupied slots are a prefix, TO_CACHE before ACTIVE, within the block budget
        occupied = w.status != E
        assert torch.equal(occupied, torch.cumprod(occupied.long(), 1).bool())
        to_cache = w.status == C
        assert torch.equal(to_cache, torch.cumprod(to_cache.long(), 1).bool())
        assert bool((w.blocks_opened <= max_blocks).all())
        waits += int(((w.status == A_) & ~(w.tokens == M).any(-1)).sum())  # finished, behind an unfinished block
    # block_add_threshold 1.0: at most one block with masks at a time; lower thresholds pipeline
    assert max_active[0] == 1 and max(max_active[1:]) >= 2
    assert bool(w.stopped.any()) and bool((w.blocks_opened == max_blocks).any())
    assert waits > 0 or verify_span


# ---------------------------------------------------------------------------------------------- acceptance knobs

P = [0.5, 0.3, 0.2]
Q = [0.25, 0.5, 0.25]  # token 0: r = 0.5; token 1: r = 1; residual (q - p)+ normalised: (0, 0.8, 0.2)


def accept(draft, ua, ur, *, greedy=False, allow=True, keep=False, mdc=None, rmq=None, run=None, span=None):
    draft = lt(draft)
    R, L = draft.shape
    span = torch.ones(R, L, dtype=torch.bool) if span is None else torch.tensor(span)
    p = ft([[P] * L] * R)
    q = ft([[Q] * L] * R)
    opt = lambda x, dt: None if x is None else torch.tensor(x, dtype=dt)  # noqa: E731
    return accept_span(draft, p, q, span, ft(ua), ft(ur), greedy=torch.full((R,), greedy),
                       ratio_tempering=torch.ones(R), allow_resample=torch.full((R,), allow),
                       ratio_threshold=torch.full((R,), -1.0), keep_rejected_draft=keep,
                       min_draft_confidence=opt(mdc, torch.float32), resample_min_q=opt(rmq, torch.float32),
                       partial_accept_run=opt(run, torch.long))


def test_min_draft_confidence():
    # drafts 1, 0 with u 0: both accepted by the ratio test (r 1, 0.5)
    v = accept([[1, 0]] * 4, [[0.0, 0.0]] * 4, [0.7] * 4, mdc=[-1.0, 0.4, 0.25, 0.3])
    assert v.num_accepted.tolist() == [2, 0, 2, 0]  # p(1) = 0.3: not > 0.4, > 0.25, not > 0.3 (strict)
    assert v.commit.tolist() == [[True, True], [True, False], [True, True], [True, False]]
    assert v.tokens[1, 0].item() == 1  # the gated rejection is resampled from the residual (u 0.7 -> 1)
    assert accept([[1, 0]], [[0.0, 0.0]], [0.7]).num_accepted.tolist() == [2]  # knob off
    # greedy: draft 1 = argmax q, still rejected under the gate; the correction is argmax q again
    v = accept([[1, 1]], [[0.0, 0.0]], [0.7], greedy=True, mdc=[0.4])
    assert v.num_accepted.tolist() == [0] and v.commit.tolist() == [[True, False]] and v.tokens[0, 0].item() == 1


def test_resample_min_q():
    # draft 0 rejected at position 0 (u 0.9 > r 0.5); q(x_0) = q(0) = 0.25
    args = ([[0, 1]] * 3, [[0.9, 0.0]] * 3, [0.7] * 3)
    v = accept(*args, rmq=[0.2, 0.25, 0.3])
    assert v.commit.tolist() == [[True, False], [True, False], [False, False]]  # q >= 0.2, >= 0.25; < 0.3 masked
    assert v.tokens[:2, 0].tolist() == [1, 1]
    # keep_rejected_draft: the gated position commits the draft itself
    v = accept(*args, keep=True, rmq=[0.3, 0.3, -1.0])
    assert v.commit[:, 0].tolist() == [True] * 3 and v.tokens[:, 0].tolist() == [0, 0, 1]
    # greedy rows too; allow_resample False stays off whatever the gate
    v = accept([[0, 1]] * 2, [[0.0, 0.0]] * 2, [0.7] * 2, greedy=True, rmq=[0.3, 0.2])
    assert v.commit.tolist() == [[False, False], [True, False]] and v.tokens[1, 0].item() == 1
    assert not accept(*args, allow=False, rmq=[0.0] * 3).commit.any()


def test_partial_accept_run():
    # accepted flags T F T T F T T T (drafts 0 with u 0.9 are rejected, drafts 1 accepted); j = 1
    draft = [[1, 0, 1, 1, 0, 1, 1, 1]] * 4
    ua = [[0.9] * 8] * 4
    v = accept(draft, ua, [0.7] * 4, run=[0, 2, 3, 4])
    assert v.commit.int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0],
                                       [1, 1, 1, 1, 0, 1, 1, 1],
                                       [1, 1, 0, 0, 0, 1, 1, 1],
                                       [1, 1, 0, 0, 0, 0, 0, 0]]
    assert v.num_accepted.tolist() == [1] * 4  # the accepted prefix is unchanged
    assert v.tokens[1].tolist() == [1, 1, 1, 1, 0, 1, 1, 1]  # runs keep their drafts; pos 1 resampled (-> 1)
    # a run is counted inside the span only
    span = [[True] * 7 + [False]]
    assert accept(draft[:1], ua[:1], [0.7], run=[3], span=span).commit.int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]
    # nothing rejected: the whole span is the prefix anyway
    assert accept([[1] * 4], [[0.9] * 4], [0.7], run=[1]).commit.tolist() == [[True] * 4]
    # with the draft-confidence gate the runs use the gated flags (p(1) = 0.3 <= 0.3: nothing accepted)
    v = accept(draft[:1], ua[:1], [0.7], run=[2], mdc=[0.3])
    assert v.commit.int().tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]


def _random_accept_case(seed, R=64, L=6, V=5):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(R, L, V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(R, L, V, generator=g) * 2, -1)
    draft = torch.multinomial(p.view(-1, V), 1, generator=g).view(R, L)
    span = torch.rand(R, L, generator=g) < 0.8
    span = span & torch.cumprod(span.long(), 1).bool()
    common = dict(greedy=torch.rand(R, generator=g) < 0.3, ratio_tempering=torch.rand(R, generator=g) + 0.5,
                  allow_resample=torch.rand(R, generator=g) < 0.7,
                  ratio_threshold=torch.where(torch.rand(R, generator=g) < 0.5, torch.rand(R, generator=g),
                                              torch.full((R,), -1.0)))
    knobs = dict(min_draft_confidence=torch.where(torch.rand(R, generator=g) < 0.5, torch.rand(R, generator=g) * 0.5,
                                                  torch.full((R,), -1.0)),
                 resample_min_q=torch.where(torch.rand(R, generator=g) < 0.5, torch.rand(R, generator=g) * 0.5,
                                            torch.full((R,), -1.0)),
                 partial_accept_run=torch.randint(0, 4, (R,), generator=g))
    return (draft, p, q, span, torch.rand(R, L, generator=g), torch.rand(R, generator=g)), common, knobs


@pytest.mark.parametrize("keep", [False, True])
def test_knobs_off_are_the_plain_rule(keep):
    args, common, _ = _random_accept_case(11)
    R = args[0].shape[0]
    plain = accept_span(*args, **common, keep_rejected_draft=keep)
    off = accept_span(*args, **common, keep_rejected_draft=keep, min_draft_confidence=torch.full((R,), -1.0),
                      resample_min_q=torch.full((R,), -1.0), partial_accept_run=torch.zeros(R, dtype=torch.long))
    for a, b in zip(plain, off):
        assert torch.equal(a, b)


def test_knobs_batched_equals_per_row():
    args, common, knobs = _random_accept_case(5)
    R = args[0].shape[0]
    batched = accept_span(*args, **common, **knobs, keep_rejected_draft=False)
    for r in range(R):
        sl = lambda d: {k: v[r:r + 1] for k, v in d.items()}  # noqa: E731
        one = accept_span(*(a[r:r + 1] for a in args), **sl(common), **sl(knobs), keep_rejected_draft=False)
        for a, b in zip(batched, one):
            assert torch.equal(a[r:r + 1], b)


# ---------------------------------------------------------------------------------------------- graph capture

def _everything(tokens, status, full, opened, stopped, p0, x0, add_thr, dec_thr, skip, max_blocks, stops, min_k,
                draft, p, q, span, ua, ur, greedy, gamma, allow, ratio_thr, mdc, rmq, run):
    w = Window(tokens, status, full, opened, stopped)
    w = pl.activate(pl.add_block(w, add_thr, max_blocks, M), dec_thr, M)
    shifted = pl.shift_window(w, M)
    w = shifted.window
    R, A, B = w.tokens.shape
    span_w = pl.window_span(w, M)
    base = pl.baseline_commit(w, p0, skip, M)
    fb = pl.fallback_commit(w, p0, span_w.mask.view(R, A, B), skip, min_k, M)
    w2 = pl.mark_to_cache(pl.apply_commit(w, base | fb, x0, stops), M)
    v = accept_span(draft, p, q, span, ua, ur, greedy=greedy, ratio_tempering=gamma, allow_resample=allow,
                    ratio_threshold=ratio_thr, keep_rejected_draft=False, min_draft_confidence=mdc,
                    resample_min_q=rmq, partial_accept_run=run)
    return (*w2, shifted.num_dropped, *span_w, base, fb, pl.decoded_count(w2, M),
            *pl.window_final_prefix(w2, M, stops), *v)


def _everything_args():
    g = torch.Generator().manual_seed(0)
    R, A, B = 5, 3, 4
    tokens = torch.where(torch.rand(R, A, B, generator=g) < 0.5, M, torch.randint(0, 9, (R, A, B), generator=g))
    status = lt([[C, A_, A_], [A_, E, E], [E, E, E], [C, C, A_], [A_, A_, A_]])
    tokens = torch.where((status == E)[:, :, None], M, tokens)
    tokens[:, 0] = torch.where((status[:, 0] == C)[:, None], 1, tokens[:, 0])
    tokens[3, 1] = 2
    full = torch.rand(R, A, generator=g) < 0.5
    acc_args, common, knobs = _random_accept_case(9, R=R, L=A * B)
    stopped = torch.tensor([False, False, False, True, False])
    return (tokens, status, full & (status == A_), lt([1, 1, 0, 3, 3]), stopped,
            torch.rand(R, A, B, generator=g), torch.randint(0, 9, (R, A, B), generator=g), torch.rand(R, generator=g),
            torch.rand(R, generator=g), torch.rand(R, generator=g), lt([4] * R), lt([[7, -1]] * R), lt([2] * R),
            *acc_args, common["greedy"], common["ratio_tempering"], common["allow_resample"],
            common["ratio_threshold"], knobs["min_draft_confidence"], knobs["resample_min_q"],
            knobs["partial_accept_run"])


def test_traces_as_one_graph():
    """No host syncs or data-dependent Python control flow: dynamo traces every pipeline function and the
    knobbed acceptance as one graph (``fullgraph=True`` raises on a graph break) with the eager results."""
    args = _everything_args()
    compiled = torch.compile(_everything, backend="eager", fullgraph=True)
    for x, y in zip(compiled(*args), _everything(*args)):
        assert torch.equal(x, y)


def test_no_host_reads():
    args = _everything_args()
    with no_host_reads():
        _everything(*args)
        pl.new_window(2, 3, 4, M)
