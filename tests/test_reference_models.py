"""Tests of the reference decoder's model-forward layer (vllm_s2d2/reference/models.py, llada2_model.py).

CPU only.  Uses a private tiny-checkpoint builder (tiny configs of each family with V = 512 and the
special ids moved inside the vocabulary, N(0, 0.02) weights with the real tensor names, one
model.safetensors in bf16; LLaDA2 ``expert_bias`` non-zero fp32).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vllm_s2d2.reference import llada2_model as L
from vllm_s2d2.reference.models import ReferenceModel

V = 512

# ----------------------------------------------------------------------------------------------
# private tiny checkpoint builder

SDAR_CFG = {
    "architectures": ["SDARForCausalLM"], "model_type": "sdar", "vocab_size": V, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000, "rope_scaling": None, "attention_bias": False, "use_sliding_window": False,
    "max_window_layers": 2, "tie_word_embeddings": False, "bos_token_id": 500, "eos_token_id": 500,
    "block_size": 4, "mask_token_id": 511, "torch_dtype": "bfloat16",
}
SDAR_MOE_CFG = dict(
    SDAR_CFG, architectures=["SDARMoeForCausalLM"], model_type="sdar_moe", num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
)
FAST_CFG = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "vocab_size": V,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "use_sliding_window": False, "max_window_layers": 2,
    "layer_types": ["full_attention", "full_attention"], "bd_size": 32, "mask_token_id": 509,
    "bos_token_id": 500, "eos_token_id": 502, "pad_token_id": 502, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLADA2_CFG = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": V, "hidden_size": 64,
    "num_hidden_layers": 2, "first_k_dense_replace": 1, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_experts": 8, "num_experts_per_tok": 2, "num_shared_experts": 1, "n_group": 2, "topk_group": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True, "router_dtype": "fp32", "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "partial_rotary_factor": 0.5, "use_qk_norm": True,
    "use_rmsnorm": True, "use_qkv_bias": False, "use_bias": False, "norm_head": False, "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "rope_theta": 600000, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "pad_token_id": 505, "eos_token_id": 505, "mask_token_id": 508, "block_size": 32, "torch_dtype": "bfloat16",
}
LLADA2_RD_CFG = dict(LLADA2_CFG, rotary_dim=24)  # rotary_dim wins over head_dim * partial_rotary_factor (= 16)

VARIANTS = {
    "sdar": SDAR_CFG, "sdar_moe": SDAR_MOE_CFG, "fast": FAST_CFG, "llada2": LLADA2_CFG, "llada2_rd": LLADA2_RD_CFG,
}
QWEN_VARIANTS = ["sdar", "sdar_moe", "fast"]


def _tensors(cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Real tensor names/shapes for the family of ``cfg``; N(0, 0.02) matrices, norms 1 + small noise."""
    shapes: dict[str, tuple] = {}
    norms: list[str] = []
    h, nl = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    mlp = lambda p, i: shapes.update({f"{p}.gate_proj.weight": (i, h), f"{p}.up_proj.weight": (i, h),
                                      f"{p}.down_proj.weight": (h, i)})
    if cfg["model_type"] == "llada2_moe":
        shapes["model.word_embeddings.weight"] = (V, h)
        for n in range(nl):
            p = f"model.layers.{n}"
            shapes[f"{p}.attention.query_key_value.weight"] = ((nh + 2 * nkv) * hd, h)
            shapes[f"{p}.attention.dense.weight"] = (h, nh * hd)
            norms += [f"{p}.attention.query_layernorm.weight", f"{p}.attention.key_layernorm.weight"]
            shapes[norms[-2]] = shapes[norms[-1]] = (hd,)
            if n < cfg["first_k_dense_replace"]:
                mlp(f"{p}.mlp", cfg["intermediate_size"])
            else:
                e, mi = cfg["num_experts"], cfg["moe_intermediate_size"]
                shapes[f"{p}.mlp.gate.weight"] = (e, h)
                for j in range(e):
                    mlp(f"{p}.mlp.experts.{j}", mi)
                mlp(f"{p}.mlp.shared_experts", mi * cfg["num_shared_experts"])
            for ln in ("input_layernorm", "post_attention_layernorm"):
                norms.append(f"{p}.{ln}.weight")
                shapes[norms[-1]] = (h,)
    else:
        shapes["model.embed_tokens.weight"] = (V, h)
        bias = cfg["model_type"] == "Fast_dLLM_Qwen"
        for n in range(nl):
            p = f"model.layers.{n}"
            for proj, out in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
                shapes[f"{p}.self_attn.{proj}.weight"] = (out, h)
                if bias:
                    shapes[f"{p}.self_attn.{proj}.bias"] = (out,)
            shapes[f"{p}.self_attn.o_proj.weight"] = (h, nh * hd)
            if cfg["model_type"] != "Fast_dLLM_Qwen":
                norms += [f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"]
                shapes[norms[-2]] = shapes[norms[-1]] = (hd,)
            if cfg["model_type"] == "sdar_moe":
                shapes[f"{p}.mlp.gate.weight"] = (cfg["num_experts"], h)
                for j in range(cfg["num_experts"]):
                    mlp(f"{p}.mlp.experts.{j}", cfg["moe_intermediate_size"])
            else:
                mlp(f"{p}.mlp", cfg["intermediate_size"])
            for ln in ("input_layernorm", "post_attention_layernorm"):
                norms.append(f"{p}.{ln}.weight")
                shapes[norms[-1]] = (h,)
    norms.append("model.norm.weight")
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (V, h)
    out = {}
    for k, s in shapes.items():
        if k in norms:  # norms near 1, perturbed so that a mixed-up norm shows
            t = 1.0 + 0.1 * torch.randn(s, generator=gen)
        else:  # incl. the Fast q/k/v biases: non-zero so that a dropped bias shows
            t = 0.02 * torch.randn(s, generator=gen)
        out[k] = t.to(torch.bfloat16).contiguous()
    if cfg["model_type"] == "llada2_moe":
        for n in range(cfg["first_k_dense_replace"], nl):
            out[f"model.layers.{n}.mlp.gate.expert_bias"] = (0.1 * torch.randn(cfg["num_experts"], generator=gen)).float()
    return out


def build_checkpoint(path: str, cfg: dict, seed: int = 0) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    save_file(_tensors(cfg, torch.Generator().manual_seed(seed)), os.path.join(path, "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {name: build_checkpoint(str(root / name), cfg, seed=i) for i, (name, cfg) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def models(ckpts):
    return {name: ReferenceModel.load(p) for name, p in ckpts.items()}


# ----------------------------------------------------------------------------------------------
# helpers


def causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def block_causal(n, B, start=0):
    q = torch.arange(n) + start
    return (q[None, :] // B) <= (q[:, None] // B)


def assert_unchanged(variant, a, b):
    """Bit-identical, except Qwen3-MoE: transformers' expert loop gathers a variable number of tokens per expert,
    and the CPU GEMM's rounding depends on that batch size (observed <= 1.5e-7), so allow 1e-6 there."""
    if variant == "sdar_moe":
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    else:
        assert torch.equal(a, b)


def reach(visible: torch.Tensor) -> torch.Tensor:
    """Transitive closure (incl. self): r[i, j] = token j can influence row i through any number of layers."""
    n = visible.shape[0]
    r = visible | torch.eye(n, dtype=torch.bool)
    while True:
        nr = (r.float() @ r.float() > 0) | r
        if torch.equal(nr, r):
            return r
        r = nr


# ----------------------------------------------------------------------------------------------
# loading


def test_families_and_loading(models):
    assert {k: m.family for k, m in models.items()} == {
        "sdar": "sdar", "sdar_moe": "sdar", "fast": "fast_dllm_v2", "llada2": "llada2", "llada2_rd": "llada2"}
    for m in models.values():
        assert m.vocab_size == V
    assert models["llada2"].module.cfg.rotary_dim == 16  # head_dim 32 * partial_rotary_factor 0.5
    assert models["llada2_rd"].module.cfg.rotary_dim == 24  # explicit rotary_dim wins
    assert models["sdar"].module.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("variant", ["sdar", "sdar_moe", "fast", "llada2"])
def test_strict_weight_names(tmp_path, variant):
    from safetensors.torch import load_file

    cfg = VARIANTS[variant]
    src = build_checkpoint(str(tmp_path / "ok"), cfg)
    sd = load_file(os.path.join(src, "model.safetensors"))
    # one extra name
    bad = build_checkpoint(str(tmp_path / "extra"), cfg)
    save_file(dict(sd, **{"model.layers.0.bogus.weight": torch.zeros(2)}), os.path.join(bad, "model.safetensors"))
    with pytest.raises((RuntimeError, KeyError)):
        ReferenceModel.load(bad)
    # one missing name (an expert weight for the MoE families)
    victim = next(k for k in sd if (".experts.1." in k if "moe" in cfg["model_type"] else "down_proj" in k))
    bad = build_checkpoint(str(tmp_path / "missing"), cfg)
    save_file({k: v for k, v in sd.items() if k != victim}, os.path.join(bad, "model.safetensors"))
    with pytest.raises((RuntimeError, KeyError)):
        ReferenceModel.load(bad)


# ----------------------------------------------------------------------------------------------
# mask semantics


@pytest.mark.parametrize("variant", QWEN_VARIANTS)
def test_causal_mask_equals_transformers_causal_forward(models, ckpts, tmp_path, variant):
    """Causal visible mask == transformers' own plain causal forward, loaded independently by
    ``from_pretrained`` (its own config parsing, its own MoE weight conversion, eager attention)."""
    from transformers import AutoModelForCausalLM

    cfg = dict(VARIANTS[variant])
    cfg["model_type"], cfg["architectures"] = {
        "sdar": ("qwen3", ["Qwen3ForCausalLM"]), "sdar_moe": ("qwen3_moe", ["Qwen3MoeForCausalLM"]),
        "fast": ("qwen2", ["Qwen2ForCausalLM"])}[variant]
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg.pop(k, None)
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(ckpts[variant], "model.safetensors"), d / "model.safetensors")
    hf, info = AutoModelForCausalLM.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()

    g = torch.Generator().manual_seed(1)
    n = 13
    ids = torch.randint(0, V, (n,), generator=g)
    with torch.no_grad():
        want = hf(input_ids=ids[None]).logits[0].float()
    got = models[variant].logits(ids, torch.arange(n), causal(n))
    assert got.dtype == torch.float32 and got.shape == (n, V)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # sanity: the comparison has teeth (a bidirectional mask gives different logits)
    full = models[variant].logits(ids, torch.arange(n), torch.ones(n, n, dtype=torch.bool))
    assert (full[:-1] - want[:-1]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_invisible_keys_do_not_matter(models, variant):
    m = models[variant]
    g = torch.Generator().manual_seed(2)
    n = 24
    ids = torch.randint(0, V - 16, (n,), generator=g)
    pos = torch.arange(n)
    checked_same = checked_diff = 0
    for trial in range(3):
        # random sparse pattern, non-causal inside blocks of 6 (so the closure does not cover everything)
        q = torch.arange(n)
        vis = (torch.rand(n, n, generator=g) < 0.35) & ((q[None, :] // 6) <= (q[:, None] // 6))
        vis[~vis.any(1), 0] = True  # every row needs >= 1 key; rows may omit themselves
        r = reach(vis)
        perturbed = torch.randperm(n, generator=g)[:3]
        ids2 = ids.clone()
        ids2[perturbed] = (ids[perturbed] + 1 + torch.randint(0, V - 17, (3,), generator=g)) % (V - 16)
        a = m.logits(ids, pos, vis)
        b = m.logits(ids2, pos, vis)
        untouched = ~r[:, perturbed].any(1)
        direct = vis[:, perturbed].any(1)
        # rows that can never see a perturbed token: unchanged
        assert_unchanged(variant, a[untouched], b[untouched])
        # rows that see a perturbed key directly: changed
        for i in direct.nonzero().flatten().tolist():
            assert (a[i] - b[i]).abs().max() > 1e-3, (trial, i)
        checked_same += int(untouched.sum())
        checked_diff += int(direct.sum())
    assert checked_same > 0 and checked_diff > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_causal_perturbation(models, variant):
    """Block-causal layout: a later block never affects earlier ones; the same block does (bidirectional)."""
    m = models[variant]
    B, n = 4, 16
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (n,), generator=g)
    vis = block_causal(n, B)
    a = m.logits(ids, torch.arange(n), vis)
    ids2 = ids.clone()
    ids2[9] = (ids[9] + 7) % V  # block 2
    b = m.logits(ids2, torch.arange(n), vis)
    assert_unchanged(variant, a[:8], b[:8])
    assert ((a[8:] - b[8:]).abs().amax(1) > 1e-3).all()  # rows 8..11 (same block, incl. earlier) and later


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_duplicated_positions_2L(models, variant):
    """The "2L" layout [prefix | block A | block B] with A and B at the same positions: each half equals a
    direct forward over [prefix | half], i.e. duplicated position ids and the mask are honoured exactly."""
    m = models[variant]
    g = torch.Generator().manual_seed(4)
    B, p = 4, 8
    prefix = torch.randint(0, V, (p,), generator=g)
    A = torch.randint(0, V, (B,), generator=g)
    Bk = A.clone()
    Bk[torch.tensor([0, 2])] = m.config["mask_token_id"]  # second copy: partly masked
    ids = torch.cat([prefix, A, Bk])
    pos = torch.cat([torch.arange(p + B), torch.arange(p, p + B)])
    n = p + 2 * B
    vis = torch.zeros(n, n, dtype=torch.bool)
    vis[: p + B, : p + B] = block_causal(p + B, B)
    vis[p + B:, :p] = True
    vis[p + B:, p + B:] = True
    got = m.logits(ids, pos, vis)
    direct_a = m.logits(torch.cat([prefix, A]), torch.arange(p + B), block_causal(p + B, B))
    direct_b = m.logits(torch.cat([prefix, Bk]), torch.arange(p + B), block_causal(p + B, B))
    torch.testing.assert_close(got[: p + B], direct_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[p + B:], direct_b[p:], atol=1e-5, rtol=1e-5)
    # and position ids matter: shifting the second copy by one changes its logits
    pos2 = pos.clone()
    pos2[p + B:] += 1
    assert (m.logits(ids, pos2, vis)[p + B:] - got[p + B:]).abs().max() > 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rope_relative(models, variant):
    """Shifting every position id by a constant leaves the logits unchanged (RoPE is relative)."""
    m = models[variant]
    n = 10
    ids = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(5))
    a = m.logits(ids, torch.arange(n), block_causal(n, 4))
    b = m.logits(ids, torch.arange(n) + 37, block_causal(n, 4))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rows_selection_equals_slicing(models, variant):
    m = models[variant]
    g = torch.Generator().manual_seed(6)
    n = 12
    ids = torch.randint(0, V, (n,), generator=g)
    vis = block_causal(n, 4)
    full = m.logits(ids, torch.arange(n), vis)
    for rows in (torch.tensor([3, 0, 11, 3]), torch.arange(8, 12), torch.tensor([5])):
        got = m.logits(ids, torch.arange(n), vis, rows=rows)
        assert got.shape == (len(rows), V) and got.dtype == torch.float32
        torch.testing.assert_close(got, full[rows], atol=1e-6, rtol=1e-6)


def test_mask_validation(models):
    m = models["sdar"]
    ids = torch.arange(4)
    vis = causal(4)
    vis[2] = False
    with pytest.raises(ValueError):
        m.logits(ids, torch.arange(4), vis)
    with pytest.raises(ValueError):
        m.logits(ids, torch.arange(4), causal(4).float())


# ----------------------------------------------------------------------------------------------
# LLaDA2 pieces


def _route_loop(x, w, bias, *, top_k, n_group, topk_group, scale, norm):
    """Hand-written per-token router (python lists)."""
    E = w.shape[0]
    per = E // n_group
    idx_out, w_out = [], []
    for t in range(x.shape[0]):
        s = [1.0 / (1.0 + math.exp(-float(x[t].double() @ w[e].double()))) for e in range(E)]
        sb = [s[e] + float(bias[e]) for e in range(E)]
        gscore = [sum(sorted(sb[gi * per:(gi + 1) * per], reverse=True)[:2]) for gi in range(n_group)]
        keep = sorted(range(n_group), key=lambda gi: -gscore[gi])[:topk_group]
        cand = [e for e in range(E) if e // per in keep]
        chosen = sorted(cand, key=lambda e: -sb[e])[:top_k]
        ws = [s[e] for e in chosen]
        if norm:
            tot = sum(ws)
            ws = [v / tot for v in ws]
        idx_out.append(chosen)
        w_out.append([v * scale for v in ws])
    return idx_out, w_out


@pytest.mark.parametrize("E,n_group,topk_group,k,norm", [(8, 2, 1, 2, True), (16, 4, 2, 4, True), (16, 4, 3, 3, False)])
def test_llada2_router_matches_loop(E, n_group, topk_group, k, norm):
    g = torch.Generator().manual_seed(7)
    T, H = 40, 24
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w = 0.3 * torch.randn(E, H, generator=g)
    bias = 0.2 * torch.randn(E, generator=g)
    idx, wt = L.route(x, w, bias, top_k=k, n_group=n_group, topk_group=topk_group,
                      routed_scaling_factor=2.5, norm_topk_prob=norm)
    assert idx.shape == (T, k) and wt.dtype == torch.float32
    ref_idx, ref_w = _route_loop(x.float(), w, bias, top_k=k, n_group=n_group, topk_group=topk_group, scale=2.5, norm=norm)
    for t in range(T):
        got = dict(zip(idx[t].tolist(), wt[t].tolist()))
        assert sorted(got) == sorted(ref_idx[t]), t
        for e, v in zip(ref_idx[t], ref_w[t]):
            assert abs(got[e] - v) < 1e-5
    # the bias only steers selection: with a huge bias on expert 0 it is always picked, at its unbiased weight
    bias2 = bias.clone()
    bias2[0] = 100.0
    idx2, wt2 = L.route(x, w, bias2, top_k=k, n_group=n_group, topk_group=topk_group,
                        routed_scaling_factor=1.0, norm_topk_prob=False)
    assert (idx2 == 0).any(1).all()
    s0 = torch.sigmoid(x.float() @ w[0])
    torch.testing.assert_close(wt2[idx2 == 0], s0)


def test_llada2_rotary_dim_from_config():
    base = dict(LLADA2_CFG)
    assert L.LLaDA2Config.from_dict(base).rotary_dim == 16
    assert L.LLaDA2Config.from_dict(dict(base, rotary_dim=24)).rotary_dim == 24
    assert L.LLaDA2Config.from_dict(dict(base, rotary_dim=64, head_dim=128, partial_rotary_factor=0.5)).rotary_dim == 64
    nopf = {k: v for k, v in base.items() if k != "partial_rotary_factor"}
    assert L.LLaDA2Config.from_dict(nopf).rotary_dim == 32


@pytest.mark.parametrize("rd", [8, 16, 24, 32])
def test_partial_rope_rotates_exactly_rotary_dim(rd):
    hd, theta, n = 32, 600000.0, 9
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, n, hd, generator=g)
    pos = torch.arange(n) * 5 + 3
    cos, sin = L.rope_cos_sin(pos, rd, theta)
    assert cos.shape == (n, rd)
    y = L.apply_partial_rope(x, cos, sin)
    assert torch.equal(y[..., rd:], x[..., rd:])  # pass-through dims untouched
    half = rd // 2
    for i in range(half):  # NeoX pairs (i, i + rd/2) rotated by pos * theta^(-2i/rd)
        ang = pos.double() * theta ** (-2.0 * i / rd)
        c, s = torch.cos(ang).float(), torch.sin(ang).float()
        a, b = x[..., i], x[..., i + half]
        torch.testing.assert_close(y[..., i], a * c - b * s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[..., i + half], b * c + a * s, atol=1e-5, rtol=1e-5)
    assert (y[..., :rd] - x[..., :rd]).abs().max() > 1e-3


def test_llada2_attention_uses_configured_rotary_dim(models):
    """The loaded models' attention layers carry the configured rotary_dim (16 derived, 24 explicit), and
    rotating with it leaves exactly the dims >= rotary_dim untouched."""
    for name, rd in (("llada2", 16), ("llada2_rd", 24)):
        attn = models[name].module.model.layers[0].attention
        cfg = attn.cfg
        assert cfg.rotary_dim == rd
        x = torch.randn(3, 4, 6, cfg.head_dim)
        cos, sin = L.rope_cos_sin(torch.tensor([0, 5, 11, 40, 41, 100]), cfg.rotary_dim, cfg.rope_theta)
        y = L.apply_partial_rope(x, cos, sin)
        assert torch.equal(y[..., rd:], x[..., rd:])
        assert (y[..., rd - 1] - x[..., rd - 1]).abs().max() > 0


def test_llada2_moe_layer_matches_token_loop(models):
    m = models["llada2"].module
    moe = m.model.layers[1].mlp
    assert isinstance(moe, L.SparseMoe) and isinstance(m.model.layers[0].mlp, L.MLP)
    c = m.cfg
    g = torch.Generator().manual_seed(9)
    x = torch.randn(30, c.hidden_size, generator=g)
    with torch.no_grad():
        got = moe(x)
        want = torch.zeros_like(x)
        for t in range(x.shape[0]):
            logits = moe.gate.weight.double() @ x[t].double()
            s = torch.sigmoid(logits)
            sb = s + moe.gate.expert_bias.double()
            per = c.num_experts // c.n_group
            gs = sb.view(c.n_group, per).topk(2).values.sum(-1)
            keep = gs.topk(c.topk_group).indices
            allowed = torch.zeros(c.num_experts, dtype=torch.bool)
            for gi in keep.tolist():
                allowed[gi * per:(gi + 1) * per] = True
            chosen = sb.masked_fill(~allowed, -float("inf")).topk(c.num_experts_per_tok).indices
            ws = s[chosen] / s[chosen].sum() * c.routed_scaling_factor
            acc = torch.zeros(c.hidden_size, dtype=torch.float64)
            for e, wv in zip(chosen.tolist(), ws.tolist()):
                ex = moe.experts[e]
                hdn = F.silu(ex.gate_proj.weight.double() @ x[t].double()) * (ex.up_proj.weight.double() @ x[t].double())
                acc += wv * (ex.down_proj.weight.double() @ hdn)
            sh = moe.shared_experts
            hdn = F.silu(sh.gate_proj.weight.double() @ x[t].double()) * (sh.up_proj.weight.double() @ x[t].double())
            acc += sh.down_proj.weight.double() @ hdn  # shared expert: unscaled
            want[t] = acc.float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert moe.shared_experts.gate_proj.weight.shape == (c.moe_intermediate_size * 1, c.hidden_size)


def _naive_llada2_logits(ref: ReferenceModel, ids, pos, vis):
    """Independent float64 forward straight from the state dict: per-head loops, additive -inf mask."""
    sd = {k: v.double() for k, v in ref.module.state_dict().items()}
    c = ref.module.cfg
    nh, nkv, hd, rd = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps))

    def rope(v, p):  # v [hd]
        out = v.clone()
        for i in range(rd // 2):
            a = p * c.rope_theta ** (-2.0 * i / rd)
            x1, x2 = v[i], v[i + rd // 2]
            out[i], out[i + rd // 2] = x1 * math.cos(a) - x2 * math.sin(a), x2 * math.cos(a) + x1 * math.sin(a)
        return out

    def mlp(p, x):
        return (F.silu(x @ sd[f"{p}.gate_proj.weight"].T) * (x @ sd[f"{p}.up_proj.weight"].T)) @ sd[f"{p}.down_proj.weight"].T

    x = sd["model.word_embeddings.weight"][ids]
    n = len(ids)
    for li in range(c.num_hidden_layers):
        p = f"model.layers.{li}"
        hN = rms(x, sd[f"{p}.input_layernorm.weight"])
        qkv = (hN @ sd[f"{p}.attention.query_key_value.weight"].T).view(n, nh + 2 * nkv, hd)
        att = torch.zeros(n, nh, hd, dtype=torch.float64)
        for h in range(nh):
            kvh = nh + h // (nh // nkv)
            q = torch.stack([rope(rms(qkv[i, h], sd[f"{p}.attention.query_layernorm.weight"]), int(pos[i])) for i in range(n)])
            k = torch.stack([rope(rms(qkv[i, kvh], sd[f"{p}.attention.key_layernorm.weight"]), int(pos[i])) for i in range(n)])
            v = qkv[:, kvh + nkv]
            sc = (q @ k.T) / math.sqrt(hd) + torch.where(vis, 0.0, -float("inf")).double()
            att[:, h] = torch.softmax(sc, -1) @ v
        x = x + att.reshape(n, nh * hd) @ sd[f"{p}.attention.dense.weight"].T
        hN = rms(x, sd[f"{p}.post_attention_layernorm.weight"])
        if li < c.first_k_dense_replace:
            x = x + mlp(f"{p}.mlp", hN)
        else:
            idx, wt = L.route(hN, sd[f"{p}.mlp.gate.weight"], sd[f"{p}.mlp.gate.expert_bias"], top_k=c.num_experts_per_tok,
                              n_group=c.n_group, topk_group=c.topk_group,
                              routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.norm_topk_prob)
            out = mlp(f"{p}.mlp.shared_experts", hN)
            for t in range(n):
                for e, wv in zip(idx[t].tolist(), wt[t].tolist()):
                    out[t] += wv * mlp(f"{p}.mlp.experts.{e}", hN[t:t + 1])[0]
            x = x + out
    x = rms(x, sd["model.norm.weight"])
    return (x @ sd["lm_head.weight"].T).float()


@pytest.mark.parametrize("variant", ["llada2", "llada2_rd"])
def test_llada2_forward_matches_naive(models, variant):
    m = models[variant]
    g = torch.Generator().manual_seed(10)
    n = 10
    ids = torch.randint(0, V, (n,), generator=g)
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 4, 5, 6, 7])  # duplicated positions
    vis = block_causal(n, 4) | (torch.rand(n, n, generator=g) < 0.2)
    torch.testing.assert_close(m.logits(ids, pos, vis), _naive_llada2_logits(m, ids, pos, vis), atol=2e-5, rtol=1e-4)


def test_llada2_bf16_keeps_fp32_router(ckpts):
    m = ReferenceModel.load(ckpts["llada2"], dtype=torch.bfloat16)
    gate = m.module.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.expert_bias.dtype == torch.float32
    assert m.module.lm_head.weight.dtype == torch.bfloat16
    n = 8
    ids = torch.arange(n) * 3
    out = m.logits(ids, torch.arange(n), causal(n))
    assert out.dtype == torch.float32
    ref = ReferenceModel.load(ckpts["llada2"]).logits(ids, torch.arange(n), causal(n))
    assert (out - ref).abs().max() < 0.05


def test_tied_embeddings(tmp_path):
    cfg = dict(FAST_CFG, tie_word_embeddings=True)
    path = build_checkpoint(str(tmp_path / "tied"), cfg)
    from safetensors.torch import load_file

    sd = load_file(os.path.join(path, "model.safetensors"))
    sd.pop("lm_head.weight")
    save_file(sd, os.path.join(path, "model.safetensors"))
    m = ReferenceModel.load(path)
    assert m.module.lm_head.weight.data_ptr() == m.module.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(m.module.lm_head.weight, sd["model.embed_tokens.weight"].float())
