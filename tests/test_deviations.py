"""The project's deliberate deviations from the public reference code, pinned (docs/deviations.md).

Each test states what the project does where the reference code (phymhan/S2D2) behaves differently, and
where cheap also shows what the reference's rule would have given on the same input.  CPU only, hand-made
logits or a fake dense model: no checkpoint.
"""

from __future__ import annotations

import math

import torch

from vllm_s2d2.configs import FamilyInfo
from vllm_s2d2.core.params import FamilyRules, SamplingSpec, StepParams
from vllm_s2d2.core.policies import SCORE_HYSTERESIS, PolicyState, route
from vllm_s2d2.core.step import BlockState, draft_step, finish_step, verify_step
from vllm_s2d2.reference import generate
from vllm_s2d2.s2d2_config import S2D2Config

V = 10
MASK = 9
STOP = 8
GREEDY = SamplingSpec(temperature=0.0, seed=0)


def peaked(token: int, pmax: float, vocab: int = V) -> list[float]:
    """Log-probabilities of a distribution with ``pmax`` on ``token`` and the rest spread evenly."""
    rest = (1.0 - pmax) / (vocab - 1)
    return [math.log(pmax) if v == token else math.log(rest) for v in range(vocab)]


def params_for(family: str, block: int, sampling: SamplingSpec = GREEDY, **cfg) -> tuple[StepParams, FamilyRules]:
    rules = FamilyRules.for_family(family, MASK)
    config = S2D2Config(**cfg).resolve(family, block)
    return StepParams.build([config], [sampling], rules), rules


def block_state(tokens, editable=None, region=None, step=0, counter=0) -> BlockState:
    t = torch.tensor([tokens], dtype=torch.long)
    ones = torch.ones_like(t, dtype=torch.bool)
    return BlockState(t, ones if editable is None else torch.tensor([editable]),
                      ones if region is None else torch.tensor([region]),
                      torch.tensor([step]), torch.tensor([counter]))


# --------------------------------------------------------------------------------------------------------
# LLaDA2 (a): score_hysteresis keeps its on/off state on a step with an empty span
# --------------------------------------------------------------------------------------------------------

def test_route_keeps_hysteresis_state_for_rows_without_a_span():
    """``draft_step`` consults the policy only for rows with a span (``routed``); ``route`` leaves the
    hysteresis state of the other rows alone.  The reference scores an empty span -inf and updates the state
    with that decision, which is what an *active* row with s = -inf does here (row 1): it switches off."""
    state = PolicyState.zeros(2)
    state.hysteresis_on = torch.tensor([True, True])
    one = lambda x, dt=torch.float32: torch.tensor([x, x], dtype=dt)  # noqa: E731
    decision, new = route(torch.tensor([SCORE_HYSTERESIS] * 2), torch.tensor([False, True]),
                          torch.tensor([0, 0]), one(-math.inf), torch.tensor([0, 0]), state,
                          min_span=torch.tensor([1, 1]), threshold=one(0.0), hysteresis_on=one(1.0),
                          hysteresis_off=one(-5.0), ucb_beta=one(1.0))
    assert decision.tolist() == [False, False]
    assert new.hysteresis_on.tolist() == [True, False]  # row 0: the project's path; row 1: the reference's rule


def _llada_hysteresis():
    return params_for("llada2", 4, verify_policy="score_hysteresis", hysteresis_on=1.0, hysteresis_off=-5.0,
                      editing_threshold=0.5, max_post_steps=2)


def test_post_edit_pass_with_no_span_keeps_hysteresis_on():
    """A LLaDA2.1 editing pass after the block's last mask has no span: no routing, score -inf, state kept."""
    params, rules = _llada_hysteresis()
    state = PolicyState.zeros(1)
    state.hysteresis_on = torch.tensor([True])
    logits = torch.tensor([[peaked(t, 0.6) for t in (1, 2, 3, 4)]])
    draft, after = draft_step(logits, block_state([1, 2, 3, 5]), params, rules, state)
    assert draft.span_length.tolist() == [0]
    assert draft.score.tolist() == [-math.inf]  # the same score the reference gives an empty span
    assert draft.routed.tolist() == [False] and draft.do_verify.tolist() == [False]
    assert after.hysteresis_on.tolist() == [True]  # the reference would now be off
    assert draft.edits.tolist() == [[False, False, False, True]]  # the pass itself still edits (p 0.6 > 0.5)

    # What the kept state changes: the next block's first step scores K-hat - 4 in [-4, -3], between
    # tau_off = -5 and tau_on = 1.  With the state kept on it verifies; from the reference's "off" it would not.
    nxt = block_state([MASK, MASK, MASK, MASK])
    logits2 = torch.tensor([[peaked(t, 0.9) for t in (1, 2, 3, 4)]])
    kept, _ = draft_step(logits2, nxt, params, rules, after)
    reset, _ = draft_step(logits2, nxt, params, rules, PolicyState.zeros(1))
    assert -5.0 <= float(kept.score[0]) <= 1.0
    assert kept.do_verify.tolist() == [True]
    assert reset.do_verify.tolist() == [False]


