"""D2F tiny checkpoints, LoRA adapters, the merge tool (module + CLI) and the reference backbones."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vllm_s2d2.cli import main as cli_main
from vllm_s2d2.configs import load_family_info
from vllm_s2d2.d2f_merge import lora_scale, merge_d2f_lora
from vllm_s2d2.reference.models import LLADA_TO_LLAMA, ReferenceModel, llada_to_llama_state_dict
from vllm_s2d2.testing.checkpoints import (D2F_FAMILIES, D2F_LORA_TARGETS, build_tiny_checkpoint,
                                           expected_tensor_shapes, small_vocab_id, write_tiny_lora_adapter)

N_LAYERS = 2


def _cfg(path):
    return json.loads((path / "config.json").read_text())


def _base(tmp_path, family, **kw):
    """The plain (unmarked) tiny base of ``family``, small vocabulary, fp32."""
    return build_tiny_checkpoint(family, tmp_path / f"{family}-base", d2f=None, small_vocab=True,
                                 dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """family -> (base dir, adapter dir, merged dir), r 4, alpha 8, block size 16."""
    root = tmp_path_factory.mktemp("d2f")
    out = {}
    for family in D2F_FAMILIES:
        base = _base(root, family)
        adapter = write_tiny_lora_adapter(base, root / f"{family}-lora", r=4, alpha=8.0, seed=1)
        out[family] = (base, adapter, merge_d2f_lora(base, adapter, root / f"{family}-merged", block_size=16))
    return out


# ---- tiny checkpoints ---------------------------------------------------------------------------------------


def test_dream_tensor_names(tmp_path):
    t = load_file(str(build_tiny_checkpoint("d2f_dream", tmp_path / "d", tokenizer=False) / "model.safetensors"))
    assert t["model.embed_tokens.weight"].shape == (152064, 64) and t["lm_head.weight"].shape == (152064, 64)
    for i in range(N_LAYERS):
        p = f"model.layers.{i}"
        assert t[f"{p}.self_attn.q_proj.bias"].shape == (64,) and t[f"{p}.self_attn.k_proj.weight"].shape == (32, 64)
        assert t[f"{p}.self_attn.o_proj.weight"].shape == (64, 64) and f"{p}.self_attn.o_proj.bias" not in t
        assert t[f"{p}.mlp.gate_proj.weight"].shape == (128, 64) and t[f"{p}.mlp.down_proj.weight"].shape == (64, 128)
        assert bool((t[f"{p}.input_layernorm.weight"] == 1).all())
    assert len(t) == 3 + N_LAYERS * 12


def test_llada_tensor_names(tmp_path):
    path = build_tiny_checkpoint("d2f_llada", tmp_path / "l", tokenizer=False)
    t = load_file(str(path / "model.safetensors"))
    assert t["model.transformer.wte.weight"].shape == (126464, 64)
    assert t["model.transformer.ff_out.weight"].shape == (126464, 64)
    assert bool((t["model.transformer.ln_f.weight"] == 1).all())
    for i in range(N_LAYERS):
        p = f"model.transformer.blocks.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "attn_out"):
            assert t[f"{p}.{name}.weight"].shape == (64, 64)
        assert t[f"{p}.ff_proj.weight"].shape == (128, 64) and t[f"{p}.up_proj.weight"].shape == (128, 64)
        assert t[f"{p}.ff_out.weight"].shape == (64, 128)
        assert bool((t[f"{p}.attn_norm.weight"] == 1).all()) and bool((t[f"{p}.ff_norm.weight"] == 1).all())
    assert len(t) == 3 + N_LAYERS * 9
    assert {k: tuple(v.shape) for k, v in t.items()} == expected_tensor_shapes(_cfg(path))
    assert "model.transformer.ff_out.weight" not in expected_tensor_shapes({**_cfg(path), "weight_tying": True})


@pytest.mark.parametrize("family", D2F_FAMILIES)
def test_tiny_checkpoint_is_marked_and_parses(tmp_path, family):
    path = build_tiny_checkpoint(family, tmp_path / family, block_size=16)
    assert _cfg(path)["d2f"] == {"block_size": 16}
    info = load_family_info(path)
    assert (info.family, info.block_size, info.pipelined, info.block_origin) == (family, 16, True, "prompt")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_ids_to_tokens(info.mask_token_id) == tok.mask_token


@pytest.mark.parametrize("family", D2F_FAMILIES)
def test_small_vocab_ids(tmp_path, family):
    info = load_family_info(build_tiny_checkpoint(family, tmp_path / family, small_vocab=True, tokenizer=False))
    real_mask = {"d2f_dream": 151666, "d2f_llada": 126336}[family]
    assert info.vocab_size == 512 and info.mask_token_id == small_vocab_id(family, real_mask)
    assert all(480 <= s < 512 for s in info.stop_token_ids)


@pytest.mark.parametrize("family", D2F_FAMILIES)
def test_unmarked_base_rejected(tmp_path, family):
    with pytest.raises(ValueError, match="merge-d2f-lora"):
        load_family_info(_base(tmp_path, family, tokenizer=False))


# ---- adapters and the merge ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", D2F_FAMILIES)
def test_adapter_layout(merged, family):
    _, adapter, _ = merged[family]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8.0)
    assert sorted(cfg["target_modules"]) == sorted(D2F_LORA_TARGETS[family])
    t = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(t) == 2 * 4 * N_LAYERS
    assert all(k.startswith("base_model.model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in t)


@pytest.mark.parametrize("family,module", [("d2f_dream", "model.layers.1.self_attn.o_proj"),
                                           ("d2f_llada", "model.transformer.blocks.0.attn_out"),
                                           ("d2f_llada", "model.transformer.blocks.1.k_proj")])
def test_merge_equals_w_plus_scaled_ba(merged, family, module):
    base, adapter, out = merged[family]
    w = load_file(str(base / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    a = lora[f"base_model.model.{module}.lora_A.weight"]
    b = lora[f"base_model.model.{module}.lora_B.weight"]
    want = w[f"{module}.weight"] + (8.0 / 4) * b @ a
    torch.testing.assert_close(got[f"{module}.weight"], want, rtol=0, atol=1e-6)
    assert not torch.equal(got[f"{module}.weight"], w[f"{module}.weight"])
    changed = {k for k in w if not torch.equal(got[k], w[k])}
    assert len(changed) == 4 * N_LAYERS  # exactly the target linears


@pytest.mark.parametrize("family", D2F_FAMILIES)
def test_merged_is_marked_and_keeps_other_files(merged, family):
    base, _, out = merged[family]
    cfg = _cfg(out)
    assert cfg["d2f"]["block_size"] == 16 and cfg["d2f"]["lora_scale"] == 2.0
    assert {k: v for k, v in cfg.items() if k != "d2f"} == _cfg(base)
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert load_family_info(out).block_size == 16


def test_merge_errors(merged, tmp_path):
    base, adapter, out = merged["d2f_dream"]
    with pytest.raises(ValueError, match="already"):
        merge_d2f_lora(out, adapter, tmp_path / "x")
    with pytest.raises(ValueError, match="without a base weight"):
        merge_d2f_lora(base, merged["d2f_llada"][1], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_d2f_lora(tmp_path / "missing", adapter, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_d2f_lora(base, base, tmp_path / "x")
    with pytest.raises(ValueError, match="block_size"):
        merge_d2f_lora(base, adapter, tmp_path / "x", block_size=0)
    with pytest.raises(ValueError, match="differ"):
        merge_d2f_lora(base, adapter, base)
    assert not (tmp_path / "x").exists()  # nothing written on a refused merge


def test_lora_scale():
    assert lora_scale({"r": 32, "lora_alpha": 32}) == 1.0
    assert lora_scale({"r": 16, "lora_alpha": 32, "use_rslora": True}) == 32 / math.sqrt(16)
    for bad in ({"r": 0, "lora_alpha": 1}, {"r": 4}, {"r": 4, "lora_alpha": 8, "rank_pattern": {"q": 8}}):
        with pytest.raises(ValueError):
            lora_scale(bad)


def test_cli_merge(merged, tmp_path, capsys):
    base, adapter, out = merged["d2f_llada"]
    assert cli_main(["merge-d2f-lora", str(base), str(adapter), str(tmp_path / "o"), "--block-size", "16"]) == 0
    assert load_file(str(tmp_path / "o" / "model.safetensors")).keys() == load_file(
        str(out / "model.safetensors")).keys()
    assert _cfg(tmp_path / "o")["d2f"]["block_size"] == 16
    assert cli_main(["merge-d2f-lora", str(tmp_path / "nope"), str(adapter), str(tmp_path / "p")]) == 2
    assert "base checkpoint directory" in capsys.readouterr().err
    assert cli_main(["merge-d2f-lora", str(base), str(tmp_path / "nope"), str(tmp_path / "p")]) == 2
    assert "adapter directory" in capsys.readouterr().err
    assert cli_main(["merge-d2f-lora", str(out), str(adapter), str(tmp_path / "p")]) == 2
    assert "already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["merge-d2f-lora", str(base), str(adapter), str(tmp_path / "p"), "--block-size", "0"])


# ---- reference backbones ------------------------------------------------------------------------------------


def test_llada_remap_covers_every_tensor(merged):
    _, _, out = merged["d2f_llada"]
    names = llada_to_llama_state_dict(load_file(str(out / "model.safetensors")))
    assert "model.layers.1.mlp.gate_proj.weight" in names and "lm_head.weight" in names
    assert len(LLADA_TO_LLAMA) == 10
    with pytest.raises(ValueError, match="bias"):
        llada_to_llama_state_dict({"model.transformer.blocks.0.q_proj.bias": torch.zeros(1)})


def _rope(x, pos, theta):
    half = x.shape[-1] // 2
    freqs = pos[:, None].double() / theta ** (torch.arange(half, dtype=torch.float64) / half)
    cos, sin = freqs.cos().float(), freqs.sin().float()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _llada_by_hand(cfg, sd, ids, pos, visible):
    """LLaDA's forward written from its OLMo tensor names (independent of the Llama remap)."""
    nh, eps, theta = cfg["n_heads"], cfg["rms_norm_eps"], cfg["rope_theta"]
    x = sd["model.transformer.wte.weight"][ids]
    n, d = x.shape
    hd = d // nh
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = _rms(x, sd[p + "attn_norm.weight"], eps)
        q, k, v = (h @ sd[p + f"{name}.weight"].T for name in ("q_proj", "k_proj", "v_proj"))
        q, k, v = (t.view(n, nh, hd).transpose(0, 1) for t in (q, k, v))
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
        x = x + att.transpose(0, 1).reshape(n, d) @ sd[p + "attn_out.weight"].T
        h = _rms(x, sd[p + "ff_norm.weight"], eps)
        gate = torch.nn.functional.silu(h @ sd[p + "ff_proj.weight"].T)
        x = x + (gate * (h @ sd[p + "up_proj.weight"].T)) @ sd[p + "ff_out.weight"].T
    return _rms(x, sd["model.transformer.ln_f.weight"], eps) @ sd["model.transformer.ff_out.weight"].T


