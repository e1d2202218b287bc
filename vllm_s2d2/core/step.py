"""One S2D2 step, batched over requests: draft -> route -> (verify -> accept) -> commit.

The engine and the reference decoder both drive decoding through these three calls:

1. :func:`draft_step` on the draft forward's logits: sample x0/p0 for every position, LLaDA2.1 edits,
   find the span, estimate K-hat, score, route (per-request policy) and compute the baseline commit.
2. :func:`verify_step` on the verifier's logits, for the rows that chose to verify: accept/reject the span
   against q, resample the first rejection, top up to the quota (SDAR/LLaDA2).
3. :func:`finish_step`: pick each row's commit (verified or baseline), write tokens and edits into the block
   and update the bandit's statistics.

Logits must be position-aligned (``logits[:, i]`` predicts block position i); for shifted families that is
logit ``i - 1`` (:func:`align_shifted_logits`).  Random numbers come from :mod:`vllm_s2d2.core.rng` keyed by
each request's seed and step counter, so results do not depend on batch composition.  What happens around a
step (region, draft_ver prefix, editing passes, early finish, canvases) is :mod:`vllm_s2d2.core.block`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from vllm_s2d2.core import pipeline, reductions, rng
from vllm_s2d2.core.acceptance import accept_span
from vllm_s2d2.core.estimators import acceptance_estimate, draft_stats, expected_accepted
from vllm_s2d2.core.params import FamilyRules, StepParams
from vllm_s2d2.core.policies import PolicyState, route, score, ucb_bucket, ucb_update
from vllm_s2d2.core.sampling import exclude_token, sample, transform_probs
from vllm_s2d2.core.spans import first_mask_span
from vllm_s2d2.core.unmasking import editing_positions, remask_commit, threshold_plus_argmax


def align_shifted_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shift-aligned models (logit i predicts token i+1): out[:, i] = logits[:, i-1], out[:, 0] = logits[:, 0].

    Position 0's value is meaningless; Fast-dLLM v2 never leaves block position 0 masked."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def shifted_next_token(last_logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Shift-aligned models: the token after a stored prefix, argmax of the prefix's last logit (``[R, V]`` ->
    ``[R]``), the mask token excluded (a block's first token comes from the previous forward, and a predicted
    ``<MASK>`` would leave the block's first position masked for good; ``docs/lifecycle.md``)."""
    return exclude_token(last_logits, mask_token_id).argmax(dim=-1)


class BlockState(NamedTuple):
    tokens: torch.Tensor  # [R, B] current block, mask id at masked positions
    editable: torch.Tensor  # [R, B] bool, generated (non-prompt) positions
    region: torch.Tensor  # [R, B] bool, positions this step may unmask (core.block.step_region)
    step: torch.Tensor  # [R] denoising step index inside the block (quota lookup)
    counter: torch.Tensor  # [R] RNG counter (one value per step)
    # Pipelined families (D2F): the window of blocks that ``tokens`` flattens (``[R, A*B]``); None otherwise.
    window: pipeline.Window | None = None