# --------------------------------------------------------------------------------------------------------
# (b) the mask token is never sampled, and p0 / q / the residual are renormalised without it
# --------------------------------------------------------------------------------------------------------

def test_mask_token_excluded_from_draft_and_confidence():
    params, rules = params_for("llada2", 4, verify=False)
    # p(MASK) = 0.7 everywhere, token 3 gets 0.25: the reference's argmax would be the mask itself.
    row = [math.log(0.05 / 8)] * V
    row[MASK], row[3] = math.log(0.7), math.log(0.25)
    logits = torch.tensor([[row] * 4])
    draft, _ = draft_step(logits, block_state([MASK] * 4), params, rules, PolicyState.zeros(1))
    assert draft.x0.tolist() == [[3, 3, 3, 3]]
    full_vocab_p = torch.softmax(logits, dim=-1)[0, 0, 3]  # what the reference reports for token 3
    torch.testing.assert_close(draft.p0[0], torch.full((4,), 0.25 / 0.3))
    assert float(draft.p0[0, 0]) > float(full_vocab_p) * 3  # 0.83 against 0.25: confidence rules differ


def test_mask_token_never_committed_by_verification():
    params, rules = params_for("sdar", 4, SamplingSpec(temperature=1.0, seed=3), verify_policy="mask_span_length",
                               min_span_length=1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, V, generator=g)
    draft, _ = draft_step(logits, block_state([MASK] * 4), params, rules, PolicyState.zeros(1))
    assert draft.do_verify.tolist() == [True]
    q_logits = torch.randn(1, 4, V, generator=g)
    q_logits[..., MASK] = 20.0  # the verifier puts nearly all its mass on the mask token
    for counter in range(20):
        commit, tokens, _ = verify_step(draft, q_logits, params, rules, torch.tensor([counter]))
        assert commit.any()
        assert not (tokens[commit] == MASK).any()


# --------------------------------------------------------------------------------------------------------
# SDAR: a step's quota is capped at the masks left (the reference's generate.py is not)
# --------------------------------------------------------------------------------------------------------

def test_quota_capped_at_remaining_masks():
    """B = 4, S = 2 (quota 2 per step), one mask left: the project commits that mask only.  The reference's
    ``torch.topk(confidence, num_transfer_tokens[step])`` over -inf-filled confidences picks a second,
    already-filled position (here the prompt token at column 0) and overwrites it with the draft."""
    params, rules = params_for("sdar", 4, verify=False, denoising_steps=2, remasking="low_confidence_static")
    tokens = [5, 6, 7, MASK]  # column 0: prompt tail; 1-2: committed
    block = block_state(tokens, editable=[False, True, True, True], step=1)
    logits = torch.tensor([[peaked(t, 0.5) for t in (1, 2, 3, 4)]])
    draft, _ = draft_step(logits, block, params, rules, PolicyState.zeros(1))
    assert params.quota[0].tolist() == [2, 2]
    assert draft.quota.tolist() == [1]
    assert draft.baseline_commit.tolist() == [[False, False, False, True]]
    result, _ = finish_step(block, draft, None, None, None, params, PolicyState.zeros(1))
    assert result.tokens.tolist() == [[5, 6, 7, 4]]

    confidence = torch.where(draft.is_mask, draft.p0, torch.full_like(draft.p0, -torch.inf))
    picked = torch.topk(confidence[0], 2).indices.tolist()  # the reference's selection
    assert 3 in picked and any(not draft.is_mask[0, i] for i in picked)


# --------------------------------------------------------------------------------------------------------
# Fast-dLLM v2: UCB block progress does not count prompt tokens inside the sub-block
# --------------------------------------------------------------------------------------------------------

