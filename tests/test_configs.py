"""vllm_s2d2.configs: HF config classes, family detection and validation (CPU, no vLLM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from vllm_s2d2.configs import (
    ARCH_TO_FAMILY,
    FamilyInfo,
    FastDLLMQwenConfig,
    LLaDA2MoeConfig,
    LLaDA2MoeVeomniConfig,
    SDARConfig,
    SDARMoeConfig,
    family_info,
    family_of,
    load_family_info,
    register_hf_configs,
)

register_hf_configs()

# ---- real config.json files (released checkpoints) ---------------------------------------------------------

# SDAR: SDAR's own training/model/SDAR-8B-Chat/config.json (incl. training-only keys)
SDAR_8B = {
    "architectures": ["SDARForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_sdar.SDARConfig",
        "AutoModel": "modeling_sdar.SDARModel",
        "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_implementation": "flex_attention",
    "block_size": 4,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "fuse_cross_entropy": True,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "mask_token_id": 151669,
    "max_position_embeddings": 32768,
    "max_window_layers": 36,
    "micro_forward": False,
    "model_type": "sdar",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.52.4",
    "use_cache": True,
    "use_deepep": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# SDAR: 4B differs only in hidden_size / intermediate_size.
SDAR_4B = {**SDAR_8B, "hidden_size": 2560, "intermediate_size": 9728}
# SDAR generation_config.json (4B/8B)
SDAR_GEN = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}
# SDAR (unverified) 30B-A3B: Qwen3-MoE fields; the HF release may lack block_size / mask_token_id.
SDAR_30B_A3B = {
    "architectures": ["SDARMoeForCausalLM"],
    "model_type": "sdar_moe",
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 32768,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# Fast-dLLM v2: Efficient-Large-Model/Fast_dLLM_v2_7B config.json (partial) + the Qwen2.5-7B tail.
FAST_7B = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
        "AutoModel": "modeling.Fast_dLLM_QwenModel",
        "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
    },
    "attention_dropout": 0.0,
    "bd_size": 32,
    "bos_token_id": 151643,
    "conplemenrary_mask": True,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "layer_types": ["full_attention"] * 28,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "Fast_dLLM_Qwen",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151645,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.53.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
# LLaDA2: dFactory's configs/model_configs/llada2_mini/config.json, with the HF release's model_type.
LLADA2_MINI = {
    "architectures": ["LLaDA2MoeModelLM"],
    "auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    "model_type": "llada2_moe",
    "attention_dropout": 0.0,
    "embedding_dropout": 0.0,
    "first_k_dense_replace": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "max_position_embeddings": 16384,
    "moe_intermediate_size": 512,
    "moe_router_enable_expert_bias": True,
    "n_group": 8,
    "norm_head": False,
    "norm_topk_prob": True,
    "num_attention_heads": 16,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 20,
    "num_key_value_heads": 4,
    "num_shared_experts": 1,
    "output_dropout": 0.0,
    "pad_token_id": 156892,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-06,
    "rope_theta": 600000,
    "rotary_dim": 64,
    "routed_scaling_factor": 2.5,
    "router_dtype": "fp32",
    "score_function": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "torch_dtype": "bfloat16",
    "use_bias": False,
    "use_qkv_bias": False,
    "use_rmsnorm": True,
    "vocab_size": 157184,
}
LLADA2_MINI_VEOMNI = {**LLADA2_MINI, "model_type": "llada2_moe_veomni"}


def _write(tmp_path: Path, name: str, cfg: dict, gen: dict | None = None) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    if gen is not None:
        (d / "generation_config.json").write_text(json.dumps(gen))
    return d


REAL = [
    # name, config, generation_config, config class, expected FamilyInfo (minus architecture / vocab)
    ("sdar_8b", SDAR_8B, SDAR_GEN, SDARConfig, ("sdar", 4, 151669, (151645, 151643), False)),
    ("sdar_8b_nogen", SDAR_8B, None, SDARConfig, ("sdar", 4, 151669, (151643,), False)),
    ("sdar_4b", SDAR_4B, SDAR_GEN, SDARConfig, ("sdar", 4, 151669, (151645, 151643), False)),
    ("sdar_30b_a3b", SDAR_30B_A3B, SDAR_GEN, SDARMoeConfig, ("sdar", 4, 151669, (151645, 151643), False)),
    ("fast_7b", FAST_7B, None, FastDLLMQwenConfig, ("fast_dllm_v2", 32, 151665, (151645,), True)),
    ("llada2_mini", LLADA2_MINI, None, LLaDA2MoeConfig, ("llada2", 32, 156895, (156892,), False)),
    ("llada2_veomni", LLADA2_MINI_VEOMNI, None, LLaDA2MoeVeomniConfig, ("llada2", 32, 156895, (156892,), False)),
]


@pytest.mark.parametrize("name,cfg,gen,cls,expected", REAL, ids=[r[0] for r in REAL])
def test_real_config_loads_and_parses(tmp_path, name, cfg, gen, cls, expected):
    d = _write(tmp_path, name, cfg, gen)
    hf = AutoConfig.from_pretrained(d)  # no trust_remote_code, although auto_map is present
    assert type(hf) is cls
    fam, bs, mask, stops, shifted = expected
    want = FamilyInfo(
        family=fam,
        architecture=cfg["architectures"][0],
        block_size=bs,
        mask_token_id=mask,
        stop_token_ids=stops,
        shifted=shifted,
        vocab_size=cfg["vocab_size"],
    )
    assert family_info(hf, gen) == want
    assert family_info(cfg, gen) == want  # raw dict gives the same answer
    assert load_family_info(d) == want
    assert family_of(d) == fam and family_of(hf) == fam and family_of(cfg) == fam
    # the block-diffusion keys and unknown keys survive
    for key in ("block_size", "mask_token_id", "bd_size", "conplemenrary_mask", "fuse_cross_entropy", "rotary_dim"):
        if key in cfg:
            assert getattr(hf, key) == cfg[key], key
    # transformers 5.x folds rope_theta into rope_parameters
    assert hf.rope_parameters["rope_theta"] == cfg["rope_theta"]
    assert hf.vocab_size == cfg["vocab_size"] and hf.hidden_size == cfg["hidden_size"]
    # save / reload round trip
    hf.save_pretrained(tmp_path / "resaved")
    hf2 = AutoConfig.from_pretrained(tmp_path / "resaved")
    assert type(hf2) is cls
    assert family_info(hf2, gen) == want


def test_real_config_details(tmp_path):
    sdar = AutoConfig.from_pretrained(_write(tmp_path, "s", SDAR_8B))
    assert sdar.head_dim == 128 and sdar.num_key_value_heads == 8 and sdar.tie_word_embeddings is False
    moe = AutoConfig.from_pretrained(_write(tmp_path, "m", SDAR_30B_A3B))
    assert moe.head_dim == 128 and moe.num_experts == 128 and moe.moe_intermediate_size == 768
    assert moe.norm_topk_prob is True and moe.mlp_only_layers == []
    fast = AutoConfig.from_pretrained(_write(tmp_path, "f", FAST_7B))
    assert fast.bd_size == 32 and len(fast.layer_types) == 28
    ll = AutoConfig.from_pretrained(_write(tmp_path, "l", LLADA2_MINI))
    assert ll.rotary_dim == 64 and ll.head_dim == 128 and ll.use_rmsnorm is True
    assert ll.score_function == "sigmoid" and ll.moe_router_enable_expert_bias is True
    assert ll.router_dtype == "fp32" and ll.n_group == 8 and ll.topk_group == 4
    assert ll.rope_parameters["rope_theta"] == 600000
    assert ll.embedding_dropout == 0.0  # vLLM reads it without getattr


def test_llada2_defaults_are_the_mini_model():
    c = LLaDA2MoeConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_experts) == (157184, 2048, 20, 256)
    assert c.use_qk_norm is True and c.use_bias is False and c.rotary_dim is None
    assert c.rope_parameters["rope_theta"] == 600000
    assert c.pad_token_id == 156892
    c0 = LLaDA2MoeConfig(num_key_value_heads=0, head_dim=None, hidden_size=256, num_attention_heads=4)
    assert c0.num_key_value_heads == 4 and c0.head_dim == 64


def test_fast_bd_size_default_and_sdar_moe_head_dim_default():
    assert FastDLLMQwenConfig().bd_size == 32
    assert SDARMoeConfig().head_dim == 128


def test_register_is_idempotent():
    register_hf_configs()
    register_hf_configs()
    for mt, cls in [
        ("sdar", SDARConfig),
        ("sdar_moe", SDARMoeConfig),
        ("Fast_dLLM_Qwen", FastDLLMQwenConfig),
        ("llada2_moe", LLaDA2MoeConfig),
    ]:
        assert type(AutoConfig.for_model(mt)) is cls


def test_configs_import_is_light():
    """configs.py imports transformers config classes only (``models.auto.modeling_auto`` is a name table)."""
    code = (
        "import sys, vllm_s2d2.configs as c; c.register_hf_configs();"
        "bad=[m for m in sys.modules"
        " if m.startswith('transformers.models.') and '.modeling_' in m and '.auto.' not in m];"
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


def test_arch_table():
    assert ARCH_TO_FAMILY == {
        "SDARForCausalLM": "sdar",
        "SDARMoeForCausalLM": "sdar",
        "Fast_dLLM_QwenForCausalLM": "fast_dllm_v2",
        "LLaDA2MoeModelLM": "llada2",
        "DreamModel": "d2f_dream",
        "LLaDAModelLM": "d2f_llada",
    }


def test_family_table_covers_the_config_classes():
    """One family registry (vllm_s2d2.families): every architecture's model_type has a config class here, every
    config class is a model_type the table knows, and the checkpoint fallbacks are the table's."""
    from vllm_s2d2.configs import CONFIG_CLASSES
    from vllm_s2d2.families import BY_MODEL_TYPE, TABLE

    assert {a.model_type for f in TABLE for a in f.architectures} <= set(CONFIG_CLASSES)
    assert set(CONFIG_CLASSES) <= set(BY_MODEL_TYPE)
    assert {mt: BY_MODEL_TYPE[mt].name for mt in CONFIG_CLASSES} == {
        "sdar": "sdar", "sdar_moe": "sdar", "Fast_dLLM_Qwen": "fast_dllm_v2", "llada2_moe": "llada2",
        "llada2_moe_veomni": "llada2", "Dream": "d2f_dream", "llada": "d2f_llada"}
    for f in TABLE:
        a = f.architectures[0]
        cfg = {"architectures": [a.name], "vocab_size": 200000, **({f.marker_key: {}} if f.marker_key else {})}
        info = family_info(cfg)
        assert (info.family, info.block_size, info.mask_token_id, info.stop_token_ids, info.shifted) == (
            f.name, f.default_block_size, f.default_mask_token_id, f.default_stop_token_ids, f.shifted)
        head, _, sub = f.block_size_key.partition(".")
        assert family_info({**cfg, head: {sub: 8} if sub else 8}).block_size == 8


