"""Unit tests for ``vllm_s2d2.s2d2_config``: knobs, family defaults, presets (``docs/families.md``)."""

from __future__ import annotations

import json
import math
import re

import pytest

from vllm_s2d2.s2d2_config import (ESTIMATORS, FAMILIES, POLICIES, PRESETS, REMASKING, SCORES, S2D2Config)

CKPT = {"sdar": 4, "fast_dllm_v2": 32, "llada2": 32, "d2f_dream": 32, "d2f_llada": 32}


def resolve(family, **kw):
    return S2D2Config(**kw).resolve(family, CKPT[family])


def raises_naming(option: str):
    return pytest.raises(ValueError, match=re.escape(option))


# ----------------------------------------------------------------------------------------------------
# defaults
# ----------------------------------------------------------------------------------------------------

COMMON_DEFAULTS = dict(
    verify=True, min_span_length=1, ucb_beta=1.0, ucb_entropy_source="span",
    token_acceptance_estimator="soft_entropy_negexp", entropy_temperature=1.0, margin_threshold=0.05,
    acceptance="stochastic", ratio_tempering=1.0, allow_resample=True, ratio_threshold=-1.0,
    always_check_high_confidence=False, editing_threshold=None, max_post_steps=0,
    remasking="low_confidence_dynamic",
)


def _check(cfg, expected):
    for k, v in expected.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)


def test_unresolved_defaults_are_family_placeholders():
    c = S2D2Config()
    for name in ("block_size", "denoising_steps", "sub_block_size", "remasking", "confidence_threshold",
                 "cache_ver", "draft_ver", "verify_policy", "score_type", "score_penalty_coef",
                 "score_threshold", "hysteresis_on", "hysteresis_off", "editing_threshold"):
        assert getattr(c, name) is None, name
    assert c.token_acceptance_estimator == "soft_entropy_negexp"  # paper, not the code default


def test_sdar_defaults_config_a():
    c = resolve("sdar")
    _check(c, COMMON_DEFAULTS)
    # SDAR Config-A (paper): B = S = 4, score_threshold 0, difference_static, c = 1, dynamic 0.85, cache/draft_ver
    _check(c, dict(block_size=4, denoising_steps=4, sub_block_size=4, confidence_threshold=0.85,
                   cache_ver=True, draft_ver=True, verify_policy="score_threshold",
                   score_type="difference_static", score_penalty_coef=1.0, score_threshold=0.0,
                   hysteresis_on=0.0, hysteresis_off=-1.0))


def test_sdar_block_size_override_sets_steps():
    c = resolve("sdar", block_size=16)
    assert (c.block_size, c.denoising_steps, c.sub_block_size) == (16, 16, 16)
    c = resolve("sdar", block_size=16, denoising_steps=4)
    assert (c.block_size, c.denoising_steps) == (16, 4)


def test_fast_defaults_config_a():
    c = resolve("fast_dllm_v2")
    _check(c, COMMON_DEFAULTS)
    # Fast-dLLM v2 Config-A: threshold 0.9, SB 4, hysteresis 1 / -5, difference_dynamic, c = 1, no AR caching
    _check(c, dict(block_size=32, sub_block_size=4, confidence_threshold=0.9, cache_ver=False, draft_ver=False,
                   verify_policy="score_hysteresis", score_type="difference_dynamic", score_penalty_coef=1.0,
                   hysteresis_on=1.0, hysteresis_off=-5.0))


def test_llada2_defaults_conservative():
    c = resolve("llada2")
    _check(c, COMMON_DEFAULTS)
    # LLaDA2.1 "Conservative": tau_mask 0.95, score_threshold -5, static, c = 4; editing off unless set
    _check(c, dict(block_size=32, denoising_steps=32, sub_block_size=32, confidence_threshold=0.95,
                   cache_ver=False, draft_ver=False, verify_policy="score_threshold",
                   score_type="difference_static", score_penalty_coef=4.0, score_threshold=-5.0))
    assert resolve("llada2", editing_threshold=0.9).editing_threshold == 0.9


def test_resolve_keeps_user_values_and_returns_new_object():
    base = S2D2Config(score_threshold=0.5, confidence_threshold=0.7, verify_policy="mask_span_length",
                      min_span_length=2)
    c = base.resolve("sdar", 4)
    assert c is not base
    assert base.block_size is None  # the original is not mutated
    _check(c, dict(score_threshold=0.5, confidence_threshold=0.7, verify_policy="mask_span_length",
                   min_span_length=2, score_type="difference_static"))


def test_resolve_is_idempotent():
    for fam in FAMILIES:
        c = resolve(fam)
        assert c.resolve(fam, CKPT[fam]).to_dict() == c.to_dict()


def test_unknown_family():
    with pytest.raises(ValueError, match="family"):
        S2D2Config().resolve("dream", 32)


# ----------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------

PRESET_FAMILY = {"sdar-a": "sdar", "sdar-b": "sdar", "fast-a": "fast_dllm_v2", "fast-b": "fast_dllm_v2",
                 "fast-c": "fast_dllm_v2", "llada2-conservative": "llada2", "llada2-quality": "llada2",
                 "d2f-dream": "d2f_dream", "d2f-llada": "d2f_llada"}


def test_preset_list():
    assert set(PRESETS) == set(PRESET_FAMILY)


def test_family_table_feeds_the_config():
    """The presets, defaults and per-family knob lists come from the one family registry (vllm_s2d2.families)
    and name only valid options."""
    import dataclasses

    from vllm_s2d2.families import TABLE
    from vllm_s2d2.s2d2_config import FAMILY_DEFAULTS, FAMILY_ESTIMATORS, FAMILY_POLICIES

    assert FAMILIES == tuple(f.name for f in TABLE)
    assert {name: f.name for f in TABLE for name in f.presets} == PRESET_FAMILY
    fields = {fl.name for fl in dataclasses.fields(S2D2Config)}
    for f in TABLE:
        assert FAMILY_DEFAULTS[f.name] == dict(f.defaults) and set(f.defaults) <= fields
        assert all(set(p) <= fields for p in f.presets.values())
        assert FAMILY_ESTIMATORS[f.name] == f.estimators and set(f.estimators) <= set(ESTIMATORS)
        assert FAMILY_POLICIES[f.name] == f.policies and set(f.policies) <= set(POLICIES)
    assert FAMILY_ESTIMATORS["sdar"] == ESTIMATORS and FAMILY_POLICIES["sdar"] == POLICIES


@pytest.mark.parametrize("name", sorted(PRESET_FAMILY))
def test_every_preset_loads_and_resolves(name):
    fam = PRESET_FAMILY[name]
    c = S2D2Config.from_dict({"preset": name})
    assert c.preset == name
    r = c.resolve(fam, CKPT[fam])
    assert r.token_acceptance_estimator == "soft_entropy_negexp"
    for k, v in PRESETS[name].items():
        assert getattr(r, k) == v, (name, k)


def test_preset_values_by_hand():
    r = S2D2Config.from_dict({"preset": "sdar-b"}).resolve("sdar", 4)
    _check(r, dict(block_size=16, denoising_steps=16, score_penalty_coef=0.0, score_threshold=0.0,
                   score_type="difference_static", cache_ver=True, draft_ver=True))
    r = S2D2Config.from_dict({"preset": "fast-b"}).resolve("fast_dllm_v2", 32)
    _check(r, dict(sub_block_size=16, verify_policy="score_hysteresis", hysteresis_on=1.0, hysteresis_off=-5.0))
    r = S2D2Config.from_dict({"preset": "fast-c"}).resolve("fast_dllm_v2", 32)
    _check(r, dict(sub_block_size=32, verify_policy="mask_span_length", min_span_length=8))
    r = S2D2Config.from_dict({"preset": "llada2-quality"}).resolve("llada2", 32)
    _check(r, dict(confidence_threshold=0.7, editing_threshold=0.5, score_threshold=0.0, score_penalty_coef=4.0))
    r = S2D2Config.from_dict({"preset": "llada2-conservative"}).resolve("llada2", 32)
    _check(r, dict(confidence_threshold=0.95, editing_threshold=0.9, score_threshold=-5.0, score_penalty_coef=4.0))


# ----------------------------------------------------------------------------------------------------
# from_dict / from_json / replace
# ----------------------------------------------------------------------------------------------------

def test_from_dict():
    assert S2D2Config.from_dict(None).to_dict() == S2D2Config().to_dict()
    assert S2D2Config.from_dict({}).to_dict() == S2D2Config().to_dict()
    c = S2D2Config.from_dict({"method": "s2d2", "score_threshold": 1.5, "verify_policy": "score_threshold"})
    assert c.score_threshold == 1.5 and c.verify_policy == "score_threshold"
    # explicit keys override the preset
    c = S2D2Config.from_dict({"preset": "sdar-a", "score_penalty_coef": 2.0, "block_size": 8})
    assert (c.score_penalty_coef, c.block_size, c.denoising_steps, c.confidence_threshold) == (2.0, 8, 4, 0.85)


def test_from_json():
    c = S2D2Config.from_json(json.dumps({"preset": "fast-a", "sub_block_size": 8}))
    assert (c.sub_block_size, c.verify_policy, c.hysteresis_on) == (8, "score_hysteresis", 1.0)
    assert S2D2Config.from_json("").to_dict() == S2D2Config().to_dict()
    assert S2D2Config.from_json(None).to_dict() == S2D2Config().to_dict()
    c = S2D2Config.from_json('{"verify": false, "allow_resample": false}')
    assert c.verify is False and c.allow_resample is False


def test_replace():
    c = S2D2Config(score_threshold=1.0)
    d = c.replace(score_penalty_coef=3.0)
    assert (d.score_threshold, d.score_penalty_coef) == (1.0, 3.0)
    assert c.score_penalty_coef is None  # original unchanged
    with raises_naming("bogus"):
        c.replace(bogus=1)
    with raises_naming("confidence_threshold"):
        c.replace(confidence_threshold=2.0)
    with raises_naming("preset"):
        c.replace(preset="sdar-b")  # presets are applied by from_dict, never silently over other fields
    # a resolved config can be modified and re-resolved
    r = resolve("sdar").replace(score_threshold=0.5).resolve("sdar", 4)
    assert r.score_threshold == 0.5


def test_to_dict_roundtrip():
    c = resolve("llada2", editing_threshold=0.5)
    assert S2D2Config.from_dict(c.to_dict()).to_dict() == c.to_dict()
    assert S2D2Config.from_json(json.dumps(c.to_dict())).to_dict() == c.to_dict()


# ----------------------------------------------------------------------------------------------------
# invalid values: each raises ValueError naming the option
# ----------------------------------------------------------------------------------------------------

INVALID = [
    # bad choices
    ("remasking", "entropy_bounded"), ("remasking", "LOW_CONFIDENCE_DYNAMIC"), ("verify_policy", "always"),
    ("score_type", "difference"), ("token_acceptance_estimator", "entropy"), ("acceptance", "deterministic"),
    ("ucb_entropy_source", "block"),
    # out-of-range numbers
    ("confidence_threshold", -0.01), ("confidence_threshold", 1.01), ("editing_threshold", 1.5),
    ("editing_threshold", -0.1), ("score_penalty_coef", -1.0), ("ucb_beta", -0.5), ("entropy_temperature", 0.0),
    ("entropy_temperature", -1.0), ("margin_threshold", -0.01), ("margin_threshold", 1.01),
    ("entropy_threshold", 1.5), ("entropy_threshold", -0.5), ("confidence_power", 0.0), ("margin_coef", 0.0),
    ("ratio_tempering", 0.0), ("ratio_tempering", -2.0), ("ratio_threshold", -1.5), ("ratio_threshold", 1.01),
    ("block_size", 0), ("block_size", -4), ("denoising_steps", 0), ("sub_block_size", 0),
    ("max_post_steps", -1), ("min_span_length", 0),
    # non-finite / wrong type numbers
    ("score_threshold", math.nan), ("score_threshold", math.inf), ("hysteresis_on", -math.inf),
    ("hysteresis_off", math.nan), ("ucb_beta", math.inf), ("confidence_threshold", "0.9"),
    ("block_size", 4.0), ("denoising_steps", "4"),
    # non-bool bools
    ("verify", 1), ("verify", "true"), ("allow_resample", 0), ("always_check_high_confidence", "no"),
    ("cache_ver", 1), ("draft_ver", "yes"), ("verify", None),
    # bool passed as int / number
    ("block_size", True), ("denoising_steps", False), ("sub_block_size", True), ("max_post_steps", True),
    ("min_span_length", True), ("confidence_threshold", True), ("ucb_beta", False), ("score_threshold", True),
    # unknown preset
    ("preset", "sdar-c"),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_value_raises_naming_option(name, value):
    with raises_naming(name):
        S2D2Config(**{name: value})
    with raises_naming(name):
        S2D2Config.from_dict({name: value})
    with raises_naming(name):
        S2D2Config().replace(**{name: value})


VALID_EDGES = [("confidence_threshold", 0.0), ("confidence_threshold", 1.0), ("confidence_threshold", 1),
               ("ratio_threshold", -1.0), ("ratio_threshold", 1.0), ("ucb_beta", 0.0), ("max_post_steps", 0),
               ("score_penalty_coef", 0.0), ("editing_threshold", 0.0), ("margin_threshold", 0.0),
               ("entropy_threshold", 1.0), ("score_threshold", -100), ("min_span_length", 1)]


@pytest.mark.parametrize("name,value", VALID_EDGES, ids=[f"{n}={v!r}" for n, v in VALID_EDGES])
def test_valid_edge_values_accepted(name, value):
    assert getattr(S2D2Config(**{name: value}), name) == value


def test_unknown_key_raises_naming_it():
    with raises_naming("block_length"):
        S2D2Config.from_dict({"block_length": 4})
    with raises_naming("foo"):
        S2D2Config.from_json('{"foo": 1, "verify": true}')


def test_invalid_json_and_json_not_object():
    with pytest.raises(ValueError, match="JSON"):
        S2D2Config.from_json("{verify: true}")
    with pytest.raises(ValueError, match="JSON"):
        S2D2Config.from_json("[1, 2]")
    with pytest.raises(ValueError, match="JSON"):
        S2D2Config.from_json('"sdar-a"')
    with pytest.raises(ValueError, match="JSON"):
        S2D2Config.from_json("null")


def test_unknown_preset():
    with raises_naming("preset"):
        S2D2Config.from_dict({"preset": "quality"})
    with raises_naming("preset"):
        S2D2Config.from_json('{"preset": "fast-d"}')


def test_hysteresis_on_must_exceed_off():
    with raises_naming("hysteresis_on"):
        S2D2Config(hysteresis_on=0.0, hysteresis_off=0.0)
    with raises_naming("hysteresis_on"):
        S2D2Config(hysteresis_on=-2.0, hysteresis_off=-1.0)
    # only one side set: checked against the family default at resolve time (Fast off = -5)
    with raises_naming("hysteresis_on"):
        resolve("fast_dllm_v2", hysteresis_on=-6.0)
    with raises_naming("hysteresis_on"):
        resolve("sdar", verify_policy="score_hysteresis", hysteresis_off=0.5)  # SDAR on = 0
    # other policies never read the hysteresis thresholds, so they are not checked there
    assert resolve("sdar", hysteresis_off=0.5).verify_policy == "score_threshold"
    assert resolve("fast_dllm_v2", hysteresis_on=-4.0).hysteresis_on == -4.0


def test_sub_block_size_must_divide_block():
    with raises_naming("sub_block_size"):
        S2D2Config(block_size=32, sub_block_size=5)
    with raises_naming("sub_block_size"):
        resolve("fast_dllm_v2", sub_block_size=5)
    for sb in (1, 2, 4, 8, 16, 32):
        assert resolve("fast_dllm_v2", sub_block_size=sb).sub_block_size == sb
    # sub_block_size is a Fast-dLLM v2 knob
    with raises_naming("sub_block_size"):
        resolve("sdar", sub_block_size=2)


def test_fast_block_size_must_match_checkpoint():
    with raises_naming("block_size"):
        resolve("fast_dllm_v2", block_size=16)


def test_denoising_steps_not_above_block_size():
    with raises_naming("denoising_steps"):
        resolve("sdar", denoising_steps=5)
    with raises_naming("denoising_steps"):
        resolve("llada2", block_size=8, denoising_steps=9)
    assert resolve("sdar", denoising_steps=4).denoising_steps == 4


def test_editing_threshold_and_post_steps_llada2_only():
    for fam in ("sdar", "fast_dllm_v2"):
        with raises_naming("editing_threshold"):
            resolve(fam, editing_threshold=0.9)
        with raises_naming("max_post_steps"):
            resolve(fam, max_post_steps=2)
    assert resolve("llada2", max_post_steps=2).max_post_steps == 2


@pytest.mark.parametrize("est", ["soft_confidence_power", "hard_entropy_threshold", "soft_clipped_linear_margin"])
def test_estimator_not_available_for_fast(est):
    with raises_naming("token_acceptance_estimator"):
        resolve("fast_dllm_v2", token_acceptance_estimator=est)
    assert resolve("sdar", token_acceptance_estimator=est).token_acceptance_estimator == est


@pytest.mark.parametrize("est", ["soft_entropy_negexp", "hard_margin_threshold", "soft_renyi_2_entropy"])
def test_estimators_available_everywhere(est):
    for fam in FAMILIES:
        assert resolve(fam, token_acceptance_estimator=est).token_acceptance_estimator == est


# Regression (reference LLaDA2/generate_utils.py offers three estimators only).  Found by this suite.
@pytest.mark.parametrize("est", ["soft_confidence_power", "hard_entropy_threshold", "soft_clipped_linear_margin"])
def test_sdar_only_estimators_rejected_for_llada2(est):
    with raises_naming("token_acceptance_estimator"):
        resolve("llada2", token_acceptance_estimator=est)


def test_ucb_policy_not_on_llada2():
    with raises_naming("verify_policy"):
        resolve("llada2", verify_policy="contextual_bandit_ucb")
    for fam in ("sdar", "fast_dllm_v2"):
        assert resolve(fam, verify_policy="contextual_bandit_ucb").verify_policy == "contextual_bandit_ucb"
    for pol in ("mask_span_length", "score_threshold", "score_hysteresis"):
        assert resolve("llada2", verify_policy=pol).verify_policy == pol


def test_ar_caching_flags_per_family():
    with raises_naming("draft_ver"):
        resolve("fast_dllm_v2", draft_ver=True)
    assert resolve("fast_dllm_v2", cache_ver=True).cache_ver is True  # the shifted-model I1 setting
    with raises_naming("draft_ver"):
        resolve("llada2", draft_ver=True)
    assert resolve("llada2", cache_ver=True).cache_ver is True
    c = resolve("sdar", cache_ver=False, draft_ver=False)
    assert (c.cache_ver, c.draft_ver) == (False, False)


def test_min_span_length_not_above_block():
    with raises_naming("min_span_length"):
        resolve("sdar", min_span_length=5)
    assert resolve("sdar", min_span_length=4).min_span_length == 4


def test_choice_sets():
    assert REMASKING == ("sequential", "low_confidence_static", "low_confidence_dynamic")
    assert set(POLICIES) == {"mask_span_length", "score_threshold", "score_hysteresis", "contextual_bandit_ucb"}
    assert set(SCORES) == {"difference_static", "difference_dynamic"}
    assert len(ESTIMATORS) == 6
