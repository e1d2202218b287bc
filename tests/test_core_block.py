"""Unit tests for ``vllm_s2d2.core.block`` (the block lifecycle around a step, ``docs/lifecycle.md``) and
``core.step.draft_probs``."""

from __future__ import annotations

import pytest
import torch

from vllm_s2d2.core import block as blk
from vllm_s2d2.core.params import FamilyRules, SamplingSpec, StepParams
from vllm_s2d2.core.policies import PolicyState
from vllm_s2d2.core.sampling import exclude_token, transform_probs
from vllm_s2d2.core.step import BlockState, draft_probs, draft_step
from vllm_s2d2.s2d2_config import S2D2Config

M = 99  # mask id
S = 50  # a stop id


def lt(x):
    return torch.tensor(x, dtype=torch.long)


def bt(x):
    return torch.tensor(x, dtype=torch.bool)


def ints(t):
    return t.long().tolist()


# ----------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------

def test_first_mask_index_and_editable_columns():
    assert blk.first_mask_index(lt([[1, M, 2, M], [1, 2, 3, 4], [M, M, M, M]]), M).tolist() == [1, 4, 0]
    # block [0, 4) with prompt 3: only column 3 generated; block [8, 12) after a prompt of 5: all generated
    ed = blk.editable_columns(lt([0, 8]), lt([3, 5]), 4)
    assert ints(ed) == [[0, 0, 0, 1], [1, 1, 1, 1]]


def test_open_block_prompt_tail_and_shifted_first_token():
    tail = lt([[10, 11, 12, 13]] * 4)
    off = lt([2, 0, 3, 2])
    assert blk.open_block(tail, off, M).tolist() == [[10, 11, M, M], [M, M, M, M], [10, 11, 12, M],
                                                      [10, 11, M, M]]
    first = lt([7, 7, 7, 8])
    opened = blk.open_block(tail, off, M, first)
    assert opened.tolist() == [[10, 11, 7, M], [7, M, M, M], [10, 11, 12, 7], [10, 11, 8, M]]
    # a shifted prompt one short of a block boundary opens a block with no mask (committed at once)
    assert not (opened[2] == M).any()


def test_available_columns():
    avail = blk.available_columns(lt([1, 0, 2, 0]), lt([2, 10, -3, 0]), 4)
    assert ints(avail) == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]


# ----------------------------------------------------------------------------------------------------
# region
# ----------------------------------------------------------------------------------------------------