def _causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def test_llada_backbone_matches_a_forward_by_hand(merged):
    _, _, out = merged["d2f_llada"]
    model = ReferenceModel.load(str(out))
    assert (model.family, model.backbone) == ("d2f_llada", "llada")
    ids = torch.randint(0, 480, (10,), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(3, 13)
    visible = _causal(10) | (torch.arange(10)[None, :] < 4)  # a bidirectional prefix of 4, then causal
    want = _llada_by_hand(_cfg(out), load_file(str(out / "model.safetensors")), ids, pos, visible)
    torch.testing.assert_close(model.logits(ids, pos, visible), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", D2F_FAMILIES)
def test_backbone_logits_finite_and_causal(merged, family):
    _, _, out = merged[family]
    model = ReferenceModel.load(str(out))
    n, cut = 12, 7
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 480, (n,), generator=gen)
    later = ids.clone()
    later[cut:] = torch.randint(0, 480, (n - cut,), generator=gen)
    pos = torch.arange(n)
    a, b = model.logits(ids, pos, _causal(n)), model.logits(later, pos, _causal(n))
    assert a.shape == (n, 512) and bool(torch.isfinite(a).all())
    assert torch.equal(a[:cut], b[:cut])  # row i ignores every token after it
    assert not torch.allclose(a[cut:], b[cut:])
    full = model.logits(ids, pos, torch.ones(n, n, dtype=torch.bool))
    assert not torch.allclose(full[:cut], a[:cut])  # the mask is honoured, not replaced by a causal one


def test_dream_backbone_is_qwen2_with_the_same_weights(merged):
    _, _, out = merged["d2f_dream"]
    model = ReferenceModel.load(str(out))
    assert (model.family, model.backbone) == ("d2f_dream", "qwen2")
    sd = load_file(str(out / "model.safetensors"))
    assert torch.equal(model.module.model.layers[0].self_attn.q_proj.weight, sd["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(model.module.lm_head.weight, sd["lm_head.weight"])
