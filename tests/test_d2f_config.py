"""D2F (Dream / LLaDA + a merged D2F LoRA): family table entries, checkpoint configs, S2D2 knobs and presets."""

from __future__ import annotations

import re

import pytest

from vllm_s2d2.configs import DreamConfig, FamilyInfo, LLaDAConfig, family_info, register_hf_configs
from vllm_s2d2.families import BY_NAME
from vllm_s2d2.s2d2_config import D2F_KNOBS, PRESETS, S2D2Config

D2F = ("d2f_dream", "d2f_llada")
OTHERS = {"sdar": 4, "fast_dllm_v2": 32, "llada2": 32}

DREAM_7B = {  # Dream-org/Dream-v0-Base-7B config.json (Qwen2 keys) + the merge tool's marker
    "architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "mask_token_id": 151666,
    "pad_token_id": 151643, "bos_token_id": 151643, "eos_token_id": 151643, "max_position_embeddings": 131072,
    "d2f": {"block_size": 32},
}
LLADA_8B = {  # GSAI-ML/LLaDA-8B-Instruct config.json (OLMo keys) + the marker
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 4096, "n_layers": 32, "n_heads": 32,
    "n_kv_heads": 32, "mlp_hidden_size": 12288, "vocab_size": 126464, "embedding_size": 126464,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "weight_tying": False, "block_type": "llama",
    "include_bias": False, "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081,
    "max_sequence_length": 4096, "activation_type": "silu", "d2f": {"block_size": 32},
}


def raises_naming(option: str):
    return pytest.raises(ValueError, match=re.escape(option))


def resolve(family: str, **knobs):
    return S2D2Config(**knobs).resolve(family, 32)


# ---- family table ------------------------------------------------------------------------------------------


def test_family_entries():
    dream, llada = BY_NAME["d2f_dream"], BY_NAME["d2f_llada"]
    assert (dream.architectures[0].name, dream.architectures[0].model_type) == ("DreamModel", "Dream")
    assert dream.architectures[0].vllm_class.endswith(".d2f:D2FDreamForCausalLM")
    assert (llada.architectures[0].name, llada.architectures[0].model_type) == ("LLaDAModelLM", "llada")
    assert llada.architectures[0].vllm_class.endswith(".d2f:D2FLLaDAForCausalLM")
    assert dict(dream.backbones) == {"Dream": "qwen2"} and dict(llada.backbones) == {"llada": "llada"}
    assert (dream.default_mask_token_id, dream.default_stop_token_ids, dream.shifted) == (151666, (151643, 151645),
                                                                                        True)
    assert (llada.default_mask_token_id, llada.default_stop_token_ids, llada.shifted) == (126336, (126081, 126348),
                                                                                        False)
    for fam in (dream, llada):
        assert fam.pipelined and fam.block_origin == "prompt" and fam.marker_key == "d2f"
        assert fam.threshold_rule and not fam.keep_rejected_draft and fam.resample_optional
        assert not fam.sub_blocks and not fam.draft_ver and fam.editing is None
    assert (dream.verifier, llada.verifier) == ("causal", "2l")


def test_existing_families_keep_their_columns():
    for name in OTHERS:
        fam = BY_NAME[name]
        assert (fam.pipelined, fam.block_origin, fam.marker_key) == (False, "absolute", None)


# ---- checkpoint configs ------------------------------------------------------------------------------------


def test_dream_config_parses():
    info = family_info(DREAM_7B, {"eos_token_id": [151643, 151645]})
    assert info == FamilyInfo("d2f_dream", "DreamModel", 32, 151666, (151643, 151645), True, 152064, "prompt", True)
    register_hf_configs()
    cfg = DreamConfig(**{k: v for k, v in DREAM_7B.items() if k != "model_type"})
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.rope_parameters["rope_theta"]) == (3584, 4, 1e6)
    assert family_info(cfg).block_size == 32


def test_llada_config_maps_olmo_keys():
    cfg = LLaDAConfig(**{k: v for k, v in LLADA_8B.items() if k != "model_type"})
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (4096, 32, 32, 32, 12288, 126464, 128)
    assert cfg.rope_parameters["rope_theta"] == 500000.0 and cfg.rms_norm_eps == 1e-5
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.mlp_bias
    assert cfg.max_position_embeddings == 4096 and cfg.hidden_act == "silu"
    again = LLaDAConfig.from_dict(cfg.to_dict())
    assert (again.hidden_size, again.vocab_size) == (4096, 126464)
    info = family_info(cfg)
    assert (info.family, info.block_size, info.mask_token_id, info.stop_token_ids, info.shifted) == (
        "d2f_llada", 32, 126336, (126081,), False)


def test_llada_vocab_is_the_embedding_size():
    info = family_info({**LLADA_8B, "vocab_size": 126349, "embedding_size": 126464})
    assert info.vocab_size == 126464


def test_block_size_from_the_marker():
    assert family_info({**DREAM_7B, "d2f": {"block_size": 16}}).block_size == 16
    assert family_info({**DREAM_7B, "d2f": {}}).block_size == 32  # marker without a size: the default
    with raises_naming("d2f.block_size"):
        family_info({**DREAM_7B, "d2f": {"block_size": 0}})


@pytest.mark.parametrize("base", [DREAM_7B, LLADA_8B], ids=["dream", "llada"])
def test_unmarked_base_rejected(base):
    plain = {k: v for k, v in base.items() if k != "d2f"}
    with pytest.raises(ValueError, match="full-attention.*merge-d2f-lora"):
        family_info(plain)
    with raises_naming("`d2f`"):
        family_info({**plain, "d2f": 32})