def test_step_region_sub_blocks():
    tokens = lt([[6, 1, 2, 3, M, M, M, M],   # first sub-block done: second sub-block
                 [6, M, M, M, M, M, M, M],   # first sub-block
                 [6, 1, M, 3, 4, M, M, M],   # first mask at 2: first sub-block even though 5.. are masked
                 [6, 1, 2, 3, 4, 5, 6, 7]])  # no mask: whole block (an editing pass)
    assert ints(blk.step_region(tokens, M, 4)) == [[0, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0],
                                                   [1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    # sub_block = B (SDAR, LLaDA2, Fast-dLLM v2 with sub_block_size 8): always the whole block
    assert ints(blk.step_region(tokens, M, 8)) == [[1] * 8] * 4
    # sub-blocks of 2
    assert ints(blk.step_region(tokens[:1], M, 2)) == [[0, 0, 0, 0, 1, 1, 0, 0]]


def test_step_region_truncated_availability():
    # a canvas cut at max_model_len: block of 8 at off 2 with 3 canvas rows covers columns 0..4
    tokens = lt([[10, 11, M, M, M, M, M, M], [10, 11, 1, 2, 3, M, M, M]])
    avail = blk.available_columns(lt([2, 2]), lt([3, 3]), 8)
    assert ints(blk.step_region(tokens, M, 8, avail)) == [[1, 1, 1, 1, 1, 0, 0, 0]] * 2
    # with sub-blocks the region is the sub-block cut to the covered columns (row 1: sub-block 4..7 -> {4})
    assert ints(blk.step_region(tokens, M, 4, avail)) == [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]]


# ----------------------------------------------------------------------------------------------------
# draft_ver prefix
# ----------------------------------------------------------------------------------------------------

def test_causal_prefix():
    tokens = lt([[10, 11, 5, M], [10, 11, 5, M], [10, 11, 5, 6], [M, M, M, M], [10, 11, 5, M], [10, M, 5, M]])
    off = lt([1, 3, 1, 0, 1, 2])
    on = bt([True, True, True, True, False, True])
    # row 0: rows 1, 2 are final before the first mask (3); row 1: the first mask is the first query row;
    # row 2: no mask, every query row (3); row 3: fresh block; row 4: draft_ver off; row 5: clamped at 0
    assert blk.causal_prefix(tokens, M, off, on).tolist() == [2, 0, 3, 0, 0, 0]


# ----------------------------------------------------------------------------------------------------
# editing passes
# ----------------------------------------------------------------------------------------------------

def _post(post, ran, before, after, max_post, editing):
    r = blk.post_steps(lt(post), bt(ran), lt(before), lt(after), M, lt(max_post), bt(editing))
    return r.post.tolist(), r.more_edits.tolist(), r.again.tolist(), r.settled.tolist()


def test_post_steps_cases():
    post, more, again, settled = _post(
        post=[0, 0, 0, 1, 2, 1, 0, 0, 0],
        ran=[1, 1, 1, 1, 1, 1, 0, 0, 1],
        before=[[M, M, 3], [1, M, 3], [1, M, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, M, 3], [1, 2, 3], [1, M, 3]],
        after=[[5, M, 3], [1, 2, 3], [1, 2, 3], [1, 4, 3], [1, 4, 3], [1, 2, 3], [1, M, 3], [1, 2, 3], [1, 2, 3]],
        max_post=[2, 2, 2, 2, 2, 2, 2, 2, 0],
        editing=[1, 1, 0, 1, 1, 1, 1, 1, 1])
    # 0: masks left -> another step, not an editing pass, not settled (editing)
    # 1: the last mask filled -> an editing pass follows (0 < 2)
    # 2: the same without editing: filled tokens are final -> settled although a (no-op) pass follows
    # 3: editing pass #2 changed a token -> post 2, no pass left -> settled
    # 4: post already 2 before this pass -> 3, none follows
    # 5: an editing pass that changed nothing ends the block
    # 6: no step ran (truncated canvas): nothing counted, the masks still need a step
    # 7: no step ran on a full block: nothing follows
    # 8: max_post 0: the block is done when its last mask is filled
    assert post == [0, 0, 0, 2, 3, 2, 0, 0, 0]
    assert more == [False, True, True, False, False, False, False, False, False]
    assert again == [True, True, True, False, False, False, True, False, False]
    assert settled == [False, False, True, True, True, True, False, True, True]


def test_post_steps_loop_counts_max_post_steps():
    """A block driven until ``again`` is False: the masked steps, then exactly max_post editing passes while
    they change something."""
    max_post, editing = lt([2]), bt([True])
    tokens = lt([[M, M]])
    life = blk.post_steps(lt([0]), bt([False]), tokens, tokens, M, max_post, editing)
    assert life.again.tolist() == [True] and life.settled.tolist() == [False]
    script = [[[1, M]], [[1, 2]], [[3, 2]], [[3, 4]], [[9, 9]]]  # two masked steps, then edits
    steps = 0
    while bool(life.again[0]):
        new = lt(script[steps])
        life = blk.post_steps(life.post, bt([True]), tokens, new, M, max_post, editing)
        tokens, steps = new, steps + 1
    assert steps == 4 and life.post.tolist() == [2] and life.settled.tolist() == [True]
    assert tokens.tolist() == [[3, 4]]


# ----------------------------------------------------------------------------------------------------
# final prefix and early finish
# ----------------------------------------------------------------------------------------------------

def _prefix(tokens, block_start, off, prompt_len, stops, max_tokens, avail=None):
    return blk.final_prefix(lt(tokens), M, lt(block_start), lt(off), lt(prompt_len), lt(stops), lt(max_tokens),
                            None if avail is None else bt(avail))


def test_final_prefix_stop_tokens():
    no_limit = 2 ** 62
    p = _prefix(tokens=[[S, 11, 5, M, M, M],   # stop id in the prompt tail (before off, not generated)
                        [10, 11, 5, S, M, M],  # stop inside the prefix
                        [10, 11, 5, M, S, 6],  # stop after a mask: not final yet
                        [10, 11, M, M, M, M],  # nothing final after off
                        [S, 1, 2, 3, 4, M],    # later block (off 0): the stop at column 0 counts
                        [10, 11, 1, 2, 3, 4]],  # complete block, no stop
                block_start=[0, 0, 0, 0, 12, 0], off=[2, 2, 2, 2, 0, 2], prompt_len=[2] * 4 + [5, 2],
                stops=[[S, -1]] * 6, max_tokens=[no_limit] * 6)
    assert p.length.tolist() == [1, 2, 1, 0, 5, 4]
    assert p.stop.tolist() == [False, True, False, False, True, False]
    assert p.reach_max.tolist() == [False] * 6
    assert p.complete.tolist() == [False, False, False, False, False, True]


def test_final_prefix_stop_on_prompt_position_inside_block():
    # prompt 3 ends inside the block [0, 4) while off = 2 (only possible with a partially cached tail): column 2
    # is prompt, not generated -> its stop id is ignored
    p = _prefix([[1, 2, S, 4]], [0], [2], [3], [[S]], [100])
    assert p.length.tolist() == [2] and p.stop.tolist() == [False]


def test_final_prefix_max_tokens_mid_block():
    # block [8, 12) after a prompt of 5: 3 outputs before it; 2 final tokens -> 5 outputs
    tokens = [[1, 2, M, M]] * 3 + [[1, 2, 3, 4]]
    p = _prefix(tokens, [8] * 4, [0] * 4, [5] * 4, [[-1]] * 4, [5, 6, 4, 7])
    assert p.length.tolist() == [2, 2, 2, 4]
    assert p.reach_max.tolist() == [True, False, True, True]
    # first block with a prompt tail: outputs before column off are 0
    p = _prefix([[10, 11, 1, M]], [0], [2], [2], [[-1]], [1])
    assert p.length.tolist() == [1] and p.reach_max.tolist() == [True]


def test_final_prefix_without_stop_ids_and_truncated_canvas():
    tokens = [[10, 1, 2, M], [10, 1, 2, M], [10, 1, S, 3]]
    avail = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    p = blk.final_prefix(lt(tokens), M, lt([0] * 3), lt([1] * 3), lt([1] * 3), torch.zeros(3, 0, dtype=torch.long),
                         lt([100] * 3), bt(avail))
    assert p.length.tolist() == [1, 2, 2]  # the run stops at the first uncovered column
    assert p.stop.tolist() == [False] * 3  # K = 0: no stop ids at all
    assert p.complete.tolist() == [True, False, True]  # no mask among the covered columns
    p = _prefix(tokens[2:], [0], [1], [1], [[S]], [100], avail[2:])
    assert p.stop.tolist() == [True]


def test_early_finish():
    p = blk.FinalPrefix(length=lt([2, 2, 2, 0, 2, 2, 2]), stop=bt([1, 0, 0, 0, 0, 0, 0]),
                        reach_max=bt([0, 1, 1, 1, 0, 0, 0]), complete=bt([0, 0, 0, 1, 1, 1, 0]))
    settled = bt([0, 1, 0, 1, 1, 0, 1])
    clipped = bt([0, 0, 0, 1, 1, 1, 1])
    # 0: a stop ends it at once (even unsettled); 1: max_tokens, settled; 2: max_tokens but edits may follow;
    # 3: empty prefix never; 4: canvas cut at max_model_len and its part complete; 5: ... not settled;
    # 6: cut but the covered part not complete
    assert blk.early_finish(p, settled, clipped).tolist() == [True, True, False, False, True, False, False]
    assert blk.early_finish(p, settled).tolist() == [True, True, False, False, False, False, False]


# ----------------------------------------------------------------------------------------------------
# canvases and attention ranges
# ----------------------------------------------------------------------------------------------------

def test_block_canvas_and_verify_canvas():
    tokens = lt([[1, 2, 3, 4], [1, 2, M, M], [1, 2, 3, 4]])
    off = lt([1, 0, 4])
    assert blk.block_canvas(tokens, off, M, 8).tolist() == [[2, 3, 4, M, M, M, M, M], [1, 2, M, M, M, M, M, M],
                                                            [M] * 8]
    assert blk.block_canvas(tokens, off, M, 3).tolist() == [[2, 3, 4], [1, 2, M], [M, M, M]]
    # the reference decoder's compact 2L query: [first half[off:] | L x MASK]
    assert blk.block_canvas(tokens[:1], off[:1], M, 6).tolist() == [[2, 3, 4, M, M, M]]
    first_half = lt([[10, 11, 5, 6], [5, 6, 7, 8]])
    assert blk.verify_canvas(first_half, lt([2, 0]), M).tolist() == [[5, 6, M, M, M, M, M, M],
                                                                     [5, 6, 7, 8, M, M, M, M]]


def test_attention_ranges():
    bs, p = lt([8, 8, 8, 8, 0]), lt([10, 8, 8, 10, 3])
    commit = bt([0, 1, 1, 0, 0])
    cache_ver = bt([0, 0, 1, 1, 1])
    cp = lt([1, 0, 0, 0, 0])
    spec = blk.attention_ranges(bs, p, 4, commit, cache_ver, cp)
    assert spec.tolist() == [[11, 11, 0, 0],    # DRAFT at p 10 with one causal row: [11, 11] (a single row)
                             [8, 11, 12, 15],   # COMMIT, block-bidirectional KV + next block's draft
                             [0, 0, 12, 15],    # COMMIT with cache_ver: token-causal KV
                             [10, 11, 0, 0],    # DRAFT (cache_ver does not matter)
                             [3, 3, 0, 0]]      # first block after a prompt of 3: one query row
    verify = bt([0, 0, 0, 1, 0])
    assert blk.attention_ranges(bs, p, 4, commit, cache_ver, cp, verify)[3].tolist() == [0, 0, 0, 0]


# ----------------------------------------------------------------------------------------------------
# draft_probs
# ----------------------------------------------------------------------------------------------------

def test_draft_probs_is_the_draft_steps_distribution():
    rules = FamilyRules.for_family("sdar", 7)
    cfg = S2D2Config().resolve("sdar", 4)
    params = StepParams.build([cfg] * 2, [SamplingSpec(0.8, top_k=3, seed=1), SamplingSpec(1.0, top_p=0.7, seed=2)],
                              rules)
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(0))
    logits[..., 7] = 10.0  # the mask token would dominate
    p = draft_probs(logits, params, rules)
    assert torch.equal(p, transform_probs(exclude_token(logits, 7), params.temperature, params.top_k,
                                          params.top_p))
    assert float(p[..., 7].abs().max()) == 0.0
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4))
    state = BlockState(torch.full((2, 4), 7), torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool),
                       torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    draft, _ = draft_step(logits, state, params, rules, PolicyState.zeros(2))
    assert torch.equal(draft.probs, p)