# ---- fallbacks ----------------------------------------------------------------------------------------------


def test_fallback_defaults_when_keys_absent():
    sdar = {k: v for k, v in SDAR_8B.items() if k not in ("block_size", "mask_token_id")}
    want = FamilyInfo("sdar", "SDARForCausalLM", 4, 151669, (151645, 151643), False, 151936)
    assert family_info(sdar, SDAR_GEN) == want
    fast = {k: v for k, v in FAST_7B.items() if k != "bd_size"}
    info = family_info(fast)
    assert info.block_size == 32 and info.mask_token_id == 151665 and info.shifted
    # Fast: `block_size` is accepted when `bd_size` is absent
    assert family_info({**fast, "block_size": 16}).block_size == 16
    # LLaDA2: no eos anywhere -> 156892 (= pad), the reference's hard-coded stop id
    assert family_info(LLADA2_MINI).stop_token_ids == (156892,)


def test_stop_ids_union_order_dedup():
    cfg = {**SDAR_8B, "eos_token_id": [151643, 7]}
    info = family_info(cfg, {"eos_token_id": [151645, 151643, 151645]})
    assert info.stop_token_ids == (151645, 151643, 7)
    assert family_info(SDAR_8B, {"eos_token_id": 151645}).stop_token_ids == (151645, 151643)
    assert family_info(SDAR_8B, {}).stop_token_ids == (151643,)