def test_stop_defaults_when_no_eos():
    cfg = {k: v for k, v in LLADA_8B.items() if k != "eos_token_id"}
    assert family_info(cfg).stop_token_ids == (126081, 126348)


# ---- S2D2 knobs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", D2F)
def test_defaults(family):
    c = resolve(family)
    assert (c.block_size, c.block_add_threshold, c.decoded_token_threshold, c.confidence_threshold) == (
        32, 0.5, 0.8, 0.9)
    assert (c.verify_policy, c.min_span_length, c.cache_ver, c.draft_ver) == ("mask_span_length", 1, False, False)
    assert (c.max_active_blocks, c.min_tokens_per_step, c.verify_block_size, c.partial_accept_run) == (4, 1, 1, 0)
    assert c.accept_min_draft_confidence is None and c.resample_min_q is None
    assert c.resolve(family, 32).to_dict() == c.to_dict()


BAD_KNOBS = [
    ("block_add_threshold", 0.0), ("block_add_threshold", 1.5), ("block_add_threshold", "x"),
    ("decoded_token_threshold", -0.1), ("decoded_token_threshold", 1.01),
    ("max_active_blocks", 0), ("max_active_blocks", 1.5), ("max_active_blocks", True),
    ("min_tokens_per_step", 0), ("verify_block_size", 0),
    ("accept_min_draft_confidence", -0.5), ("accept_min_draft_confidence", 2.0),
    ("resample_min_q", 1.5), ("resample_min_q", float("nan")),
    ("partial_accept_run", -1), ("partial_accept_run", 0.5),
]


@pytest.mark.parametrize("name,value", BAD_KNOBS)
def test_bad_knob_named(name, value):
    with raises_naming(name):
        S2D2Config(**{name: value})


def test_edge_values_accepted():
    c = resolve("d2f_llada", block_add_threshold=1.0, decoded_token_threshold=0.0, max_active_blocks=1,
                accept_min_draft_confidence=0.0, resample_min_q=1.0, partial_accept_run=3, verify_block_size=32,
                min_tokens_per_step=5)
    assert (c.block_add_threshold, c.verify_block_size, c.partial_accept_run) == (1.0, 32, 3)
    assert resolve("d2f_llada", verify_block_size=4).verify_block_size == 4


def test_verify_block_size_rules():
    with raises_naming("verify_block_size"):
        resolve("d2f_dream", verify_block_size=2)  # causal verifier: 1 only
    with raises_naming("verify_block_size"):
        resolve("d2f_llada", verify_block_size=3)  # must divide block_size 32


def test_min_span_up_to_the_window():
    assert resolve("d2f_llada", min_span_length=128).min_span_length == 128  # 4 blocks x 32
    with raises_naming("min_span_length"):
        resolve("d2f_llada", min_span_length=129)
    with raises_naming("min_span_length"):
        resolve("d2f_llada", min_span_length=33, max_active_blocks=1)


@pytest.mark.parametrize("name", D2F_KNOBS)
@pytest.mark.parametrize("family", sorted(OTHERS))
def test_d2f_knobs_rejected_elsewhere(family, name):
    value = {"block_add_threshold": 0.5, "decoded_token_threshold": 0.5}.get(name, 1)
    with pytest.raises(ValueError, match=re.escape(name) + ".*D2F"):
        S2D2Config(**{name: value}).resolve(family, OTHERS[family])
    resolved = S2D2Config().resolve(family, OTHERS[family])
    assert getattr(resolved, name) is None


@pytest.mark.parametrize("family", D2F)
def test_other_families_knobs_rejected_for_d2f(family):
    with raises_naming("draft_ver"):
        resolve(family, draft_ver=True)
    with raises_naming("sub_block_size"):
        resolve(family, sub_block_size=4)
    with raises_naming("editing_threshold"):
        resolve(family, editing_threshold=0.9)
    with raises_naming("max_post_steps"):
        resolve(family, max_post_steps=1)


@pytest.mark.parametrize("family", D2F)
def test_every_policy_and_estimator(family):
    from vllm_s2d2.s2d2_config import ESTIMATORS, POLICIES

    for policy in POLICIES:
        assert resolve(family, verify_policy=policy).verify_policy == policy
    for est in ESTIMATORS:
        assert resolve(family, token_acceptance_estimator=est).token_acceptance_estimator == est
    assert resolve(family, allow_resample=False).allow_resample is False


def test_any_block_size():
    assert resolve("d2f_dream", block_size=64).block_size == 64
    assert S2D2Config(block_size=16).resolve("d2f_llada", 32).block_size == 16


# ---- presets -----------------------------------------------------------------------------------------------


def test_presets_resolve():
    llada = S2D2Config.from_dict({"preset": "d2f-llada"}).resolve("d2f_llada", 32)
    assert (llada.block_size, llada.block_add_threshold, llada.decoded_token_threshold,
            llada.confidence_threshold, llada.allow_resample, llada.accept_min_draft_confidence) == (
        32, 0.5, 0.8, 0.9, True, None)
    assert llada.token_acceptance_estimator == "soft_entropy_negexp"
    dream = S2D2Config.from_dict({"preset": "d2f-dream"}).resolve("d2f_dream", 32)
    assert (dream.allow_resample, dream.accept_min_draft_confidence, dream.verify_block_size) == (False, 0.5, 1)
    assert {"d2f-llada", "d2f-dream"} <= set(PRESETS)
    assert S2D2Config.from_dict({"preset": "d2f-dream", "block_add_threshold": 0.1}).block_add_threshold == 0.1


def test_d2f_preset_rejected_for_other_families():
    with raises_naming("block_add_threshold"):
        S2D2Config.from_dict({"preset": "d2f-llada"}).resolve("sdar", 4)