@dataclass
class Draft:
    probs: torch.Tensor  # [R, B, V] draft distribution p
    x0: torch.Tensor  # [R, B] drafted tokens
    p0: torch.Tensor  # [R, B] their probabilities
    is_mask: torch.Tensor  # [R, B]
    eligible: torch.Tensor  # [R, B] masked and inside the region
    edits: torch.Tensor  # [R, B] LLaDA2.1 T2T edits scheduled this step
    first_half: torch.Tensor  # [R, B] block with masks (and edits) replaced by x0: the verifier's input
    span: torch.Tensor  # [R, B] bool, first contiguous masked run in the region
    span_length: torch.Tensor  # [R]
    k_hat: torch.Tensor  # [R]
    score: torch.Tensor  # [R]
    quota: torch.Tensor  # [R]
    baseline_commit: torch.Tensor  # [R, B] what the baseline rule commits (used when not verifying)
    do_verify: torch.Tensor  # [R] bool
    routed: torch.Tensor  # [R] bool, the policy was consulted
    bucket: torch.Tensor  # [R] UCB context bucket

    def index(self, rows: torch.Tensor) -> "Draft":
        return Draft(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


class StepResult(NamedTuple):
    tokens: torch.Tensor  # [R, B] the block after this step
    committed: torch.Tensor  # [R, B] bool, masks filled this step
    num_committed: torch.Tensor  # [R]
    num_accepted: torch.Tensor  # [R] accepted draft tokens (0 when not verified)


def draft_probs(logits: torch.Tensor, params: StepParams, rules: FamilyRules) -> torch.Tensor:
    """``[R, B, V]`` fp32 sampling distribution of position-aligned logits: the mask token excluded, then
    temperature / top-k / top-p.  The draft's p, the verifier's q, and p again where a verification recomputes
    it from saved draft logits, all come from it."""
    return transform_probs(logits, params.temperature, params.top_k, params.top_p, exclude_id=rules.mask_token_id)


def draft_uniforms(seed: torch.Tensor, counter: torch.Tensor, B: int) -> torch.Tensor:
    """``[R, B]`` the draft's inverse-CDF uniforms at RNG ``counter`` (:func:`draft_step` computes them unless
    given)."""
    return rng.uniform(seed, counter, rng.STREAM_DRAFT, B)


def verify_uniforms(seed: torch.Tensor, counter: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([R, B], [R, 1])`` the acceptance and resampling uniforms of a verification whose draft had ``counter``
    (:func:`verify_step` computes them unless given)."""
    return rng.uniform_pair(seed, counter, rng.STREAM_ACCEPT, B, rng.STREAM_RESAMPLE, 1)


def draft_step(logits: torch.Tensor, block: BlockState, params: StepParams, rules: FamilyRules,
               policy_state: PolicyState, *, route_any: bool = True, any_sampled: bool = True,
               uniforms: torch.Tensor | None = None) -> tuple[Draft, PolicyState]:
    """Everything decided from the draft forward alone: sample, edits, span, K-hat, score, route, baseline
    commit (``docs/algorithm.md``).

    Two host-side facts of the batch let the engine skip work whose result no row uses: ``route_any=False``
    (no request may verify: the estimators, K-hat, score and routing are skipped -- zeros, no row routed, the
    policy state unchanged, exactly what routing with ``params.verify`` off gives) and ``any_sampled=False``
    (every request greedy: no inverse-CDF draw).  ``uniforms``: :func:`draft_uniforms`, computed by the caller
    (the engine fuses the integer hash into an earlier stage; the same numbers)."""
    R, B, _ = logits.shape
    probs = draft_probs(logits, params, rules)
    u = None  # (greedy: unused)
    if any_sampled:
        u = uniforms if uniforms is not None else draft_uniforms(params.seed, block.counter, B)
    x0, p0 = sample(probs, params.greedy, u, any_sampled)
    is_mask = block.tokens == rules.mask_token_id
    eligible = is_mask & block.region
    edits = editing_positions(x0, p0, block.tokens, is_mask, block.editable, params.editing_threshold)
    first_half = torch.where(is_mask | edits, x0, block.tokens)
    window = block.window
    span = first_mask_span(is_mask, block.region) if window is None else pipeline.window_span(window,
                                                                                                rules.mask_token_id)

    if window is None:
        n_high_conf = (eligible & (p0 > params.confidence_threshold[:, None])).sum(dim=1)
        baseline_d2f = None
    else:  # D2F: what plain D2F would commit this step (its per-block threshold rule)
        baseline_d2f = pipeline.baseline_commit(window, p0.view(window.tokens.shape), params.confidence_threshold,
                                                rules.mask_token_id).view(R, B)
        n_high_conf = baseline_d2f.sum(dim=1)
    if route_any:
        k_hat, s, bucket, routed, do_verify, policy_state = _route_draft(
            probs, p0, block, params, policy_state, is_mask, eligible, span, n_high_conf)
    else:
        k_hat = s = torch.zeros(R, dtype=torch.float32, device=logits.device)
        bucket = torch.zeros(R, dtype=torch.int64, device=logits.device)
        routed = do_verify = torch.zeros(R, dtype=torch.bool, device=logits.device)

    step = block.step.clamp(max=params.quota.shape[1] - 1)
    quota = torch.minimum(params.quota.gather(1, step[:, None]).squeeze(1), eligible.sum(dim=1))
    conf = torch.where(eligible, p0, torch.zeros_like(p0))
    if baseline_d2f is not None:
        baseline = baseline_d2f
    elif rules.threshold_rule:
        baseline = threshold_plus_argmax(conf, eligible, params.confidence_threshold)
    else:
        baseline = remask_commit(params.remasking, conf, eligible, quota, params.confidence_threshold)
    draft = Draft(probs, x0, p0, is_mask, eligible, edits, first_half, span.mask, span.length, k_hat, s, quota,
                  baseline, do_verify, routed, bucket)
    return draft, policy_state


def _route_draft(probs, p0, block: BlockState, params: StepParams, policy_state: PolicyState, is_mask, eligible,
                 span, n_high_conf):
    """The draft's routing: per-position acceptance estimates -> K-hat -> score -> the UCB context -> each
    request's policy.  Returns ``(k_hat, score, bucket, routed, do_verify, policy_state)``."""
    window = block.window
    stats = draft_stats(probs)
    alpha = acceptance_estimate(params.estimator, stats, p0, entropy_temperature=params.entropy_temperature,
                                margin_threshold=params.margin_threshold,
                                entropy_threshold=params.entropy_threshold,
                                confidence_power=params.confidence_power, margin_coef=params.margin_coef)
    k_hat = expected_accepted(alpha, span.mask)
    s = score(params.score_type, k_hat, n_high_conf, params.penalty, span.length)

    # UCB context over the decoding window (block, Fast-dLLM v2 sub-block, or D2F's ACTIVE blocks): progress
    # counts tokens decoded in it (not the prompt tail); the "masked" entropy source averages its masks.
    ucb_region = block.region if window is None else (window.status == pipeline.ACTIVE).repeat_interleave(
        window.tokens.shape[2], dim=1)
    window_size = ucb_region.sum(dim=1)
    entropy_over = torch.where(params.ucb_entropy_masked[:, None], eligible, span.mask)
    mean_entropy = reductions.row_sum(stats.entropy * entropy_over) / entropy_over.sum(1).clamp_min(1)
    progress = (~is_mask & block.editable & ucb_region).sum(dim=1).float() / window_size.clamp_min(1)
    bucket = ucb_bucket(span.length, window_size, progress, mean_entropy)
    routed = params.verify & (span.length > 0)
    do_verify, policy_state = route(params.policy, routed, span.length, s, bucket, policy_state,
                                    min_span=params.min_span, threshold=params.score_threshold,
                                    hysteresis_on=params.hysteresis_on, hysteresis_off=params.hysteresis_off,
                                    ucb_beta=params.ucb_beta)
    return k_hat, s, bucket, routed, do_verify, policy_state


def verify_step(draft: Draft, q_logits: torch.Tensor, params: StepParams, rules: FamilyRules,
                counter: torch.Tensor, window: pipeline.Window | None = None,
                uniforms: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept the span against the verifier and top up to the quota (rows = verifying requests only).

    ``q_logits [R, B, V]``: the verifier's logits aligned to block positions (SDAR/LLaDA2: the mask half of
    the 2L forward; Fast-dLLM v2 / D2F Dream: the shifted causal forward).  ``window``: the D2F window the
    block flattens (then every fully activated block is topped up to ``min_tokens_per_step``).  ``uniforms``:
    :func:`verify_uniforms` of ``counter``, when the caller computed them.  Returns (commit [R, B], tokens [R, B],
    num_accepted [R])."""
    R, B, _ = q_logits.shape
    q = draft_probs(q_logits, params, rules)  # the same transform as the draft's p
    run = params.partial_accept_run
    if run is not None:  # later accepted runs count from a request's second step on
        run = torch.where(counter > 0, run, torch.zeros_like(run))
    u_accept, u_resample = uniforms if uniforms is not None else verify_uniforms(params.seed, counter, B)
    verdict = accept_span(
        draft.x0, draft.probs, q, draft.span, u_accept, u_resample[:, 0],
        greedy=params.greedy_accept, ratio_tempering=params.ratio_tempering,
        allow_resample=params.allow_resample, ratio_threshold=params.ratio_threshold,
        keep_rejected_draft=rules.keep_rejected_draft, min_draft_confidence=params.min_draft_confidence,
        resample_min_q=params.resample_min_q, partial_accept_run=run)
    commit, tokens = verdict.commit, verdict.tokens
    # Optional: other masks above tau, counted toward the quota (off in every paper config).
    high = (draft.eligible & ~commit & params.always_check_high_confidence[:, None]
            & (draft.p0 > params.confidence_threshold[:, None]))
    commit = commit | high
    if window is not None:
        # D2F: every fully activated block gets at least min_tokens_per_step this step.
        shape = window.tokens.shape
        commit = commit | pipeline.fallback_commit(window, draft.p0.view(shape), commit.view(shape),
                                                   params.confidence_threshold, params.min_tokens_per_step,
                                                   rules.mask_token_id).view(R, B)
    elif rules.fallback_to_quota:
        # SDAR / LLaDA2: top up with the remasking rule only while the step is short of its quota.
        remaining = draft.eligible & ~commit
        conf = torch.where(remaining, draft.p0, torch.zeros_like(draft.p0))
        k_left = (draft.quota - commit.sum(dim=1)).clamp_min(0)
        commit = commit | remask_commit(params.remasking, conf, remaining, k_left, params.confidence_threshold)
    else:
        # Fast-dLLM v2: a verification that committed nothing (first token rejected, no resampling) falls
        # back to the threshold rule so the step cannot stall.
        nothing = commit.sum(dim=1) == 0
        commit = torch.where(nothing[:, None], draft.baseline_commit, commit)
    return commit, torch.where(draft.span, tokens, draft.x0), verdict.num_accepted


def finish_step(block: BlockState, draft: Draft, verified_commit: torch.Tensor | None,
                verified_tokens: torch.Tensor | None, num_accepted: torch.Tensor | None, params: StepParams,
                policy_state: PolicyState, *, route_any: bool = True) -> tuple[StepResult, PolicyState]:
    """Apply each row's commit (verified rows: the verifier's; others: the baseline) and the edits.

    ``verified_*`` are full-batch ``[R, B]`` tensors whose rows matter only where ``draft.do_verify``
    (pass None when nothing verified).  ``route_any=False``: the draft came from ``draft_step(route_any=False)``,
    so no row was routed and the bandit update, which changes only routed rows, is skipped."""
    v = draft.do_verify[:, None]
    if verified_commit is None:
        commit, tokens = draft.baseline_commit, draft.x0
        accepted = torch.zeros_like(draft.span_length)
    else:
        commit = torch.where(v, verified_commit, draft.baseline_commit)
        tokens = torch.where(v, verified_tokens, draft.x0)
        accepted = torch.where(draft.do_verify, num_accepted, torch.zeros_like(num_accepted))
    new_tokens = torch.where(commit | draft.edits, tokens, block.tokens)
    n = commit.sum(dim=1)
    if route_any:
        policy_state = ucb_update(policy_state, params.policy, draft.routed, draft.bucket, draft.do_verify, n)
    return StepResult(new_tokens, commit, n, accepted), policy_state
