"""Per-request knobs as batched tensors, and the per-family rules that are fixed for a model.

:class:`StepParams` turns a list of resolved :class:`~vllm_s2d2.s2d2_config.S2D2Config` plus sampling
settings (one per request) into ``[R]`` tensors, so one batched call serves requests with different
policies, estimators and thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from vllm_s2d2.core.sampling import GREEDY_TEMPERATURE
from vllm_s2d2.core.unmasking import transfer_quota
from vllm_s2d2.families import BY_NAME
from vllm_s2d2.s2d2_config import ACCEPTANCE, ESTIMATORS, POLICIES, REMASKING, SCORES, S2D2Config

EDITING_OFF = 2.0  # an editing threshold no probability exceeds


@dataclass(frozen=True)
class FamilyRules:
    """How a model family decodes; one per engine (columns of :mod:`vllm_s2d2.families`, ``docs/families.md``)."""

    family: str
    mask_token_id: int
    shifted: bool  # logit i predicts token i + 1 (Fast-dLLM v2)
    threshold_rule: bool  # non-verify step = {p > tau} + argmax in the sub-block (Fast) instead of remasking
    fallback_to_quota: bool  # after a verify, top up to the step quota with the remasking rule
    keep_rejected_draft: bool  # without resampling, commit the rejected draft (SDAR) or leave it masked
    fixed_quota: int | None  # LLaDA2: one token per step, however many steps
    pipelined: bool = False  # D2F: a window of active blocks (core.pipeline rules for the baseline and top-up)

    @classmethod
    def for_family(cls, family: str, mask_token_id: int) -> "FamilyRules":
        fam = BY_NAME.get(family)
        if fam is None:
            raise ValueError(f"unknown model family {family!r}")
        return cls(family, mask_token_id, shifted=fam.shifted, threshold_rule=fam.threshold_rule,
                   fallback_to_quota=fam.fallback_to_quota, keep_rejected_draft=fam.keep_rejected_draft,
                   fixed_quota=fam.fixed_quota, pipelined=fam.pipelined)


GREEDY_SEED = 0  # the acceptance test's seed for a greedy request that set none (SamplingSpec.default_seed)


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def default_seed(self) -> int | None:
        """The seed of a request that set none: ``GREEDY_SEED`` for a greedy request, None (the caller draws
        one) for a sampled one.  S2D2's acceptance test min(1, q/p) is random even when every token is an
        argmax, so without a fixed seed a temperature-0 request could give another output on every run."""
        return GREEDY_SEED if self.greedy else None


@dataclass
class StepParams:
    temperature: torch.Tensor
    top_k: torch.Tensor | None  # None when no request filters (host-side fact: no sort needed)
    top_p: torch.Tensor | None
    greedy: torch.Tensor
    seed: torch.Tensor
    remasking: torch.Tensor
    confidence_threshold: torch.Tensor
    quota: torch.Tensor  # [R, S_max] tokens per denoising step
    editing_threshold: torch.Tensor
    verify: torch.Tensor
    policy: torch.Tensor
    min_span: torch.Tensor
    score_type: torch.Tensor
    penalty: torch.Tensor
    score_threshold: torch.Tensor
    hysteresis_on: torch.Tensor
    hysteresis_off: torch.Tensor
    ucb_beta: torch.Tensor
    ucb_entropy_masked: torch.Tensor
    estimator: torch.Tensor
    entropy_temperature: torch.Tensor
    margin_threshold: torch.Tensor
    entropy_threshold: torch.Tensor
    confidence_power: torch.Tensor
    margin_coef: torch.Tensor
    greedy_accept: torch.Tensor
    ratio_tempering: torch.Tensor
    allow_resample: torch.Tensor
    ratio_threshold: torch.Tensor
    always_check_high_confidence: torch.Tensor
    # D2F (pipelined families; neutral values for the others)
    block_add_threshold: torch.Tensor  # [R] open the next block at this progress of the last one
    decoded_token_threshold: torch.Tensor  # [R] fully activate a block at this ratio of its predecessor
    min_tokens_per_step: torch.Tensor  # [R] long, top-up per fully activated block after a verify
    min_draft_confidence: torch.Tensor | None  # [R] accept only drafts with p0 above (-1 = off); None: no row
    resample_min_q: torch.Tensor | None  # [R] resample the rejection only if q(x_j) >= it (-1 = off); None: no row
    partial_accept_run: torch.Tensor | None  # [R] long, commit later accepted runs this long (0 = off); None: no row

    @classmethod
    def build(cls, configs: Sequence[S2D2Config], sampling: Sequence[SamplingSpec], rules: FamilyRules,
              device: torch.device | str = "cpu") -> "StepParams":
        """``configs`` must be resolved (:meth:`S2D2Config.resolve`); a seed None becomes
        :meth:`SamplingSpec.default_seed`, or a random one for a sampled request."""
        if len(configs) != len(sampling):
            raise ValueError("one S2D2Config and one SamplingSpec per request")
        f = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)  # noqa: E731
        i = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        b = lambda xs: torch.tensor(xs, dtype=torch.bool, device=device)  # noqa: E731
        quotas = []
        for c in configs:
            if rules.fixed_quota is not None:
                quotas.append([rules.fixed_quota])
            else:
                quotas.append(transfer_quota(c.block_size, c.denoising_steps))
        width = max(len(q) for q in quotas)
        quotas = [q + [q[-1]] * (width - len(q)) for q in quotas]
        seeds = [s.seed if s.seed is not None else s.default_seed() for s in sampling]
        seeds = [int(torch.randint(0, 2**62, (1,)).item()) if x is None else x for x in seeds]
        return cls(
            temperature=f([s.temperature for s in sampling]),
            top_k=i([s.top_k for s in sampling]) if any(s.top_k > 0 for s in sampling) else None,
            top_p=f([s.top_p for s in sampling]) if any(s.top_p < 1.0 for s in sampling) else None,
            greedy=b([s.greedy for s in sampling]),
            seed=i(seeds),
            remasking=i([REMASKING.index(c.remasking) for c in configs]),
            confidence_threshold=f([c.confidence_threshold for c in configs]),
            quota=i(quotas),
            editing_threshold=f([EDITING_OFF if c.editing_threshold is None else c.editing_threshold
                                 for c in configs]),
            verify=b([c.verify for c in configs]),
            policy=i([POLICIES.index(c.verify_policy) for c in configs]),
            min_span=i([c.min_span_length for c in configs]),
            score_type=i([SCORES.index(c.score_type) for c in configs]),
            penalty=f([c.score_penalty_coef for c in configs]),
            score_threshold=f([c.score_threshold for c in configs]),
            hysteresis_on=f([c.hysteresis_on for c in configs]),
            hysteresis_off=f([c.hysteresis_off for c in configs]),
            ucb_beta=f([c.ucb_beta for c in configs]),
            ucb_entropy_masked=b([c.ucb_entropy_source == "masked" for c in configs]),
            estimator=i([ESTIMATORS.index(c.token_acceptance_estimator) for c in configs]),
            entropy_temperature=f([c.entropy_temperature for c in configs]),
            margin_threshold=f([c.margin_threshold for c in configs]),
            entropy_threshold=f([c.entropy_threshold for c in configs]),
            confidence_power=f([c.confidence_power for c in configs]),
            margin_coef=f([c.margin_coef for c in configs]),
            greedy_accept=b([c.acceptance == ACCEPTANCE[1] for c in configs]),
            ratio_tempering=f([c.ratio_tempering for c in configs]),
            allow_resample=b([c.allow_resample for c in configs]),
            ratio_threshold=f([c.ratio_threshold for c in configs]),
            always_check_high_confidence=b([c.always_check_high_confidence for c in configs]),
            block_add_threshold=f([_or(c.block_add_threshold, 1.0) for c in configs]),
            decoded_token_threshold=f([_or(c.decoded_token_threshold, 1.0) for c in configs]),
            min_tokens_per_step=i([_or(c.min_tokens_per_step, 1) for c in configs]),
            min_draft_confidence=_optional(f, [c.accept_min_draft_confidence for c in configs], -1.0),
            resample_min_q=_optional(f, [c.resample_min_q for c in configs], -1.0),
            partial_accept_run=_optional(i, [c.partial_accept_run or None for c in configs], 0),
        )

    def index(self, rows: torch.Tensor) -> "StepParams":
        """The parameters of a subset of requests (rows of every tensor)."""
        return StepParams(**{fl.name: (None if getattr(self, fl.name) is None else getattr(self, fl.name)[rows])
                             for fl in fields(self)})


def _or(value, default):
    return default if value is None else value


def _optional(make, values: list, off) -> torch.Tensor | None:
    """``[R]`` tensor of ``values`` (None -> ``off``), or None when no request sets one (no work for the batch)."""
    if all(v is None for v in values):
        return None
    return make([off if v is None else v for v in values])
