"""Model-forward layer of the eager reference decoder (an oracle: clarity over speed).

There is no KV cache.  Every call recomputes the whole sequence with an explicit dense boolean
mask ``visible[i, j]`` (query i may attend key j, in every layer), which lets the caller state
exactly which keys each token saw when its KV was "stored".  Position ids are explicit, so the
S2D2 "2L" verifier layout (same positions twice) is expressible.

Backbones by ``model_type`` (:data:`vllm_s2d2.families.BACKBONES`):
  * ``qwen3``      -- SDAR ``sdar`` -> transformers ``Qwen3ForCausalLM``
  * ``qwen3_moe``  -- SDAR ``sdar_moe`` -> transformers ``Qwen3MoeForCausalLM``
  * ``qwen2``      -- Fast-dLLM v2 ``Fast_dLLM_Qwen`` and D2F ``Dream`` -> transformers ``Qwen2ForCausalLM``
                      (q/k/v bias; same tensor names)
  * ``llada2``     -- LLaDA2.x ``llada2_moe`` -> pure-torch :mod:`vllm_s2d2.reference.llada2_model`
  * ``llada``      -- D2F ``llada`` (LLaDA-8B, OLMo names) -> transformers ``LlamaForCausalLM`` after the
                      key remap :data:`LLADA_TO_LLAMA` (LLaDA's block is Llama's: RMSNorm, rotate-half RoPE,
                      SwiGLU with ``ff_proj`` = gate)

How transformers 5.17 treats the mask (``masking_utils.py``, ``integrations/sdpa_attention.py``,
``models/qwen3/modeling_qwen3.py``):
  * ``create_causal_mask`` / ``create_sliding_window_causal_mask`` call
    ``_preprocess_mask_arguments``, whose first check returns any 4-D tensor *as is* (early exit):
    no causal mask is AND-ed in, no padding logic, no packed-sequence detection (that only runs
    when ``attention_mask is None``).  The 4-D mask is handed unchanged to every layer.
  * ``sdpa``: the mask goes straight to ``F.scaled_dot_product_attention(attn_mask=...)`` and
    ``is_causal`` is forced False whenever a mask is given.  A *bool* mask has torch's meaning
    (True = attend; False -> -inf, i.e. exactly zero weight).  GQA is done with ``repeat_kv``
    because a mask is present.
  * ``eager``: the mask is *added* to the scores (``attn_weights + attention_mask``).  A bool
    mask would silently be added as 0/1, i.e. ignored; eager needs an additive float mask
    (0 / finfo.min), where masked keys get weight exp(min - max) which is 0 only after underflow.
We therefore use ``attn_implementation="sdpa"`` with a bool ``[1, 1, n, n]`` mask: it honours the
mask exactly as given (masked keys contribute exactly 0) with no dtype-dependent "min" value.
MoE experts run with ``experts_implementation="eager"`` (plain per-expert loop).

The Qwen3-MoE checkpoint stores per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``;
transformers 5 keeps fused ``mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows first) and
``mlp.experts.down_proj [E, H, I]`` and converts at ``from_pretrained`` time.  We build the
model from the config and load the state dict ourselves, so we do that conversion here (strictly:
every expert of every projection must be present).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any

import torch
from safetensors.torch import load_file

from vllm_s2d2.configs import LLADA_TO_LLAMA, llada_to_llama_name
from vllm_s2d2.families import BACKBONES, BY_ARCHITECTURE, BY_MODEL_TYPE

from .llada2_model import LLaDA2Config, LLaDA2ForLM

__all__ = ["ReferenceModel", "detect_family", "load_safetensors_dir", "qwen_hf_config", "llada_hf_config",
           "LLADA_TO_LLAMA", "llada_to_llama_state_dict"]


def _model_type(cfg: dict[str, Any]) -> str:
    mt = cfg.get("model_type")
    if mt:
        return mt
    for arch in cfg.get("architectures") or []:
        if arch in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[arch][1].model_type
    raise ValueError("config.json has neither a known model_type nor a known architecture")


def detect_family(cfg: dict[str, Any]) -> str:
    mt = _model_type(cfg)
    if mt not in BY_MODEL_TYPE:
        raise ValueError(f"unsupported model_type {mt!r}")
    return BY_MODEL_TYPE[mt].name


def load_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors in {path}")
    sd: dict[str, torch.Tensor] = {}
    for fn in files:
        part = load_file(os.path.join(path, fn))
        dup = sd.keys() & part.keys()
        if dup:
            raise ValueError(f"duplicate tensors across shards: {sorted(dup)[:5]}")
        sd.update(part)
    return sd


# ----------------------------------------------------------------------------------------------
# Qwen families: config translation + weight loading


def qwen_hf_config(cfg: dict[str, Any]):
    """Translate an SDAR / SDAR-MoE / Fast-dLLM v2 config.json dict into a transformers built-in config."""
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    mt = _model_type(cfg)
    backbone = BACKBONES.get(mt)
    if cfg.get("rope_scaling") not in (None, {}):
        raise NotImplementedError("rope_scaling is not supported by the reference")
    common = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        use_sliding_window=bool(cfg.get("use_sliding_window", False)),
        attention_dropout=0.0,
        use_cache=False,
    )
    if cfg.get("use_sliding_window"):
        # Only for fidelity; none of the supported checkpoints uses it.
        common["sliding_window"] = cfg.get("sliding_window")
        common["max_window_layers"] = cfg.get("max_window_layers", cfg["num_hidden_layers"])
    if backbone in ("qwen3", "qwen3_moe"):
        # SDARConfig default head_dim is 128 (configuration_sdar.py), not hidden // heads.
        common["head_dim"] = int(cfg.get("head_dim") or 128)
        common["attention_bias"] = bool(cfg.get("attention_bias", False))
        if backbone == "qwen3":
            return Qwen3Config(**common)
        return Qwen3MoeConfig(
            **common,
            num_experts=cfg["num_experts"],
            num_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
            mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
        )
    if backbone == "qwen2":
        if cfg.get("layer_types") is not None:
            common["layer_types"] = list(cfg["layer_types"])
        # Qwen2 always has q/k/v bias; head_dim = hidden // heads (no head_dim field).
        return Qwen2Config(**common)
    raise ValueError(f"not a Qwen-family model_type: {mt!r}")


_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _fuse_qwen3_moe_experts(sd: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint names -> transformers 5 fused ``gate_up_proj`` / ``down_proj`` parameters."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for k, v in sd.items():
        m = _EXPERT_RE.match(k)
        if m is None:
            out[k] = v
            continue
        prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
        groups.setdefault(prefix, {}).setdefault(proj, {})[e] = v
    for prefix, projs in groups.items():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = projs.get(proj, {})
            if sorted(got) != list(range(num_experts)):
                missing = sorted(set(range(num_experts)) - set(got))
                extra = sorted(set(got) - set(range(num_experts)))
                raise KeyError(f"{prefix}.*.{proj}: missing experts {missing}, unexpected experts {extra}")
        gate, up, down = (projs[p] for p in ("gate_proj", "up_proj", "down_proj"))
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([gate[e], up[e]], dim=0) for e in range(num_experts)])
        out[f"{prefix}.down_proj"] = torch.stack([down[e] for e in range(num_experts)])
    return out


def _no_init():
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()


def _build_qwen(cfg: dict[str, Any], sd: dict[str, torch.Tensor], device, dtype):
    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM

    hf_cfg = qwen_hf_config(cfg)  # raises unless the backbone is a Qwen one
    backbone = BACKBONES[_model_type(cfg)]
    cls = {"qwen3": Qwen3ForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM, "qwen2": Qwen2ForCausalLM}[backbone]
    kwargs = dict(attn_implementation="sdpa", dtype=dtype)
    if backbone == "qwen3_moe":
        kwargs["experts_implementation"] = "eager"
        sd = _fuse_qwen3_moe_experts(sd, hf_cfg.num_experts)
    with _no_init(), torch.device(device):
        model = cls._from_config(hf_cfg, **kwargs)
    sd = dict(sd)
    if hf_cfg.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)  # raises on missing / unexpected names or shape mismatch
    if hf_cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    assert model.config._attn_implementation == "sdpa"
    return model.eval()


# ----------------------------------------------------------------------------------------------
# D2F LLaDA: OLMo names -> transformers Llama

# (regex on the checkpoint name, Llama name template); each checkpoint tensor must match exactly one.
def llada_to_llama_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LLaDA (OLMo-named) state dict under transformers Llama's names."""
    return {llada_to_llama_name(name): tensor for name, tensor in sd.items()}