# ----------------------------------------------------------------------------------------------------
# the engine's formulas (engine/stepper.py _step_core / _write_next as of 8d2183c), random batches
# ----------------------------------------------------------------------------------------------------

def _engine_region(dblock, doff, avail, full, sub_block, shifted):
    B = dblock.shape[1]
    cols = torch.arange(B)[None, :]
    region = full[:, None] | (cols < (doff + avail)[:, None])
    d_is_mask = dblock == M
    if shifted:
        first_mask = torch.where(d_is_mask.any(1), d_is_mask.int().argmax(1), torch.zeros_like(doff))
        lo = first_mask // sub_block * sub_block
        region = region & (cols >= lo[:, None]) & (cols < (lo + sub_block)[:, None])
    return region


def _random_blocks(g, R, B, off):
    tokens = torch.randint(0, 6, (R, B), generator=g)
    tokens = torch.where(torch.rand(R, B, generator=g) < 0.4, torch.full_like(tokens, M), tokens)
    cols = torch.arange(B)[None, :]
    return torch.where(cols < off[:, None], torch.randint(0, 6, (R, B), generator=g), tokens)  # tail: no mask


@pytest.mark.parametrize("seed", range(4))
def test_matches_engine_formulas(seed):
    g = torch.Generator().manual_seed(seed)
    R, B, sub = 64, 8, 4
    off = torch.randint(0, B, (R,), generator=g)
    tok = _random_blocks(g, R, B, off)
    bs = torch.randint(0, 5, (R,), generator=g) * B
    prompt_len = bs + off
    # region: q_len rows for this block, full when they cover it
    rows = torch.randint(-2, 2 * B, (R,), generator=g)
    full = rows >= B - off
    avail = blk.available_columns(off, rows, B)
    cols = torch.arange(B)[None, :]
    assert torch.equal(avail, full[:, None] | (cols < (off + rows.clamp(min=0))[:, None]))
    has_mask = (tok == M).any(1)
    for shifted in (False, True):
        mine = blk.step_region(tok, M, sub if shifted else B, avail)
        eng = _engine_region(tok, off, rows.clamp(min=0), full, sub, shifted)
        # identical wherever the block has a mask (a shift-aligned block without one is never drafted)
        assert torch.equal(mine[has_mask], eng[has_mask])
        if not shifted:
            assert torch.equal(mine, eng)
    # draft_ver prefix (_write_next)
    draft_ver = torch.rand(R, generator=g) < 0.5
    is_mask = tok == M
    fm = torch.where(is_mask.any(1), is_mask.int().argmax(1), torch.full_like(off, B))
    cp = torch.where(draft_ver, (fm - off).clamp_min(0), torch.zeros_like(off))
    assert torch.equal(blk.causal_prefix(tok, M, off, draft_ver), cp)
    # editing passes and early finish (_step_core), after a random step that fills some masks
    new = torch.where((tok == M) & (torch.rand(R, B, generator=g) < 0.5), torch.randint(0, 6, (R, B), generator=g), tok)
    new = torch.where((tok != M) & (torch.rand(R, B, generator=g) < 0.1) & (cols >= off[:, None]),
                      torch.randint(0, 6, (R, B), generator=g), new)
    ran = torch.rand(R, generator=g) < 0.8
    new = torch.where(ran[:, None], new, tok)
    post = torch.randint(0, 3, (R,), generator=g)
    max_post = torch.randint(0, 3, (R,), generator=g)
    editing = torch.rand(R, generator=g) < 0.5
    life = blk.post_steps(post, ran, tok, new, M, max_post, editing)
    d_has_mask = (tok == M).any(1)
    edit_pass = ran & ~d_has_mask
    changed = (new != tok).any(1)
    post_n = post + edit_pass.long()
    new_has_mask = (new == M).any(1)
    more_edits = ran & ~new_has_mask & ~(edit_pass & ~changed) & (post_n < max_post)
    settled = ~editing | (~new_has_mask & ~more_edits)
    assert torch.equal(life.post, post_n) and torch.equal(life.more_edits, more_edits)
    assert torch.equal(life.settled, settled) and torch.equal(life.again, new_has_mask | more_edits)
    stop_ids = torch.randint(0, 6, (R, 2), generator=g)
    stop_ids[::3] = -1
    max_tokens = torch.randint(1, 12, (R,), generator=g)
    clipped = ~full & (torch.rand(R, generator=g) < 0.5)
    prefix = blk.final_prefix(new, M, bs, off, prompt_len, stop_ids, max_tokens, avail)
    blocking = ((new == M) | ~avail) & (cols >= off[:, None])
    first_block = torch.where(blocking.any(1), blocking.int().argmax(1), torch.full_like(off, B))
    leading = (first_block - off).clamp_min(0)
    in_lead = (cols >= off[:, None]) & (cols < first_block[:, None])
    editable = (bs[:, None] + cols) >= prompt_len[:, None]
    is_stop = (new[:, :, None] == stop_ids[:, None, :]).any(-1) & in_lead & editable
    reach_max = bs + off - prompt_len + leading >= max_tokens
    region_done = ~((new == M) & avail).any(1)
    finish = (leading > 0) & (is_stop.any(1) | ((reach_max | (clipped & region_done)) & settled))
    assert torch.equal(prefix.length, leading) and torch.equal(prefix.stop, is_stop.any(1))
    assert torch.equal(prefix.reach_max, reach_max) and torch.equal(prefix.complete, region_done)
    assert torch.equal(blk.early_finish(prefix, life.settled, clipped), finish)
    # canvases (_write_next, engine/verify.verify_canvas) and attention ranges
    W = 2 * B
    w = torch.arange(W)[None, :]
    src = (off[:, None] + w).clamp(max=B - 1)
    canvas = torch.where(w < (B - off)[:, None], tok.gather(1, src), torch.full_like(src, M))
    assert torch.equal(blk.block_canvas(tok, off, M, W), canvas)
    assert torch.equal(blk.verify_canvas(new, off, M), torch.where(w < (B - off)[:, None], new.gather(1, src),
                                                                  torch.full_like(src, M)))
    p_next = bs + off
    commit = torch.rand(R, generator=g) < 0.3
    verify = ~commit & (torch.rand(R, generator=g) < 0.3)
    cache_ver = torch.rand(R, generator=g) < 0.5
    end, none = bs + B - 1, torch.zeros_like(bs)
    spec = torch.stack([torch.where(commit, torch.where(cache_ver, none, p_next), p_next + cp),
                        torch.where(commit, torch.where(cache_ver, none, end), end),
                        torch.where(commit, bs + B, none), torch.where(commit, bs + 2 * B - 1, none)], dim=1)
    spec = torch.where(verify[:, None], torch.zeros_like(spec), spec)
    assert torch.equal(blk.attention_ranges(bs, p_next, B, commit, cache_ver, cp, verify), spec)