def test_ucb_progress_counts_generated_tokens_only():
    """bucket = (span_bin * 2 + progress_bin) * 2 + entropy_bin.  Two prompt tokens and two masks in a
    4-wide sub-block: progress 0 here; the reference counts every unmasked position (2 / 4 -> bin 1)."""
    params, rules = params_for("fast_dllm_v2", 4, verify_policy="contextual_bandit_ucb", sub_block_size=4)
    logits = torch.tensor([[peaked(t, 0.5) for t in (1, 2, 3, 4)]])
    tokens = [5, 6, MASK, MASK]
    prompt = block_state(tokens, editable=[False, False, True, True])
    generated = block_state(tokens)
    progress_bin = lambda d: (int(d.bucket[0]) // 2) % 2  # noqa: E731
    d_prompt, _ = draft_step(logits, prompt, params, rules, PolicyState.zeros(1))
    d_generated, _ = draft_step(logits, generated, params, rules, PolicyState.zeros(1))
    assert progress_bin(d_prompt) == 0
    assert progress_bin(d_generated) == 1


# --------------------------------------------------------------------------------------------------------
# End to end on the reference decoder with a fake dense model
# --------------------------------------------------------------------------------------------------------

class _FakeModel:
    """``DenseModel`` whose logits for a query row come from ``rule(position, tokens_by_position)``."""

    def __init__(self, rule):
        self.rule = rule

    def logits(self, input_ids, position_ids, visible, rows=None):
        rows = torch.arange(input_ids.numel()) if rows is None else rows
        out = []
        for r in rows.tolist():
            seen = {int(p): int(t) for p, t, v in zip(position_ids, input_ids, visible[r]) if v}
            out.append(self.rule(int(position_ids[r]), seen))
        return torch.tensor(out)


def _llada2_info(block: int = 4) -> FamilyInfo:
    return FamilyInfo("llada2", "LLaDA2MoeModelLM", block, MASK, (STOP,), False, V)


def _editing_rule(pos: int, seen: dict[int, int]) -> list[float]:
    # Position 4 reads as a stop token while position 5 is masked, as token 6 once 5 is filled.
    if pos == 4:
        return peaked(STOP, 0.99) if seen.get(5, MASK) == MASK else peaked(6, 0.9)
    return peaked(7, 0.5)


def test_llada21_stop_token_ends_the_block_at_once():
    """With T2T editing on, a stop token with no mask before it ends the request immediately.  The
    reference finishes the block first, and its editing then rewrites that stop token (shown below with the
    same core steps), so the outputs differ in tokens, not only in length."""
    cfg = S2D2Config(verify=False, editing_threshold=0.5, max_post_steps=2)
    out = generate(_FakeModel(_editing_rule), _llada2_info(), [[1, 2, 3, 4]], cfg, GREEDY, max_tokens=16)[0]
    assert out.token_ids == [STOP] and out.finish_reason == "stop"
    assert out.stats.draft_forwards == 1

    # The reference's rule: keep stepping until no mask is left and an editing pass changes nothing.
    params, rules = params_for("llada2", 4, verify=False, editing_threshold=0.5, max_post_steps=2)
    state, policy = block_state([MASK] * 4, editable=[True] * 4), PolicyState.zeros(1)
    history = []
    for step in range(12):
        seen = {4 + i: t for i, t in enumerate(state.tokens[0].tolist())}
        logits = torch.tensor([[_editing_rule(4 + i, seen) for i in range(4)]])
        draft, policy = draft_step(logits, state._replace(step=torch.tensor([step]),
                                                          counter=torch.tensor([step])), params, rules, policy)
        result, policy = finish_step(state, draft, None, None, None, params, policy)
        history.append(result.tokens[0].tolist())
        if not (result.tokens == MASK).any() and torch.equal(result.tokens, state.tokens):
            break
        state = state._replace(tokens=result.tokens)
    assert history[0] == [STOP, MASK, MASK, MASK]  # where the project stops
    assert history[-1][0] == 6 and STOP not in history[-1]  # the reference edits the stop token away


def test_fast_dllm_v2_prompt_of_exactly_one_block_is_prefilled():
    """The reference prefills only when ``prompt_len > block_size`` (strict), so a prompt of exactly one block
    is never fed to the model.  The project always prefills the whole prompt: the first generated token (the
    argmax of the prompt's last logit) depends on the prompt."""
    info = FamilyInfo("fast_dllm_v2", "Fast_dLLM_QwenForCausalLM", 4, MASK, (STOP,), True, V)

    def rule(pos, seen):  # every row predicts "first prompt token + 1"
        return peaked(seen[0] + 1, 0.95)

    for prompt in ([1, 2, 3, 4], [3, 2, 3, 4]):
        out = generate(_FakeModel(rule), info, [prompt], S2D2Config(verify=False), GREEDY, max_tokens=1)[0]
        assert out.stats.prefill_forwards == 1
        assert out.token_ids == [prompt[0] + 1]