# LLaDA features the Llama block lacks: (config key, the value LLaDA-8B has, the only one supported here)
_LLADA_REQUIRED = (("block_type", "llama"), ("layer_norm_type", "rms"), ("include_bias", False),
                   ("include_qkv_bias", False), ("alibi", False), ("input_emb_norm", False),
                   ("scale_logits", False), ("rope", True), ("attention_layer_norm", False))


def llada_hf_config(cfg: dict[str, Any]):
    """Translate a D2F LLaDA config.json (OLMo keys) into a transformers ``LlamaConfig``."""
    from transformers import LlamaConfig

    for key, supported in _LLADA_REQUIRED:
        if key in cfg and cfg[key] != supported:
            raise NotImplementedError(f"LLaDA `{key}`={cfg[key]!r} is not supported by the reference "
                                      f"(only {supported!r})")
    if cfg.get("rope_scaling") not in (None, {}):
        raise NotImplementedError("rope_scaling is not supported by the reference")
    heads = cfg["n_heads"]
    return LlamaConfig(
        vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
        hidden_size=cfg["d_model"],
        intermediate_size=cfg["mlp_hidden_size"],
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("n_kv_heads") or heads,
        hidden_act=cfg.get("activation_type", "silu"),
        max_position_embeddings=cfg.get("max_sequence_length", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        use_cache=False,
    )


def _build_llada(cfg: dict[str, Any], sd: dict[str, torch.Tensor], device, dtype):
    from transformers import LlamaForCausalLM

    hf_cfg = llada_hf_config(cfg)
    with _no_init(), torch.device(device):
        model = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    sd = llada_to_llama_state_dict(sd)
    if hf_cfg.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)
    if hf_cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    assert model.config._attn_implementation == "sdpa"
    return model.eval()