def test_explicit_ids_win_over_defaults():
    cfg = {**SDAR_8B, "block_size": 16, "mask_token_id": 151700}
    info = family_info(cfg, SDAR_GEN)
    assert info.block_size == 16 and info.mask_token_id == 151700
    assert family_info({**FAST_7B, "bd_size": 8, "mask_token_id": 151666}).block_size == 8


# ---- errors: ValueError naming the field --------------------------------------------------------------------


def _err(cfg, gen=None) -> str:
    with pytest.raises(ValueError) as ei:
        family_info(cfg, gen)
    return str(ei.value)


def test_error_no_mask_and_default_out_of_vocab():
    for base in (SDAR_8B, FAST_7B, LLADA2_MINI):
        cfg = {k: v for k, v in base.items() if k != "mask_token_id"}
        cfg.update(vocab_size=512, eos_token_id=3, pad_token_id=3, bos_token_id=2)
        msg = _err(cfg)
        assert "mask_token_id" in msg and "512" in msg


@pytest.mark.parametrize("bad", [0, -4, 4.0, "4", True, [4]])
def test_error_bad_block_size(bad):
    assert "block_size" in _err({**SDAR_8B, "block_size": bad})
    assert "block_size" in _err({**LLADA2_MINI, "block_size": bad})
    assert "bd_size" in _err({**FAST_7B, "bd_size": bad})


