"""Every S2D2 / block-diffusion decoding knob, validated, with the paper's presets.

Names follow the paper and the reference code (phymhan/S2D2 @ 279500a); the CLI flag each one mirrors is
given in the comment.  Fields left ``None`` are *family defaults* filled by :meth:`S2D2Config.resolve` from
:mod:`vllm_s2d2.families` (each family's first paper configuration; ``docs/families.md``), as are the presets
and the knobs each family offers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from vllm_s2d2.families import BY_NAME, NAMES, TABLE

# Choice sets (order = integer code used by the batched core functions).
REMASKING = ("sequential", "low_confidence_static", "low_confidence_dynamic")
POLICIES = ("mask_span_length", "score_threshold", "score_hysteresis", "contextual_bandit_ucb")
ESTIMATORS = (
    "soft_entropy_negexp",
    "hard_margin_threshold",
    "soft_renyi_2_entropy",
    "soft_confidence_power",
    "hard_entropy_threshold",
    "soft_clipped_linear_margin",
)
SCORES = ("difference_static", "difference_dynamic")
ACCEPTANCE = ("stochastic", "greedy")
UCB_ENTROPY_SOURCES = ("span", "masked")
FAMILIES = NAMES

# Estimators and verify policies the reference code offers per family; others are rejected, not ignored.
FAMILY_ESTIMATORS: dict[str, tuple[str, ...]] = {f.name: f.estimators for f in TABLE}
FAMILY_POLICIES: dict[str, tuple[str, ...]] = {f.name: f.policies for f in TABLE}


@dataclass
class S2D2Config:
    # -- block diffusion ------------------------------------------------------------------------------
    block_size: int | None = None  # B; None = checkpoint's (SDAR 4, Fast 32, LLaDA2 32)
    denoising_steps: int | None = None  # S per block (SDAR/LLaDA2 quota); None = B
    sub_block_size: int | None = None  # Fast-dLLM v2 `small_block_size`; None = 4 (Config-A)
    remasking: str | None = None  # SDAR `--remasking_strategy`; None = low_confidence_dynamic
    confidence_threshold: float | None = None  # tau (SDAR 0.85, Fast `threshold` 0.9, LLaDA2 0.95)
    editing_threshold: float | None = None  # LLaDA2.1 T2T editing; None = off
    max_post_steps: int = 0  # LLaDA2.1 editing passes after the last mask
    cache_ver: bool | None = None  # AR-like (token-causal) KV for prefill and block commits
    draft_ver: bool | None = None  # causal rows for the block's committed prefix in draft forwards
    # -- verification ----------------------------------------------------------------------------------
    verify: bool = True  # False = plain block-diffusion baseline (no verifier forward ever)
    verify_policy: str | None = None  # `--do_verify_policy`
    min_span_length: int = 1  # tau_span, `--min_ssd_span_length`
    score_type: str | None = None  # `--ssd_score_type`
    score_penalty_coef: float | None = None  # c, `--score_penalty_coef`
    score_threshold: float | None = None  # tau_score
    hysteresis_on: float | None = None  # tau_on (strictly above turns on)
    hysteresis_off: float | None = None  # tau_off (stays on while s >= tau_off)
    ucb_beta: float = 1.0
    ucb_entropy_source: str = "span"
    token_acceptance_estimator: str = "soft_entropy_negexp"
    entropy_temperature: float = 1.0  # gamma_H of soft_entropy_negexp
    margin_threshold: float = 0.05  # hard_margin_threshold m
    entropy_threshold: float = 0.1  # hard_entropy_threshold t (CLI default)
    confidence_power: float = 0.8  # soft_confidence_power k (CLI default)
    margin_coef: float = 1.0  # soft_clipped_linear_margin coef
    # -- acceptance ------------------------------------------------------------------------------------
    acceptance: str = "stochastic"  # "greedy": accept iff draft == argmax q, correction = argmax q
    ratio_tempering: float = 1.0  # gamma in min(1, (q/p)^gamma)
    allow_resample: bool = True  # False: SDAR commits the rejected draft, Fast leaves it masked
    ratio_threshold: float = -1.0  # >= 0: also commit later span tokens with r >= it (off)
    always_check_high_confidence: bool = False  # also commit remaining masks with p0 > tau after a verify
    # -- D2F pipelining (families with `pipelined`; rejected for the others).  D2F's `skip_threshold` is
    # `confidence_threshold` above (default 0.9).  None = the family default (docs/families.md).
    block_add_threshold: float | None = None  # open the next block once the last is this decoded, (0, 1]; 0.5
    decoded_token_threshold: float | None = None  # fully activate block k+1 once block k is this decoded; 0.8
    max_active_blocks: int | None = None  # A, the engine's window of active blocks (>= 1); 4
    min_tokens_per_step: int | None = None  # after a verify, top every fully activated block up to this; 1
    verify_block_size: int | None = None  # tbs of the verifier mask, divides block_size (Dream: 1 only); 1
    accept_min_draft_confidence: float | None = None  # also require draft p0 > this to accept; None = off
    resample_min_q: float | None = None  # resample the rejected token only if q(x_j) >= this; None = always
    partial_accept_run: int | None = None  # after a rejection, commit later runs of >= n accepted tokens; 0 = off
    preset: str | None = field(default=None, repr=False)

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "S2D2Config":
        """Build from a user mapping; ``preset`` is applied first, explicit keys override it."""
        if d is not None and not isinstance(d, Mapping):
            hint = f"; for a preset pass {{'preset': {d!r}}}" if isinstance(d, str) else ""
            raise TypeError(f"S2D2Config.from_dict expects a mapping of S2D2 options (e.g. {{'preset': 'sdar-a', "
                            f"'verify': False}}), got {type(d).__name__} {d!r}{hint}")
        d = dict(d or {})
        d.pop("method", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=repr)
        if unknown:
            raise ValueError(
                f"unknown S2D2 option(s) {unknown}; valid options: {sorted(known)}")
        preset = d.get("preset")
        base: dict[str, Any] = {}
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown S2D2 preset {preset!r}; valid presets: {sorted(PRESETS)}")
            base = dict(PRESETS[preset])
        base.update(d)
        return cls(**base)

    @classmethod
    def from_json(cls, text: str | None) -> "S2D2Config":
        if not text:
            return cls()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"S2D2 config is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError("S2D2 config JSON must be an object")
        return cls.from_dict(obj)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "S2D2Config":
        """A copy with ``overrides`` applied (validated; unknown keys raise)."""
        d = {k: v for k, v in self.to_dict().items() if k != "preset"}
        known = set(d) | {"preset"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown S2D2 option(s) {unknown}; valid options: {sorted(known)}")
        if "preset" in overrides:
            raise ValueError("replace() does not apply presets; use S2D2Config.from_dict({'preset': ...})")
        d.update(overrides)
        return S2D2Config(**d)

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def choice(name: str, value: Any, options: tuple[str, ...]) -> None:
            if value is not None and value not in options:
                raise ValueError(f"S2D2 option {name}={value!r} is invalid; valid choices: {list(options)}")

        def pos_int(name: str, value: Any, allow_none: bool = True, minimum: int = 1) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"S2D2 option {name}={value!r} must be an integer >= {minimum}")

        def num(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf,
                allow_none: bool = True, lo_open: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"S2D2 option {name}={value!r} must be a finite number")
            if value < lo or value > hi or (lo_open and value == lo):
                bracket = "(" if lo_open else "["
                raise ValueError(f"S2D2 option {name}={value!r} must lie in {bracket}{lo}, {hi}]")

        def boolean(name: str, value: Any, allow_none: bool = True) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, bool):
                raise ValueError(f"S2D2 option {name}={value!r} must be true or false")

        pos_int("block_size", self.block_size)
        pos_int("denoising_steps", self.denoising_steps)
        pos_int("sub_block_size", self.sub_block_size)
        pos_int("max_post_steps", self.max_post_steps, allow_none=False, minimum=0)
        pos_int("min_span_length", self.min_span_length, allow_none=False)
        choice("remasking", self.remasking, REMASKING)
        choice("verify_policy", self.verify_policy, POLICIES)
        choice("score_type", self.score_type, SCORES)
        choice("token_acceptance_estimator", self.token_acceptance_estimator, ESTIMATORS)
        choice("acceptance", self.acceptance, ACCEPTANCE)
        choice("ucb_entropy_source", self.ucb_entropy_source, UCB_ENTROPY_SOURCES)
        num("confidence_threshold", self.confidence_threshold, 0.0, 1.0)
        num("editing_threshold", self.editing_threshold, 0.0, 1.0)
        num("score_penalty_coef", self.score_penalty_coef, 0.0)
        num("score_threshold", self.score_threshold)
        num("hysteresis_on", self.hysteresis_on)
        num("hysteresis_off", self.hysteresis_off)
        num("ucb_beta", self.ucb_beta, 0.0, allow_none=False)
        num("entropy_temperature", self.entropy_temperature, 0.0, allow_none=False, lo_open=True)
        num("margin_threshold", self.margin_threshold, 0.0, 1.0, allow_none=False)
        num("entropy_threshold", self.entropy_threshold, 0.0, 1.0, allow_none=False)
        num("confidence_power", self.confidence_power, 0.0, allow_none=False, lo_open=True)
        num("margin_coef", self.margin_coef, 0.0, allow_none=False, lo_open=True)
        num("ratio_tempering", self.ratio_tempering, 0.0, allow_none=False, lo_open=True)
        num("ratio_threshold", self.ratio_threshold, -1.0, 1.0, allow_none=False)
        for name in ("verify", "allow_resample", "always_check_high_confidence"):
            boolean(name, getattr(self, name), allow_none=False)
        boolean("cache_ver", self.cache_ver)
        boolean("draft_ver", self.draft_ver)
        self._validate_d2f_knobs(num, pos_int)
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown S2D2 preset {self.preset!r}; valid presets: {sorted(PRESETS)}")
        if (self.verify_policy in (None, "score_hysteresis") and self.hysteresis_on is not None
                and self.hysteresis_off is not None and not self.hysteresis_on > self.hysteresis_off):
            raise ValueError(
                f"S2D2 score_hysteresis needs hysteresis_on > hysteresis_off, got "
                f"{self.hysteresis_on} <= {self.hysteresis_off}")
        if (self.sub_block_size is not None and self.block_size is not None
                and self.block_size % self.sub_block_size != 0):
            raise ValueError(
                f"S2D2 option sub_block_size={self.sub_block_size} must divide block_size={self.block_size}")

    def _validate_d2f_knobs(self, num, pos_int) -> None:
        """Ranges of the D2F knobs (whether the family offers them is checked by :meth:`resolve`)."""
        num("block_add_threshold", self.block_add_threshold, 0.0, 1.0, lo_open=True)
        num("decoded_token_threshold", self.decoded_token_threshold, 0.0, 1.0)
        pos_int("max_active_blocks", self.max_active_blocks)
        pos_int("min_tokens_per_step", self.min_tokens_per_step)
        pos_int("verify_block_size", self.verify_block_size)
        num("accept_min_draft_confidence", self.accept_min_draft_confidence, 0.0, 1.0)
        num("resample_min_q", self.resample_min_q, 0.0, 1.0)
        pos_int("partial_accept_run", self.partial_accept_run, minimum=0)

    # ------------------------------------------------------------------------------------------------
    def resolve(self, family: str, checkpoint_block_size: int) -> "S2D2Config":
        """Fill family defaults and check the result against the family; returns a new config."""
        fam = BY_NAME.get(family)
        if fam is None:
            raise ValueError(f"unknown model family {family!r}; valid: {list(FAMILIES)}")
        if isinstance(checkpoint_block_size, bool) or not isinstance(checkpoint_block_size, int) \
                or checkpoint_block_size < 1:
            raise ValueError(f"checkpoint_block_size={checkpoint_block_size!r} (the checkpoint's trained block size, "
                             f"{fam.block_size_key} in its config.json) must be an integer >= 1")
        self.validate()  # fields assigned after construction (e.g. block_size = 0) are named, not met downstream
        d = self.to_dict()
        for k, v in FAMILY_DEFAULTS[family].items():
            if d.get(k) is None:
                d[k] = v
        if d["block_size"] is None:
            d["block_size"] = checkpoint_block_size
        if d["denoising_steps"] is None:
            d["denoising_steps"] = d["block_size"]
        B = d["block_size"]
        _check_d2f_knobs(d, fam)
        if fam.sub_blocks:
            if B != checkpoint_block_size:
                raise ValueError(
                    f"{fam.title} decodes with its trained block size {fam.block_size_key}={checkpoint_block_size}; "
                    f"got block_size={B}. Use sub_block_size to change the decoding granularity.")
            if B % d["sub_block_size"]:
                raise ValueError(
                    f"S2D2 option sub_block_size={d['sub_block_size']} must divide block_size={B}")
        else:
            if self.sub_block_size is not None and self.sub_block_size != B:
                raise ValueError(f"sub_block_size applies to {_sub_block_families()} only (family {family!r})")
            d["sub_block_size"] = B
        if d["draft_ver"] and not fam.draft_ver:
            raise ValueError(f"S2D2 option draft_ver=true is not available for {fam.title}")
        if fam.pipelined:
            window = d["max_active_blocks"] * B
            if d["min_span_length"] > window:
                raise ValueError(f"min_span_length={d['min_span_length']} exceeds the decoding window "
                                 f"(max_active_blocks * block_size = {window}): such a span never occurs")
        elif d["min_span_length"] > d["sub_block_size"]:
            raise ValueError(f"min_span_length={d['min_span_length']} exceeds the decoding window "
                             f"({'sub_block_size' if fam.sub_blocks else 'block_size'}="
                             f"{d['sub_block_size']}): such a span never occurs")
        if not d["allow_resample"] and not fam.resample_optional:
            raise ValueError(f"allow_resample=false is not available for {fam.title} (its verifier always resamples)")
        if fam.editing is None and d["editing_threshold"] is not None:
            raise ValueError(f"editing_threshold (T2T editing) applies to {_editing_models()} only "
                             f"(family {family!r})")
        if fam.editing is None and d["max_post_steps"]:
            raise ValueError(f"max_post_steps applies to {_editing_models()} only (family {family!r})")
        if d["token_acceptance_estimator"] not in fam.estimators:
            raise ValueError(
                f"token_acceptance_estimator={d['token_acceptance_estimator']!r} is not defined for "
                f"{family}; valid: {list(fam.estimators)}")
        if d["verify_policy"] not in fam.policies:
            raise ValueError(f"verify_policy={d['verify_policy']!r} is not defined for {family}; "
                             f"valid: {list(fam.policies)}")
        if not fam.threshold_rule and d["denoising_steps"] > B:
            # a step quota of 0 commits nothing: reject instead of spinning (the threshold rule has no quota)
            raise ValueError(f"denoising_steps={d['denoising_steps']} must be <= block_size={B}")
        if d["verify_policy"] == "score_hysteresis" and d["hysteresis_on"] <= d["hysteresis_off"]:
            raise ValueError("S2D2 score_hysteresis needs hysteresis_on > hysteresis_off")
        return S2D2Config(**d)


# Knobs of the pipelined (D2F) families only.
D2F_KNOBS = ("block_add_threshold", "decoded_token_threshold", "max_active_blocks", "min_tokens_per_step",
             "verify_block_size", "accept_min_draft_confidence", "resample_min_q", "partial_accept_run")


def _check_d2f_knobs(d: dict[str, Any], fam: Any) -> None:
    """Reject D2F knobs for other families; check those that depend on the block size or the verifier."""
    if not fam.pipelined:
        for name in D2F_KNOBS:
            if d[name] is not None:
                raise ValueError(f"S2D2 option {name} applies to {_pipelined_families()} only "
                                 f"(family {fam.name!r})")
        return
    tbs, B = d["verify_block_size"], d["block_size"]
    if fam.shifted and tbs != 1:
        raise ValueError(f"S2D2 option verify_block_size={tbs} is not available for {fam.title}: its causal "
                         f"verifier needs 1 (row i-1 would see the draft it verifies)")
    if B % tbs:
        raise ValueError(f"S2D2 option verify_block_size={tbs} must divide block_size={B}")


def _pipelined_families() -> str:
    return " / ".join(f.title for f in TABLE if f.pipelined)


def _sub_block_families() -> str:
    return " / ".join(f.title for f in TABLE if f.sub_blocks)


def _editing_models() -> str:
    return " / ".join(f.editing for f in TABLE if f.editing is not None)


# S2D2Config fields each family fills when left None.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {f.name: dict(f.defaults) for f in TABLE}

# The paper's named configurations, by name (each belongs to one family).  All use soft_entropy_negexp.
PRESETS: dict[str, dict[str, Any]] = {name: dict(p) for f in TABLE for name, p in f.presets.items()}
for _p in PRESETS.values():
    _p.setdefault("token_acceptance_estimator", "soft_entropy_negexp")
