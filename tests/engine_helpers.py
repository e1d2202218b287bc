"""Shared helpers of the engine tests (CPU and GPU): a tiny random SDAR / SDAR-MoE checkpoint builder, and the
causal greedy decoder of the shifted-model invariant (:func:`causal_greedy`).

Temporary local builder (``vllm_s2d2.testing.build_tiny_checkpoint`` is not there yet): real tensor names and
``config.json`` keys of SDAR, V = 512 with the special ids inside the vocabulary.  ``head_std``
scales ``lm_head`` so that the tiny model is *confident* (peaked distributions): dynamic remasking then commits
several tokens per step and greedy argmax has clear margins (fewer fp near-ties between engine and reference);
``lin_std`` (attention / MLP projections) is large enough that outputs depend on the context (with small
projections a random model repeats one token, which would hide position bugs).  The mask token's ``lm_head``
row is zero (logit 0, far below the top logits): a random head would otherwise sometimes make ``<MASK>`` the
most likely token, and a block whose committed token *is* the mask id never finishes (the reference decoder
loops forever; the engine suppresses the mask logit, see ``S2D2Stepper``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch

V = 512
MASK_ID = 511
EOS_ID = 500

SDAR_CFG = {
    "architectures": ["SDARForCausalLM"], "model_type": "sdar", "vocab_size": V, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000, "rope_scaling": None, "attention_bias": False, "use_sliding_window": False,
    "max_window_layers": 2, "tie_word_embeddings": False, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID,
    "block_size": 4, "mask_token_id": MASK_ID, "torch_dtype": "bfloat16",
}
SDAR_MOE_CFG = dict(
    SDAR_CFG, architectures=["SDARMoeForCausalLM"], model_type="sdar_moe", num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
)
QWEN3_CFG = dict(SDAR_CFG, architectures=["Qwen3ForCausalLM"], model_type="qwen3")
for _k in ("block_size", "mask_token_id"):
    QWEN3_CFG.pop(_k)


def _tensors(cfg: dict, gen: torch.Generator, head_std: float, emb_std: float, lin_std: float
             ) -> dict[str, torch.Tensor]:
    h, nl = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    shapes: dict[str, tuple] = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,),
                                "lm_head.weight": (V, h)}
    norms = {"model.norm.weight"}

    def mlp(p, inter):
        shapes.update({f"{p}.gate_proj.weight": (inter, h), f"{p}.up_proj.weight": (inter, h),
                       f"{p}.down_proj.weight": (h, inter)})

    for n in range(nl):
        p = f"model.layers.{n}"
        for proj, out in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            shapes[f"{p}.self_attn.{proj}.weight"] = (out, h)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, nh * hd)
        for nm in ("q_norm", "k_norm"):
            shapes[f"{p}.self_attn.{nm}.weight"] = (hd,)
            norms.add(f"{p}.self_attn.{nm}.weight")
        if cfg["model_type"] == "sdar_moe":
            shapes[f"{p}.mlp.gate.weight"] = (cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
        else:
            mlp(f"{p}.mlp", cfg["intermediate_size"])
        for ln in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{p}.{ln}.weight"] = (h,)
            norms.add(f"{p}.{ln}.weight")
    out = {}
    for k, s in shapes.items():
        if k in norms:
            t = 1.0 + 0.1 * torch.randn(s, generator=gen)
        elif k == "lm_head.weight":
            t = head_std * torch.randn(s, generator=gen)
        elif k == "model.embed_tokens.weight":
            t = emb_std * torch.randn(s, generator=gen)
        else:
            t = lin_std * torch.randn(s, generator=gen)
        if k == "lm_head.weight":
            t[MASK_ID] = 0.0  # like a trained model, never *predict* the mask token (see module docstring)
        out[k] = t.to(torch.bfloat16).contiguous()
    return out


def build_tiny_checkpoint(path: str, variant: str = "sdar", seed: int = 0, head_std: float = 2.0,
                          emb_std: float = 1.0, lin_std: float = 0.4, **overrides) -> str:
    """Write ``config.json`` + ``model.safetensors`` for ``variant`` in {"sdar", "sdar_moe", "qwen3"}."""
    from safetensors.torch import save_file

    cfg = dict({"sdar": SDAR_CFG, "sdar_moe": SDAR_MOE_CFG, "qwen3": QWEN3_CFG}[variant], **overrides)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    save_file(_tensors(cfg, torch.Generator().manual_seed(seed), head_std, emb_std, lin_std),
              os.path.join(path, "model.safetensors"))
    return path


def causal_greedy(model, mask_id: int, prompt: list[int], n: int) -> list[int]:
    """``n`` tokens of plain causal greedy decoding with a dense reference model (``ReferenceModel``), the mask id
    excluded: what a shift-aligned model's S2D2 with ``cache_ver`` + always-verify + greedy acceptance commits."""
    from vllm_s2d2.core.sampling import exclude_token

    ids = list(prompt)
    for _ in range(n):
        L = len(ids)
        vis = torch.ones(L, L, dtype=torch.bool).tril()
        logits = model.logits(torch.tensor(ids), torch.arange(L), vis)[-1:]
        ids.append(int(exclude_token(logits, mask_id).argmax()))
    return ids[len(prompt):]


@contextlib.contextmanager
def vllm_log_records():
    """The records vLLM's ``vllm`` logger emits at INFO inside the block (a list, filled as they come)."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = seen.append
    vllm_logger = logging.getLogger("vllm")
    level = vllm_logger.level
    vllm_logger.addHandler(handler)
    vllm_logger.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        vllm_logger.removeHandler(handler)
        vllm_logger.setLevel(level)
