"""Compact pure-torch LLaDA2.x (Bailing-MoE-V2) forward for the reference decoder.

transformers has no Bailing-MoE model, so this re-implements the HF release modeling
(the ``modeling_llada2_moe.py`` remote code of the LLaDA2 checkpoints) without KV cache and with an explicit
boolean attention mask.  Module names equal the checkpoint tensor names (docs/families.md), so
``load_state_dict(strict=True)`` is the name/shape check.

Semantics (per layer):
  x = x + dense(attn(input_layernorm(x)))
  x = x + mlp(post_attention_layernorm(x))     # dense MLP if layer < first_k_dense_replace else MoE
Attention: fused ``query_key_value`` -> [nh | nkv | nkv] heads of ``head_dim``; RMSNorm
``query_layernorm``/``key_layernorm`` over head_dim; NeoX RoPE on the first ``rotary_dim`` dims
(``rotary_dim`` from config if present, else ``int(head_dim * partial_rotary_factor)``); GQA
SDPA with the caller's boolean mask (True = may attend), scale head_dim**-0.5.
MoE: fp32 router logits -> sigmoid scores; group-limited top-k on ``scores + expert_bias``
(group score = sum of the top-2 biased scores in the group; keep ``topk_group`` of ``n_group``
groups; then top ``num_experts_per_tok`` experts); weights = *unbiased* sigmoid scores of the
chosen experts, renormalised (if ``norm_topk_prob``) and multiplied by ``routed_scaling_factor``;
plus the shared expert (width ``moe_intermediate_size * num_shared_experts``) added unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LLaDA2Config",
    "LLaDA2ForLM",
    "rms_norm",
    "rope_cos_sin",
    "apply_partial_rope",
    "route",
]


@dataclass
class LLaDA2Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int | None
    num_experts_per_tok: int
    num_shared_experts: int | None
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    rms_norm_eps: float
    rope_theta: float
    use_qkv_bias: bool
    use_bias: bool
    use_qk_norm: bool
    tie_word_embeddings: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LLaDA2Config":
        hidden = int(d["hidden_size"])
        nh = int(d["num_attention_heads"])
        head_dim = int(d.get("head_dim") or hidden // nh)
        if d.get("rotary_dim") is not None:
            rotary_dim = int(d["rotary_dim"])
        else:
            rotary_dim = int(head_dim * float(d.get("partial_rotary_factor", 1.0)))
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"bad rotary_dim {rotary_dim} for head_dim {head_dim}")
        # Fail loudly on variants this reference does not implement.
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {d.get('hidden_act')!r}")
        if not d.get("use_rmsnorm", True):
            raise NotImplementedError("use_rmsnorm=false (LayerNorm q/k norm) is not implemented")
        if d.get("score_function", "sigmoid") != "sigmoid":
            raise NotImplementedError(f"score_function {d.get('score_function')!r}")
        if d.get("rope_scaling") is not None:
            raise NotImplementedError("rope_scaling is not implemented")
        num_experts = d.get("num_experts")
        n_group = int(d.get("n_group") or 1)
        topk_group = int(d.get("topk_group") or n_group)
        k = int(d.get("num_experts_per_tok") or 0)
        if num_experts is not None:
            num_experts = int(num_experts)
            if num_experts % n_group:
                raise ValueError("num_experts must be divisible by n_group")
            if num_experts // n_group < 2:
                raise ValueError("group-limited top-k needs >= 2 experts per group")
            if topk_group * (num_experts // n_group) < k:
                raise ValueError("topk_group * experts_per_group < num_experts_per_tok")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=nh,
            num_key_value_heads=int(d.get("num_key_value_heads") or nh),
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            intermediate_size=int(d["intermediate_size"]),
            moe_intermediate_size=int(d.get("moe_intermediate_size") or 0),
            num_experts=num_experts,
            num_experts_per_tok=k,
            num_shared_experts=(None if d.get("num_shared_experts") is None else int(d["num_shared_experts"])),
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            first_k_dense_replace=int(d.get("first_k_dense_replace", 0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            use_qkv_bias=bool(d.get("use_qkv_bias", False)),
            use_bias=bool(d.get("use_bias", False)),
            use_qk_norm=bool(d.get("use_qk_norm", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )


# ----------------------------------------------------------------------------------------------
# functional pieces (also used directly by the tests)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LLaDA2MoeRMSNorm: normalise in fp32, cast back to the input dtype, then scale."""
    in_dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(in_dtype)


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 NeoX cos/sin of shape [n, rotary_dim] (frequencies repeated twice, as in HF)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=position_ids.device).float() / rotary_dim)
    )
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` [..., n, head_dim] NeoX-style; pass the rest."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def route(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid group-limited top-k router. hidden [T, H] -> (topk_idx [T, k] long, topk_weight [T, k] fp32)."""
    logits = F.linear(hidden.float(), gate_weight.float())  # [T, E] fp32
    scores = torch.sigmoid(logits)
    biased = scores + expert_bias.float()
    t, e = biased.shape
    group_scores = biased.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    masked = biased.masked_fill(~expert_mask, float("-inf"))
    topk_idx = masked.topk(top_k, dim=-1).indices
    weights = scores.gather(1, topk_idx)
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_idx, weights * routed_scaling_factor


# ----------------------------------------------------------------------------------------------
# modules (names == checkpoint names)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router. Keep it in fp32 (``router_dtype: fp32``) whatever the model dtype: see ``LLaDA2ForLM.to_dtype``."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        return route(
            x, self.weight, self.expert_bias, top_k=c.num_experts_per_tok, n_group=c.n_group,
            topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.norm_topk_prob,
        )


class SparseMoe(nn.Module):
    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList([MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)])
        if cfg.num_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
        else:
            self.shared_experts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        topk_idx, topk_w = self.gate(x)
        # Routed experts: accumulate in fp32, per (expert, token) pair, in expert order.
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            tok, slot = (topk_idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            y = expert(x[tok]).float() * topk_w[tok, slot, None]
            out.index_add_(0, tok, y)
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class Attention(nn.Module):
    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, (nh + 2 * nkv) * hd, bias=cfg.use_qkv_bias)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(hd, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(hd, cfg.rms_norm_eps)
        self.dense = nn.Linear(nh * hd, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """x [n, H], cos/sin [n, rotary_dim], visible [n, n] bool -> [n, H]."""
        c = self.cfg
        n = x.shape[0]
        nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv = self.query_key_value(x).view(n, nh + 2 * nkv, hd)
        q, k, v = qkv.split([nh, nkv, nkv], dim=1)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, n, hd]
        if c.use_qk_norm:
            q = self.query_layernorm(q)
            k = self.key_layernorm(k)
        q = apply_partial_rope(q, cos, sin)
        k = apply_partial_rope(k, cos, sin)
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=visible[None, None], scale=hd**-0.5
        )[0]  # [nh, n, hd]
        return self.dense(o.transpose(0, 1).reshape(n, nh * hd))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLaDA2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.num_experts is not None and layer_idx >= cfg.first_k_dense_replace:
            self.mlp = SparseMoe(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, visible):
        x = x + self.attention(self.input_layernorm(x), cos, sin, visible)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin, visible)
        return self.norm(x)


class LLaDA2ForLM(nn.Module):
    """``model.*`` + ``lm_head``; unbatched: input_ids/position_ids [n], visible [n, n] -> hidden [n, H]."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, position_ids, visible)

    def to_dtype(self, dtype: torch.dtype) -> "LLaDA2ForLM":
        """Cast to ``dtype`` except the routers (weight + expert_bias), which stay fp32."""
        self.to(dtype)
        for m in self.modules():
            if isinstance(m, Gate):
                m.float()
        return self

    def load_checkpoint_state(self, sd: dict[str, torch.Tensor]) -> None:
        """Strict load: every checkpoint name must exist with the same shape and vice versa."""
        sd = dict(sd)
        if self.cfg.tie_word_embeddings and "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["model.word_embeddings.weight"]
        self.load_state_dict(sd, strict=True)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight
