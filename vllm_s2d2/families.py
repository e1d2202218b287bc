"""The block-diffusion families (SDAR, Fast-dLLM v2, LLaDA2.x, D2F): one table of everything that differs between them.

Pure data, standard library only, so every layer may read it: ``configs`` (checkpoint defaults), ``s2d2_config``
(S2D2 defaults, presets, allowed knobs), ``core.params`` (decoding rules), ``reference.models`` (which backbone a
checkpoint loads) and the package root (vLLM model classes).  ``docs/families.md`` explains the columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["Architecture", "Family", "TABLE", "NAMES", "BY_NAME", "BY_ARCHITECTURE", "BY_MODEL_TYPE",
           "BACKBONES"]


@dataclass(frozen=True)
class Architecture:
    name: str  # an HF ``architectures`` entry
    model_type: str  # the ``model_type`` of its config.json
    vllm_class: str  # "module:Class" registered (lazily) with vLLM's ModelRegistry


@dataclass(frozen=True)
class Family:
    name: str
    title: str  # in messages
    architectures: tuple[Architecture, ...]
    backbones: Mapping[str, str]  # config.json model_type -> the reference decoder's backbone

    # -- checkpoint config (configs.family_info); the mask id is config.json's `mask_token_id`, else the default
    block_size_key: str  # config key of the trained block size (then `block_size`, then the default)
    default_block_size: int
    default_mask_token_id: int
    default_stop_token_ids: tuple[int, ...]  # when neither config nor generation_config names an eos
    shifted: bool  # logit i predicts token i + 1, and verification is a causal forward (else 2L, aligned)

    # -- decoding rules (core.params.FamilyRules)
    threshold_rule: bool  # a non-verify step commits {p > tau} + argmax in the sub-block, not by remasking quota
    fallback_to_quota: bool  # after a verify, top up to the step quota with the remasking rule
    keep_rejected_draft: bool  # without resampling, commit the rejected draft (else leave it masked)
    fixed_quota: int | None  # tokens per denoising step whatever the number of steps (None: from the steps)

    # -- S2D2 knobs (s2d2_config)
    sub_blocks: bool  # decodes sub-blocks of its trained block size, which is fixed (`sub_block_size` applies)
    draft_ver: bool  # `draft_ver` is offered
    resample_optional: bool  # `allow_resample=false` is offered (else the verifier always resamples)
    editing: str | None  # which of its models do T2T editing (`editing_threshold`, `max_post_steps`); None: none
    estimators: tuple[str, ...]  # token-acceptance estimators the reference code offers for the family
    policies: tuple[str, ...]  # verify policies the reference code offers for the family
    defaults: Mapping[str, Any]  # S2D2Config fields left None are filled from here
    presets: Mapping[str, Mapping[str, Any]]  # the paper's named configurations for the family

    # -- D2F pipelining (columns added with the fourth family; the defaults are the first three's values)
    pipelined: bool = False  # several blocks decode at once (a window of active blocks, D2F knobs apply)
    block_origin: str = "absolute"  # blocks counted from position 0, or from the prompt end ("prompt")
    marker_key: str | None = None  # config.json key a checkpoint must carry (else it is not this family)

    @property
    def verifier(self) -> str:
        """``"causal"`` (one causal forward, shifted logits) or ``"2l"`` (the 2L forward, aligned logits)."""
        return "causal" if self.shifted else "2l"


def _ro(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


_ALL_ESTIMATORS = ("soft_entropy_negexp", "hard_margin_threshold", "soft_renyi_2_entropy", "soft_confidence_power",
                   "hard_entropy_threshold", "soft_clipped_linear_margin")
_ALL_POLICIES = ("mask_span_length", "score_threshold", "score_hysteresis", "contextual_bandit_ucb")
_MODELS = "vllm_s2d2.model_executor.models"

# D2F (Discrete Diffusion Forcing: Dream-7B / LLaDA-8B + a D2F LoRA; docs/plans/d2f.md).  Defaults = the
# S2D2 reference CLI (`D2F/example_d2f.py`): B 32, add 0.5, decoded 0.8, skip 0.9 (= confidence_threshold),
# always verify (min span 1), one verify block; committed KV block-causal as D2F trained it (cache_ver off: the
# reference's cache_ver is a no-op; on, it gives the lossless mode).  No paper configuration routes D2F otherwise: the score /
# hysteresis knobs, used only when another policy is chosen, are Fast-dLLM v2's Config-A values.
_D2F_DEFAULTS = _ro(dict(
    remasking="low_confidence_dynamic", confidence_threshold=0.9, cache_ver=False, draft_ver=False,
    verify_policy="mask_span_length", min_span_length=1, score_type="difference_dynamic", score_penalty_coef=1.0,
    score_threshold=0.0, hysteresis_on=1.0, hysteresis_off=-5.0,
    block_add_threshold=0.5, decoded_token_threshold=0.8, max_active_blocks=4, min_tokens_per_step=1,
    verify_block_size=1, partial_accept_run=0))
_D2F_LLADA_PRESET = dict(block_size=32, block_add_threshold=0.5, decoded_token_threshold=0.8,
                         confidence_threshold=0.9, verify_policy="mask_span_length", min_span_length=1,
                         verify_block_size=1, allow_resample=True)
_D2F_PRESETS = {
    "llada": _ro(_D2F_LLADA_PRESET),
    # D2F/README.md stability advice for Dream: no resampling, drafts accepted only above confidence 0.5.
    "dream": _ro(dict(_D2F_LLADA_PRESET, allow_resample=False, accept_min_draft_confidence=0.5)),
}

def _d2f_family(base: str, title: str, arch: Architecture, *, backbone: str, mask: int, stops: tuple[int, ...],
                shifted: bool) -> Family:
    """One D2F family (``d2f_<base>``): the base model + a merged D2F LoRA, marked by ``d2f`` in config.json."""
    return Family(
        name=f"d2f_{base}",
        title=f"D2F {title}",
        architectures=(arch,),
        backbones=_ro({arch.model_type: backbone}),
        # no block size in the base configs: `merge-d2f-lora` writes it into the marker (`d2f.block_size`).
        block_size_key="d2f.block_size", default_block_size=32, default_mask_token_id=mask,
        default_stop_token_ids=stops, shifted=shifted,
        # D2F's threshold rule per block; after a verify every fully activated block is topped up to
        # `min_tokens_per_step`; a rejected draft without resampling stays masked.
        threshold_rule=True, fallback_to_quota=True, keep_rejected_draft=False, fixed_quota=None,
        sub_blocks=False, draft_ver=False, resample_optional=True, editing=None,
        estimators=_ALL_ESTIMATORS, policies=_ALL_POLICIES,
        defaults=_D2F_DEFAULTS,
        presets=_ro({f"d2f-{base}": _D2F_PRESETS[base]}),
        pipelined=True, block_origin="prompt", marker_key="d2f",
    )


# Engine defaults = the family's first paper configuration, not the reference code's function defaults (which
# disagree with the paper: hard_margin_threshold, difference_dynamic, c = 2, always verify).  Checkpoint
# defaults are the released checkpoints' values (SDAR 4 / 151669, Fast-dLLM v2 bd_size 32 / 151665 / stop
# 151645, LLaDA2 32 / 156895 / stop 156892 = pad, the id the reference code hard-codes).
TABLE: tuple[Family, ...] = (
    Family(
        name="sdar",
        title="SDAR",
        architectures=(Architecture("SDARForCausalLM", "sdar", f"{_MODELS}.sdar:SDARForCausalLM"),
                       Architecture("SDARMoeForCausalLM", "sdar_moe", f"{_MODELS}.sdar:SDARMoeForCausalLM")),
        backbones=_ro({"sdar": "qwen3", "sdar_moe": "qwen3_moe"}),
        block_size_key="block_size", default_block_size=4, default_mask_token_id=151669,
        default_stop_token_ids=(151645, 151643), shifted=False,
        threshold_rule=False, fallback_to_quota=True, keep_rejected_draft=True, fixed_quota=None,
        sub_blocks=False, draft_ver=True, resample_optional=True, editing=None,
        estimators=_ALL_ESTIMATORS, policies=_ALL_POLICIES,
        # Config-A of SDAR-8B: tau = 0 score_threshold, difference_static, c = 1, low_confidence_dynamic 0.85,
        # cache_ver + draft_ver, denoising_steps = block_size.
        defaults=_ro(dict(hysteresis_on=0.0, hysteresis_off=-1.0, remasking="low_confidence_dynamic",
                          confidence_threshold=0.85, cache_ver=True, draft_ver=True, verify_policy="score_threshold",
                          score_type="difference_static", score_penalty_coef=1.0, score_threshold=0.0)),
        presets=_ro({
            "sdar-a": _ro(dict(block_size=4, denoising_steps=4, remasking="low_confidence_dynamic",
                               confidence_threshold=0.85, cache_ver=True, draft_ver=True,
                               verify_policy="score_threshold", score_type="difference_static",
                               score_penalty_coef=1.0, score_threshold=0.0)),
            "sdar-b": _ro(dict(block_size=16, denoising_steps=16, remasking="low_confidence_dynamic",
                               confidence_threshold=0.85, cache_ver=True, draft_ver=True,
                               verify_policy="score_threshold", score_type="difference_static",
                               score_penalty_coef=0.0, score_threshold=0.0)),
        }),
    ),
    Family(
        name="fast_dllm_v2",
        title="Fast-dLLM v2",
        architectures=(Architecture("Fast_dLLM_QwenForCausalLM", "Fast_dLLM_Qwen",
                                    f"{_MODELS}.fast_dllm:Fast_dLLM_QwenForCausalLM"),),
        backbones=_ro({"Fast_dLLM_Qwen": "qwen2", "fast_dllm_qwen": "qwen2"}),
        block_size_key="bd_size", default_block_size=32, default_mask_token_id=151665,
        default_stop_token_ids=(151645,), shifted=True,
        threshold_rule=True, fallback_to_quota=False, keep_rejected_draft=False, fixed_quota=None,
        # draft_ver: the reference offsets its causal rows by the block, not the sub-block (a latent bug there).
        sub_blocks=True, draft_ver=False, resample_optional=True, editing=None,
        estimators=("soft_entropy_negexp", "hard_margin_threshold", "soft_renyi_2_entropy"), policies=_ALL_POLICIES,
        # Config-A of Fast-dLLM v2 7B: threshold 0.9, sub-block 4, score_hysteresis on 1 / off -5,
        # difference_dynamic, c = 1, no AR-like caching.
        defaults=_ro(dict(remasking="low_confidence_dynamic", confidence_threshold=0.9, sub_block_size=4,
                          cache_ver=False, draft_ver=False, verify_policy="score_hysteresis",
                          score_type="difference_dynamic", score_penalty_coef=1.0, score_threshold=0.0,
                          hysteresis_on=1.0, hysteresis_off=-5.0)),
        presets=_ro({
            "fast-a": _ro(dict(confidence_threshold=0.9, sub_block_size=4, verify_policy="score_hysteresis",
                               hysteresis_on=1.0, hysteresis_off=-5.0, score_type="difference_dynamic",
                               score_penalty_coef=1.0)),
            "fast-b": _ro(dict(confidence_threshold=0.9, sub_block_size=16, verify_policy="score_hysteresis",
                               hysteresis_on=1.0, hysteresis_off=-5.0, score_type="difference_dynamic",
                               score_penalty_coef=1.0)),
            "fast-c": _ro(dict(confidence_threshold=0.9, sub_block_size=32, verify_policy="mask_span_length",
                               min_span_length=8)),
        }),
    ),
    Family(
        name="llada2",
        title="LLaDA2",
        architectures=(Architecture("LLaDA2MoeModelLM", "llada2_moe", f"{_MODELS}.llada2:LLaDA2MoeModelLM"),),
        backbones=_ro({"llada2_moe": "llada2", "llada2_moe_veomni": "llada2"}),
        block_size_key="block_size", default_block_size=32, default_mask_token_id=156895,
        default_stop_token_ids=(156892,), shifted=False,
        threshold_rule=False, fallback_to_quota=True, keep_rejected_draft=True, fixed_quota=1,
        # no draft_ver in the reference; its verifier always resamples.
        sub_blocks=False, draft_ver=False, resample_optional=False, editing="LLaDA2.1",
        estimators=("soft_entropy_negexp", "hard_margin_threshold", "soft_renyi_2_entropy"),
        policies=("mask_span_length", "score_threshold", "score_hysteresis"),
        # LLaDA2.1-mini "Conservative": threshold 0.95, score_threshold -5, difference_static, c = 4, no AR-like
        # caching; T2T editing only when editing_threshold is set (LLaDA2.0 was not trained to edit, and the
        # checkpoint format does not say which of 2.0 / 2.1 it is).
        defaults=_ro(dict(hysteresis_on=0.0, hysteresis_off=-1.0, remasking="low_confidence_dynamic",
                          confidence_threshold=0.95, cache_ver=False, draft_ver=False,
                          verify_policy="score_threshold", score_type="difference_static", score_penalty_coef=4.0,
                          score_threshold=-5.0)),
        presets=_ro({
            "llada2-conservative": _ro(dict(block_size=32, confidence_threshold=0.95, editing_threshold=0.9,
                                            verify_policy="score_threshold", score_threshold=-5.0,
                                            score_type="difference_static", score_penalty_coef=4.0)),
            "llada2-quality": _ro(dict(block_size=32, confidence_threshold=0.7, editing_threshold=0.5,
                                       verify_policy="score_threshold", score_threshold=0.0,
                                       score_type="difference_static", score_penalty_coef=4.0)),
        }),
    ),
    _d2f_family("dream", "Dream", Architecture("DreamModel", "Dream", f"{_MODELS}.d2f:D2FDreamForCausalLM"),
                backbone="qwen2", mask=151666, stops=(151643, 151645), shifted=True),
    _d2f_family("llada", "LLaDA", Architecture("LLaDAModelLM", "llada", f"{_MODELS}.d2f:D2FLLaDAForCausalLM"),
                backbone="llada", mask=126336, stops=(126081, 126348), shifted=False),
)

NAMES: tuple[str, ...] = tuple(f.name for f in TABLE)
BY_NAME: Mapping[str, Family] = MappingProxyType({f.name: f for f in TABLE})
BY_ARCHITECTURE: Mapping[str, tuple[Family, Architecture]] = MappingProxyType(
    {a.name: (f, a) for f in TABLE for a in f.architectures})
BY_MODEL_TYPE: Mapping[str, Family] = MappingProxyType({mt: f for f in TABLE for mt in f.backbones})
BACKBONES: Mapping[str, str] = MappingProxyType({mt: b for f in TABLE for mt, b in f.backbones.items()})