def test_error_unknown_or_missing_architecture():
    msg = _err({**SDAR_8B, "architectures": ["Qwen3ForCausalLM"]})
    assert "architectures" in msg and "Qwen3ForCausalLM" in msg
    for arch in ARCH_TO_FAMILY:
        assert arch in msg  # lists the supported ones
    assert "architectures" in _err({k: v for k, v in SDAR_8B.items() if k != "architectures"})
    assert "architectures" in _err({**SDAR_8B, "architectures": []})
    assert "architectures" in _err({**SDAR_8B, "architectures": None})


def test_error_mask_among_stop_ids():
    assert "mask_token_id" in _err({**SDAR_8B, "mask_token_id": 151645}, SDAR_GEN)
    assert "mask_token_id" in _err({**SDAR_8B, "mask_token_id": 151643})
    assert "mask_token_id" in _err({**LLADA2_MINI, "mask_token_id": 156892})  # default stop id


@pytest.mark.parametrize("bad", [151936, 200000, -1])
def test_error_mask_out_of_vocab(bad):
    msg = _err({**SDAR_8B, "mask_token_id": bad})
    assert "mask_token_id" in msg


@pytest.mark.parametrize("bad", ["151669", 151669.0, False])
def test_error_mask_not_int(bad):
    assert "mask_token_id" in _err({**SDAR_8B, "mask_token_id": bad})


def test_error_eos_out_of_vocab_or_not_int():
    assert "eos_token_id" in _err({**SDAR_8B, "vocab_size": 151680}, {"eos_token_id": [151645, 999999]})
    assert "eos_token_id" in _err(SDAR_8B, {"eos_token_id": "<|im_end|>"})


def test_error_vocab_size():
    assert "vocab_size" in _err({k: v for k, v in SDAR_8B.items() if k != "vocab_size"})
    assert "vocab_size" in _err({**SDAR_8B, "vocab_size": 0})


def test_errors_through_autoconfig(tmp_path):
    """The same validation applies to configs loaded by AutoConfig (no strict type checks get in the way)."""
    hf = AutoConfig.from_pretrained(_write(tmp_path, "b", {**SDAR_8B, "block_size": 0}))
    assert "block_size" in _err(hf)
    hf = AutoConfig.from_pretrained(_write(tmp_path, "m", {**SDAR_8B, "mask_token_id": "x"}))
    assert "mask_token_id" in _err(hf)


# ---- files ------------------------------------------------------------------------------------------------


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json") as ei:
        load_family_info(tmp_path / "nowhere")
    assert "nowhere" in str(ei.value)
    with pytest.raises(FileNotFoundError, match="config.json"):
        family_of(tmp_path)


def test_plain_qwen3_is_not_block_diffusion(tmp_path):
    plain = {**SDAR_8B, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    for k in ("block_size", "mask_token_id", "auto_map"):
        plain.pop(k)
    d = _write(tmp_path, "plain", plain)
    assert family_of(d) is None
    assert family_of(AutoConfig.from_pretrained(d)) is None
    assert family_of({"model_type": "qwen3"}) is None
    with pytest.raises(ValueError, match="architectures"):
        load_family_info(d)


def test_load_family_info_accepts_config_json_path(tmp_path):
    d = _write(tmp_path, "s", SDAR_8B, SDAR_GEN)
    assert load_family_info(d / "config.json") == load_family_info(d)