# ----------------------------------------------------------------------------------------------


class ReferenceModel:
    """Stateless dense-mask forward over one unbatched sequence.

    ``logits(input_ids [n], position_ids [n], visible [n, n] bool, rows [m] | None) -> fp32 [m, V]``
    where ``visible[i, j]`` = query i may attend key j in every layer.
    """

    family: str
    vocab_size: int

    def __init__(self, family: str, config: dict[str, Any], module: torch.nn.Module, device, dtype):
        self.family = family
        self.config = config  # raw config.json dict
        self.model_type = _model_type(config)
        self.backbone = BACKBONES[self.model_type]
        self.vocab_size = int(config["vocab_size"])
        self.module = module  # transformers *ForCausalLM, or LLaDA2ForLM
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def load(cls, path: str, device="cpu", dtype: torch.dtype = torch.float32) -> "ReferenceModel":
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        family = detect_family(cfg)
        sd = load_safetensors_dir(path)
        backbone = BACKBONES[_model_type(cfg)]
        if backbone == "llada":
            module = _build_llada(cfg, sd, device, dtype)
        elif backbone == "llada2":
            lcfg = LLaDA2Config.from_dict(cfg)
            with torch.device(device):
                module = LLaDA2ForLM(lcfg)
            module.to_dtype(dtype)
            module.load_checkpoint_state(sd)
            module.eval()
        else:
            module = _build_qwen(cfg, sd, device, dtype)
        return cls(family, cfg, module, device, dtype)

    # -- forward ---------------------------------------------------------------------------------

    def _check(self, input_ids, position_ids, visible):
        n = input_ids.shape[0]
        if input_ids.dim() != 1 or position_ids.shape != (n,):
            raise ValueError(f"input_ids/position_ids must be 1-D of equal length, got {input_ids.shape}, {position_ids.shape}")
        if visible.shape != (n, n) or visible.dtype != torch.bool:
            raise ValueError(f"visible must be a bool [{n}, {n}] tensor, got {visible.dtype} {tuple(visible.shape)}")
        if n == 0:
            raise ValueError("empty sequence")
        if not bool(visible.any(dim=1).all()):
            raise ValueError("every row of `visible` must have at least one True")

    @torch.no_grad()
    def hidden_states(self, input_ids, position_ids, visible) -> torch.Tensor:
        """Final-norm hidden states [n, H] in the model dtype."""
        self._check(input_ids, position_ids, visible)
        ids = input_ids.to(self.device, torch.long)
        pos = position_ids.to(self.device, torch.long)
        vis = visible.to(self.device)
        if self.backbone == "llada2":
            return self.module(ids, pos, vis)
        out = self.module.model(
            input_ids=ids[None], position_ids=pos[None], attention_mask=vis[None, None], use_cache=False
        )
        return out.last_hidden_state[0]

    @torch.no_grad()
    def logits(self, input_ids, position_ids, visible, rows=None) -> torch.Tensor:
        h = self.hidden_states(input_ids, position_ids, visible)
        if rows is not None:
            h = h[rows.to(self.device, torch.long)]
        return self.module.lm_head(h).float()
