"""Checkpoint configs of the block-diffusion families (SDAR, Fast-dLLM v2, LLaDA2.x, D2F Dream / LLaDA).

Two parts:

* HF config classes for the ``model_type`` values of the released checkpoints (``sdar``, ``sdar_moe``,
  ``Fast_dLLM_Qwen``, ``llada2_moe``, ``Dream``, ``llada``; plus dFactory's ``llada2_moe_veomni`` spelling).  None is a transformers
  built-in and the upstream remote code is pinned to transformers 4.x, so the plugin ships its own.
  :func:`register_hf_configs` registers them with ``AutoConfig`` so a real ``config.json`` loads without
  ``trust_remote_code``.
* :class:`FamilyInfo` / :func:`family_info`: everything the decoding engine needs from a checkpoint's
  config (family, block size, mask id, stop ids, logit alignment), validated, with the family defaults of
  :mod:`vllm_s2d2.families` (``docs/families.md``) as fallbacks.

Importing this module imports transformers' *config* classes only (never modeling code).

transformers 5.x notes (checked on 5.17):

* Configs are dataclasses (``PreTrainedConfig.__init_subclass__`` turns every subclass into a kw-only
  dataclass and wraps ``__init__`` to accept unknown keys).  A subclass therefore declares new fields as
  annotated class attributes, not through ``__init__``; unknown ``config.json`` keys (``block_size``,
  ``mask_token_id``, training-only keys ...) are kept as plain attributes and written back by ``to_dict``.
* ``rope_theta`` / ``rope_scaling`` are folded into ``rope_parameters`` (``{"rope_type": "default",
  "rope_theta": ...}``) and **the ``rope_theta`` attribute no longer exists** on Qwen2/Qwen3 configs.
* ``torch_dtype`` becomes ``dtype`` (a ``torch.dtype``); ``attn_implementation`` is popped into
  ``_attn_implementation``; generation keys (``use_cache`` excepted where declared, ``temperature`` ...) are
  dropped from model configs.
* ``Qwen3MoeConfig`` has no ``head_dim`` field (SDAR-MoE's ``head_dim`` is kept as a pass-through; we declare
  it here so it has the Qwen3 default 128).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from transformers import AutoConfig, LlamaConfig, PreTrainedConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

from vllm_s2d2.families import BY_ARCHITECTURE, BY_NAME

__all__ = [
    "LLADA_TO_LLAMA",
    "llada_to_llama_name",
    "ARCH_TO_FAMILY",
    "CONFIG_CLASSES",
    "SDARConfig",
    "SDARMoeConfig",
    "FastDLLMQwenConfig",
    "LLaDA2MoeConfig",
    "LLaDA2MoeVeomniConfig",
    "DreamConfig",
    "LLaDAConfig",
    "LLADA_KEY_MAP",
    "FamilyInfo",
    "register_hf_configs",
    "family_info",
    "load_family_info",
    "family_of",
]


# --------------------------------------------------------------------------------------------------------
# HF config classes
# --------------------------------------------------------------------------------------------------------


class SDARConfig(Qwen3Config):
    """SDAR dense (``JetLM/SDAR-*-Chat``): a Qwen3 config.

    Upstream ``configuration_sdar.SDARConfig`` (SDAR's own ``training/model/SDAR-8B-Chat``) is Qwen3's
    config with ``head_dim=128``, ``tie_word_embeddings=False`` defaults; ``block_size`` and ``mask_token_id``
    are *not* declared there (pass-through kwargs), so they stay pass-through here too:
    :func:`family_info` supplies the family defaults when they are absent.
    """

    model_type = "sdar"


class SDARMoeConfig(Qwen3MoeConfig):
    """SDAR MoE (``SDAR-30B-A3B``): a Qwen3-MoE config (as lmdeploy's ``models/sdar_moe.py`` reads it)."""

    model_type = "sdar_moe"

    # Qwen3MoeConfig (transformers 5.17) has no head_dim field; Qwen3-MoE checkpoints carry one.
    head_dim: int | None = 128


class FastDLLMQwenConfig(Qwen2Config):
    """Fast-dLLM v2 (``Efficient-Large-Model/Fast_dLLM_v2_*``): a Qwen2 config + ``bd_size``.

    Follows ``configuration.Fast_dLLM_QwenConfig`` (the reference code's ``Fast-dLLM-v2/configuration_fast.py``): Qwen2
    fields + ``layer_types`` + ``bd_size=32``.  Upstream has no mask field; ``mask_token_id`` is a pass-through
    (the plugin falls back to 151665).
    """

    model_type = "Fast_dLLM_Qwen"

    bd_size: int = 32


class LLaDA2MoeConfig(PreTrainedConfig):
    """LLaDA2.x (``inclusionAI/LLaDA2.0-mini``, ``LLaDA2.1-mini``): BailingMoeV2-style MoE.

    Field list: the reference code's ``LLaDA2/configuration_llada2_moe.py`` plus the pass-through keys of the real
    ``config.json`` (dFactory's ``configs/model_configs/llada2_mini/config.json``) that vLLM's
    ``BailingMoeV2ForCausalLM`` reads (``score_function``, ``moe_router_enable_expert_bias``,
    ``router_dtype``, ``use_rmsnorm``, ``rotary_dim``, ``norm_topk_prob``; see ``bailing_moe.py``).

    Defaults are the *mini* model's values, not the upstream class defaults (which differ from the model:
    ``vocab_size 30592``, ``use_bias True``, ...), except:

    * ``rotary_dim`` defaults to ``None``: vLLM 0.26 then rotates ``head_dim * partial_rotary_factor`` dims
      (= 64 for the mini model, the same as its ``rotary_dim 64``), which stays right for tiny test configs
      with another ``head_dim``.
    * ``use_qk_norm`` defaults to ``True``: the HF modeling always applies the q/k RMSNorm, while vLLM reads
      ``getattr(config, "use_qk_norm", False)``.
    * ``eos_token_id`` defaults to ``None`` (the real config has only ``pad_token_id``); :func:`family_info`
      falls back to 156892 (= pad), the id the reference code hard-codes.
    * ``max_position_embeddings`` 32768 (LLaDA2.1-mini / HF release; dFactory's training copy says 16384).
    * ``block_size`` / ``mask_token_id`` are not declared (no such keys upstream); they pass through when a
      ``config.json`` has them, and :func:`family_info` falls back to 32 / 156895.
    """

    model_type = "llada2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int | None = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    head_dim: int | None = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    use_bias: bool = False
    use_rmsnorm: bool = True
    rms_norm_eps: float = 1e-6
    norm_head: bool = False
    tie_word_embeddings: bool = False
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    initializer_range: float = 0.02
    max_position_embeddings: int = 32768
    rope_parameters: dict | None = None
    partial_rotary_factor: float = 0.5
    rotary_dim: int | None = None
    use_cache: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    # MoE
    num_experts: int = 256
    num_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int | None = 512
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    router_dtype: str | None = "fp32"
    output_router_logits: bool = False
    # special tokens
    pad_token_id: int | None = 156892
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # RoPE: LLaDA2 mini uses theta 600000 (transformers' generic default would be 10000).
    default_theta = 600000.0

    def __post_init__(self, **kwargs):
        # Upstream treats num_key_value_heads == 0 / None as "same as attention heads" and head_dim None as
        # hidden // heads (the reference code's configuration_llada2_moe.py).
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)


class LLaDA2MoeVeomniConfig(LLaDA2MoeConfig):
    """dFactory's training spelling ``llada2_moe_veomni``; same fields.

    Note: dFactory checkpoints store *merged* experts (``scripts/moe_convertor.py``); only the config parses
    here, the weights need ``--mode split`` first.
    """

    model_type = "llada2_moe_veomni"


class DreamConfig(Qwen2Config):
    """Dream (``Dream-org/Dream-v0-Base-7B``; D2F once its LoRA is merged): a Qwen2 config, ``model_type "Dream"``.

    Dream's own ``configuration_dream.py`` is Qwen2's field list; ``mask_token_id`` and the D2F marker ``d2f``
    pass through (:func:`family_info` reads them).
    """

    model_type = "Dream"


# LLaDA (OLMo-style) config.json key -> the HF Llama name vLLM's Llama and transformers read.
LLADA_KEY_MAP: dict[str, str] = {
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "mlp_hidden_size": "intermediate_size",
    "embedding_size": "vocab_size",  # the embedding / head rows (>= the tokenizer's vocab_size)
    "max_sequence_length": "max_position_embeddings",
    "weight_tying": "tie_word_embeddings",
    "activation_type": "hidden_act",
}


class LLaDAConfig(LlamaConfig):
    """LLaDA-8B (``GSAI-ML/LLaDA-8B-Instruct``; D2F once its LoRA is merged): OLMo-style keys on a Llama config.

    The OLMo keys of :data:`LLADA_KEY_MAP` (when present) set the Llama fields, so vLLM's ``LlamaForCausalLM``
    reads the right shapes; ``rope_theta`` / ``rms_norm_eps`` keep their names.  ``include_bias`` sets both
    ``attention_bias`` and ``mlp_bias`` (LLaDA-8B: false).  The other OLMo keys pass through.
    """

    model_type = "llada"

    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    mlp_hidden_size: int | None = None
    embedding_size: int | None = None
    max_sequence_length: int | None = None
    weight_tying: bool | None = None
    activation_type: str | None = None
    include_bias: bool | None = None
    rms_norm_eps: float = 1e-5
    # no Llama eos / bos defaults (2 / 1): without an eos, family_info falls back to the family's stop ids.
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    default_theta = 500000.0

    def __post_init__(self, **kwargs):
        for olmo_key, llama_key in LLADA_KEY_MAP.items():
            value = getattr(self, olmo_key)
            if value is not None:
                setattr(self, llama_key, value)
        if self.include_bias is not None:
            self.attention_bias = self.mlp_bias = bool(self.include_bias)
        super().__post_init__(**kwargs)


CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {
    cls.model_type: cls
    for cls in (SDARConfig, SDARMoeConfig, FastDLLMQwenConfig, LLaDA2MoeConfig, LLaDA2MoeVeomniConfig, DreamConfig,
                LLaDAConfig)
}

_REGISTERED = False


def register_hf_configs() -> None:
    """Register the config classes with transformers' ``AutoConfig`` (idempotent, cheap)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for model_type, cls in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, cls, exist_ok=True)
    _REGISTERED = True


# --------------------------------------------------------------------------------------------------------
# Family info
# --------------------------------------------------------------------------------------------------------

# architecture -> family name (vllm_s2d2.families)
ARCH_TO_FAMILY: dict[str, str] = {arch: fam.name for arch, (fam, _) in BY_ARCHITECTURE.items()}


@dataclass(frozen=True)
class FamilyInfo:
    """What the engine needs from a block-diffusion checkpoint."""

    family: str  # "sdar" | "fast_dllm_v2" | "llada2" | "d2f_dream" | "d2f_llada"
    architecture: str
    block_size: int
    mask_token_id: int
    stop_token_ids: tuple[int, ...]
    shifted: bool  # True: logit i predicts token i+1 (Fast-dLLM v2, Dream); False: position-aligned
    vocab_size: int
    block_origin: str = "absolute"  # "prompt": blocks are counted from the prompt end (D2F)
    pipelined: bool = False  # several active blocks decode at once (D2F)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` of a dict or config object; a dotted key (``d2f.block_size``) reads nested mappings."""
    head, _, rest = key.partition(".")
    value = cfg.get(head, default) if isinstance(cfg, Mapping) else getattr(cfg, head, default)
    if not rest:
        return value
    return _get(value, rest, default) if isinstance(value, Mapping) else default


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _architecture(cfg: Any) -> str:
    archs = _get(cfg, "architectures")
    supported = ", ".join(sorted(ARCH_TO_FAMILY))
    if not archs:
        raise ValueError(
            f"config has no `architectures`; cannot tell the block-diffusion family (supported: {supported})"
        )
    if isinstance(archs, str):
        archs = [archs]
    for a in archs:
        if a in ARCH_TO_FAMILY:
            return a
    raise ValueError(
        f"`architectures` {list(archs)} is not a supported block-diffusion architecture (supported: {supported})"
    )


def _eos_list(value: Any, source: str) -> list[int]:
    if value is None:
        return []
    items = [value] if not isinstance(value, (list, tuple)) else list(value)
    for v in items:
        if not _is_int(v):
            raise ValueError(f"`eos_token_id` in {source} must be an int or a list of ints, got {value!r}")
    return items


def family_info(hf_config: Any, generation_config: Mapping[str, Any] | Any | None = None) -> FamilyInfo:
    """Read and validate a block-diffusion checkpoint's config.

    ``hf_config`` is a transformers config object or the raw ``config.json`` dict; ``generation_config`` the
    ``generation_config.json`` dict (or a ``GenerationConfig``), optional.  Every error is a ``ValueError``
    whose message names the offending field.
    """
    arch = _architecture(hf_config)
    family = ARCH_TO_FAMILY[arch]
    fam = BY_NAME[family]
    _check_marker(hf_config, fam, arch)

    # LLaDA's rows (embedding and head) are `embedding_size` (>= its tokenizer's `vocab_size`): the logits width.
    vocab_size = _get(hf_config, "embedding_size") or _get(hf_config, "vocab_size")
    if not _is_int(vocab_size) or vocab_size <= 0:
        raise ValueError(f"`vocab_size` must be a positive int, got {vocab_size!r}")

    # Block size: SDAR / LLaDA2 `block_size`; Fast-dLLM v2 `bd_size` (then `block_size`); else the default.
    block_key = fam.block_size_key
    block_size = _get(hf_config, block_key)
    if block_size is None and block_key != "block_size":
        alt = _get(hf_config, "block_size")
        if alt is not None:
            block_key, block_size = "block_size", alt
    if block_size is None:
        block_size = fam.default_block_size
    if not _is_int(block_size) or block_size <= 0:
        raise ValueError(f"`{block_key}` (block size) must be a positive int, got {block_size!r}")

    # Mask id: `mask_token_id`, else the family default when it fits the vocabulary.
    mask = _get(hf_config, "mask_token_id")
    if mask is None:
        if fam.default_mask_token_id >= vocab_size:
            raise ValueError(
                f"config has no `mask_token_id` and the {family} default mask id {fam.default_mask_token_id} is "
                f"outside the vocabulary (vocab_size={vocab_size}); set `mask_token_id` in config.json"
            )
        mask = fam.default_mask_token_id
    if not _is_int(mask):
        raise ValueError(f"`mask_token_id` must be an int, got {mask!r}")
    if not 0 <= mask < vocab_size:
        raise ValueError(f"`mask_token_id` {mask} is outside the vocabulary [0, {vocab_size})")

    # Stop ids: generation_config eos first, then config eos; ordered, deduplicated.
    gen_eos = _get(generation_config, "eos_token_id") if generation_config is not None else None
    stops: list[int] = []
    for v in _eos_list(gen_eos, "generation_config") + _eos_list(_get(hf_config, "eos_token_id"), "config"):
        if v not in stops:
            stops.append(v)
    if not stops:
        # No eos anywhere (e.g. the LLaDA2 release config has only pad_token_id): use the family's
        # hard-coded stop ids where they fit the vocabulary.
        stops = [s for s in fam.default_stop_token_ids if s < vocab_size]
    for s in stops:
        if not 0 <= s < vocab_size:
            raise ValueError(f"`eos_token_id` {s} is outside the vocabulary [0, {vocab_size})")
    if mask in stops:
        raise ValueError(
            f"`mask_token_id` {mask} is also a stop id (`eos_token_id` {stops}); the mask must not stop decoding"
        )

    return FamilyInfo(
        family=family,
        architecture=arch,
        block_size=block_size,
        mask_token_id=mask,
        stop_token_ids=tuple(stops),
        shifted=fam.shifted,
        vocab_size=vocab_size,
        block_origin=fam.block_origin,
        pipelined=fam.pipelined,
    )


def _check_marker(hf_config: Any, fam: Any, arch: str) -> None:
    """A family with a ``marker_key`` (D2F) needs it in config.json: the bare base models share the architecture."""
    if fam.marker_key is None:
        return
    marker = _get(hf_config, fam.marker_key)
    if marker is None:
        raise ValueError(
            f"`architectures` {arch!r} without the `{fam.marker_key}` key in config.json: plain Dream / LLaDA "
            f"checkpoints are full-attention models, and {fam.title} decodes block-causally, which needs the D2F "
            f"LoRA merged in (without it the output is garbage). Merge the D2F LoRA first: `vllm-s2d2 merge-d2f-lora BASE_DIR ADAPTER_DIR OUT_DIR "
            f"--block-size 32` writes the merged weights and the marker `\"{fam.marker_key}\": "
            f"{{\"block_size\": 32}}`")
    if not isinstance(marker, Mapping):
        raise ValueError(f"`{fam.marker_key}` in config.json must be an object like {{\"block_size\": 32}}, "
                         f"got {marker!r}")


def _read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict; a file that is not a JSON object is a ``ValueError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not a UTF-8 text file (a JSON object is expected)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _config_json(path: str | os.PathLike) -> tuple[Path, dict]:
    p = Path(path)
    cfg_path = p if p.is_file() else p / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json found at {str(p)!r} (expected {str(cfg_path)!r})")
    return cfg_path, _read_json(cfg_path)


def load_family_info(path: str | os.PathLike) -> FamilyInfo:
    """:func:`family_info` of a local checkpoint dir (``config.json`` + optional ``generation_config.json``)."""
    cfg_path, cfg = _config_json(path)
    gen_path = cfg_path.parent / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else None
    return family_info(cfg, gen)


def family_of(path_or_config: str | os.PathLike | Mapping[str, Any] | Any) -> str | None:
    """The block-diffusion family of a checkpoint dir / config dict / config object, or ``None`` if it is
    not one (e.g. a plain ``Qwen3ForCausalLM``)."""
    if isinstance(path_or_config, (str, os.PathLike)):
        _, cfg = _config_json(path_or_config)
    else:
        cfg = path_or_config
    archs = _get(cfg, "architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for a in archs:
        if a in ARCH_TO_FAMILY:
            return ARCH_TO_FAMILY[a]
    return None


# LLaDA-8B's OLMo tensor names -> transformers / vLLM Llama names (LLaDA's block is Llama's: RMSNorm, rotate-half
# RoPE, SwiGLU with ``ff_proj`` = gate); read by the reference backbone and the vLLM model class.
LLADA_TO_LLAMA: tuple[tuple[str, str], ...] = (
    (r"model\.transformer\.wte\.weight", "model.embed_tokens.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.(q_proj|k_proj|v_proj)\.weight", r"model.layers.\1.self_attn.\2.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn_out\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_proj\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.up_proj\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_out\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"model\.transformer\.ln_f\.weight", "model.norm.weight"),
    (r"model\.transformer\.ff_out\.weight", "lm_head.weight"),
)
_LLADA_PATTERNS = tuple((re.compile(pattern), template) for pattern, template in LLADA_TO_LLAMA)


def llada_to_llama_name(name: str) -> str:
    """The Llama name of a LLaDA checkpoint tensor (ValueError for a tensor Llama has no place for)."""
    for pattern, template in _LLADA_PATTERNS:
        if pattern.fullmatch(name):
            return pattern.sub(template, name)
    raise ValueError(f"LLaDA checkpoint tensor {name!r} has no Llama counterpart (biases are not supported)")