def test_traces_as_one_graph():
    """No host syncs or data-dependent Python control flow (what a CUDA graph capture needs): dynamo traces the
    whole lifecycle as one graph (``fullgraph=True`` raises on any graph break) and gives the eager results."""
    def lifecycle(tok, new, off, bs, prompt_len, stops, max_tokens, rows, post, max_post, editing, draft_ver,
                  commit, cache_ver, first):
        avail = blk.available_columns(off, rows, 8)
        cp = blk.causal_prefix(tok, M, off, draft_ver)
        life = blk.post_steps(post, commit, tok, new, M, max_post, editing)
        prefix = blk.final_prefix(new, M, bs, off, prompt_len, stops, max_tokens, avail)
        return (blk.step_region(tok, M, 4, avail), cp, *life, *prefix, blk.early_finish(prefix, life.settled, commit),
                blk.open_block(tok, off, M, first), blk.block_canvas(tok, off, M, 16), blk.verify_canvas(new, off, M),
                blk.attention_ranges(bs, bs + off, 8, commit, cache_ver, cp, draft_ver),
                blk.editable_columns(bs, prompt_len, 8))

    g = torch.Generator().manual_seed(0)
    R = 5
    i = lambda *s: torch.randint(0, 5, s, generator=g)  # noqa: E731
    b = lambda *s: torch.rand(*s, generator=g) < 0.5  # noqa: E731
    tok = torch.where(b(R, 8), torch.full((R, 8), M), i(R, 8))
    args = (tok, torch.where(b(R, 8), i(R, 8), tok), i(R), i(R) * 8, i(R), i(R, 2), i(R) + 1, i(R), i(R), i(R),
            b(R), b(R), b(R), b(R), i(R))
    compiled = torch.compile(lifecycle, backend="eager", fullgraph=True)
    for x, y in zip(compiled(*args), lifecycle(*args)):
        assert torch.equal(x, y)
