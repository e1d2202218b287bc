"""vllm_s2d2.testing: tiny checkpoints in the released formats and the offline Qwen tokenizer. CPU only."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from vllm_s2d2.configs import family_info, family_of, load_family_info, register_hf_configs
from vllm_s2d2.testing import (
    FAMILIES,
    SMALL_VOCAB_SIZE,
    as_plain_ar,
    as_plain_qwen3,
    build_plain_qwen3_checkpoint,
    build_tiny_checkpoint,
    expected_tensor_shapes,
    small_vocab_id,
)
from vllm_s2d2.testing import qwen_tokenizer as qt

register_hf_configs()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _cfg(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _gen(path: Path) -> dict:
    return json.loads((path / "generation_config.json").read_text())


# ---- expected names / shapes, written out by hand (the released checkpoints' tensor names) -----------------


def _mlp(p, inter, h=64):
    return {f"{p}.gate_proj.weight": (inter, h), f"{p}.up_proj.weight": (inter, h), f"{p}.down_proj.weight": (h, inter)}


def _spec_sdar(moe: bool, V: int = 151936) -> dict:
    s = {"model.embed_tokens.weight": (V, 64), "model.norm.weight": (64,), "lm_head.weight": (V, 64)}
    for n in range(2):
        p = f"model.layers.{n}"
        s.update(
            {
                f"{p}.input_layernorm.weight": (64,),
                f"{p}.post_attention_layernorm.weight": (64,),
                f"{p}.self_attn.q_proj.weight": (128, 64),
                f"{p}.self_attn.k_proj.weight": (64, 64),
                f"{p}.self_attn.v_proj.weight": (64, 64),
                f"{p}.self_attn.o_proj.weight": (64, 128),
                f"{p}.self_attn.q_norm.weight": (32,),
                f"{p}.self_attn.k_norm.weight": (32,),
            }
        )
        if moe:
            s[f"{p}.mlp.gate.weight"] = (4, 64)
            for e in range(4):
                s.update(_mlp(f"{p}.mlp.experts.{e}", 32))
        else:
            s.update(_mlp(f"{p}.mlp", 128))
    return s


def _spec_fast(V: int = 151936) -> dict:
    s = {"model.embed_tokens.weight": (V, 64), "model.norm.weight": (64,), "lm_head.weight": (V, 64)}
    for n in range(2):
        p = f"model.layers.{n}"
        s.update(
            {
                f"{p}.input_layernorm.weight": (64,),
                f"{p}.post_attention_layernorm.weight": (64,),
                f"{p}.self_attn.q_proj.weight": (64, 64),
                f"{p}.self_attn.q_proj.bias": (64,),
                f"{p}.self_attn.k_proj.weight": (32, 64),
                f"{p}.self_attn.k_proj.bias": (32,),
                f"{p}.self_attn.v_proj.weight": (32, 64),
                f"{p}.self_attn.v_proj.bias": (32,),
                f"{p}.self_attn.o_proj.weight": (64, 64),
            }
        )
        s.update(_mlp(f"{p}.mlp", 128))
    return s


def _spec_llada2(V: int = 157184) -> dict:
    s = {"model.word_embeddings.weight": (V, 64), "model.norm.weight": (64,), "lm_head.weight": (V, 64)}
    for n in range(2):
        p = f"model.layers.{n}"
        s.update(
            {
                f"{p}.input_layernorm.weight": (64,),
                f"{p}.post_attention_layernorm.weight": (64,),
                f"{p}.attention.query_key_value.weight": (256, 64),
                f"{p}.attention.query_layernorm.weight": (32,),
                f"{p}.attention.key_layernorm.weight": (32,),
                f"{p}.attention.dense.weight": (64, 128),
            }
        )
    s.update(_mlp("model.layers.0.mlp", 128))
    p = "model.layers.1.mlp"
    s[f"{p}.gate.weight"] = (8, 64)
    s[f"{p}.gate.expert_bias"] = (8,)
    for e in range(8):
        s.update(_mlp(f"{p}.experts.{e}", 32))
    s.update(_mlp(f"{p}.shared_experts", 32))
    return s


SPECS = {
    "sdar": lambda V=151936: _spec_sdar(False, V),
    "sdar_moe": lambda V=151936: _spec_sdar(True, V),
    "fast_dllm_v2": _spec_fast,
    "llada2": _spec_llada2,
}
N_TENSORS = {"sdar": 25, "sdar_moe": 45, "fast_dllm_v2": 27, "llada2": 47}

EXPECTED_INFO = {
    # family -> (architecture, block, mask, stops, shifted, V)
    "sdar": ("SDARForCausalLM", 4, 151669, (151645, 151643), False, 151936),
    "sdar_moe": ("SDARMoeForCausalLM", 4, 151669, (151645, 151643), False, 151936),
    "fast_dllm_v2": ("Fast_dLLM_QwenForCausalLM", 32, 151665, (151645,), True, 151936),
    "llada2": ("LLaDA2MoeModelLM", 32, 156895, (156892,), False, 157184),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_names_shapes_values(family, tiny_checkpoint):
    path = tiny_checkpoint(family, tokenizer=False)
    t = _tensors(path)
    spec = SPECS[family]()
    assert len(spec) == N_TENSORS[family]
    assert {k: tuple(v.shape) for k, v in t.items()} == spec
    assert expected_tensor_shapes(_cfg(path)) == spec
    for name, x in t.items():
        if name.endswith("expert_bias"):
            assert x.dtype == torch.float32 and bool((x != 0).all()) and x.std() > 0.01
        else:
            assert x.dtype == torch.bfloat16, name
        if name.endswith("norm.weight"):
            assert bool((x == 1).all()), name
        elif name.endswith(".bias"):
            assert bool((x == 0).all()), name
        elif name.endswith(".weight"):
            assert abs(x.float().std().item() - 0.02) < 0.006, name
    arch, bs, mask, stops, shifted, V = EXPECTED_INFO[family]
    info = load_family_info(path)
    got = (info.architecture, info.block_size, info.mask_token_id, info.stop_token_ids, info.shifted, info.vocab_size)
    assert got == (arch, bs, mask, stops, shifted, V)
    # AutoConfig reads the tiny config.json as the plugin's class
    hf = AutoConfig.from_pretrained(path)
    assert family_info(hf, _gen(path)) == info
    assert not any(p.name.startswith("tokenizer") for p in path.iterdir())


def test_recipe_configs_follow_models_md(tiny_checkpoint):
    sdar = _cfg(tiny_checkpoint("sdar", tokenizer=False))
    assert sdar["block_size"] == 4 and sdar["mask_token_id"] == 151669 and sdar["eos_token_id"] == 151643
    assert _gen(tiny_checkpoint("sdar", tokenizer=False)) == {
        "bos_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
    }
    fast = _cfg(tiny_checkpoint("fast_dllm_v2", tokenizer=False))
    assert fast["bd_size"] == 32 and fast["mask_token_id"] == 151665 and "block_size" not in fast
    ll = _cfg(tiny_checkpoint("llada2", tokenizer=False))
    assert "rotary_dim" not in ll and ll["partial_rotary_factor"] == 0.5
    assert (ll["block_size"], ll["mask_token_id"], ll["eos_token_id"]) == (32, 156895, 156892)


def test_deterministic_and_seeded(tmp_path):
    def digest(p):
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    a = build_tiny_checkpoint("llada2", tmp_path / "a", small_vocab=True, seed=3)
    b = build_tiny_checkpoint("llada2", tmp_path / "b", small_vocab=True, seed=3)
    c = build_tiny_checkpoint("llada2", tmp_path / "c", small_vocab=True, seed=4)
    assert digest(a) == digest(b) != digest(c)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_small_vocab_moves_ids(tiny_small_vocab):
    path = tiny_small_vocab
    cfg, gen = _cfg(path), _gen(path)
    fam = {"SDARForCausalLM": "sdar", "SDARMoeForCausalLM": "sdar_moe"}.get(
        cfg["architectures"][0], family_of(path)
    )
    assert cfg["vocab_size"] == SMALL_VOCAB_SIZE
    ids = [cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")]
    ids += gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    ids += [gen.get("bos_token_id"), gen.get("pad_token_id")]
    assert all(480 <= i < 512 for i in ids if i is not None), ids
    info = load_family_info(path)
    arch, bs, mask, stops, shifted, _ = EXPECTED_INFO[fam]
    assert info.vocab_size == 512 and info.block_size == bs and info.shifted == shifted
    assert info.mask_token_id == small_vocab_id(fam, mask) != mask
    assert info.stop_token_ids == tuple(small_vocab_id(fam, s) for s in stops)
    # weights follow the small vocabulary
    t = _tensors(path)
    spec = SPECS[fam](512)
    assert {k: tuple(v.shape) for k, v in t.items()} == spec
    # the synthetic tokenizer agrees with the moved ids and round-trips text
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 512
    assert tok.mask_token_id == info.mask_token_id
    assert tok.eos_token_id in info.stop_token_ids
    text = "hello wörld 😀\n\tx"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert all(i < 256 for i in ids) and tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(tok.mask_token) == info.mask_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    enc = tok(chat, add_special_tokens=False)["input_ids"]
    assert max(enc) < 512 and tok.decode(enc) == chat


def test_build_options(tmp_path):
    p = build_tiny_checkpoint("sdar", tmp_path / "b16", small_vocab=True, block_size=16, tokenizer=False)
    assert load_family_info(p).block_size == 16
    p = build_tiny_checkpoint("fast_dllm_v2", tmp_path / "f8", small_vocab=True, block_size=8, tokenizer=False)
    assert _cfg(p)["bd_size"] == 8 and load_family_info(p).block_size == 8
    # tied embeddings: no lm_head
    p = build_tiny_checkpoint("fast_dllm_v2", tmp_path / "tied", small_vocab=True, tie_word_embeddings=True)
    assert "lm_head.weight" not in _tensors(p) and _cfg(p)["tie_word_embeddings"] is True
    # LLaDA2 rotary_dim variant
    p = build_tiny_checkpoint("llada2", tmp_path / "rd", small_vocab=True, rotary_dim=16, tokenizer=False)
    assert _cfg(p)["rotary_dim"] == 16
    # moe=True on "sdar" = "sdar_moe"
    p = build_tiny_checkpoint("sdar", tmp_path / "moe", small_vocab=True, moe=True, tokenizer=False)
    assert _cfg(p)["architectures"] == ["SDARMoeForCausalLM"]
    # overrides reshape the weights; None deletes a key (family fallback applies)
    p = build_tiny_checkpoint(
        "sdar", tmp_path / "ov", small_vocab=True, tokenizer=False, num_hidden_layers=3, mask_token_id=None
    )
    assert "model.layers.2.mlp.up_proj.weight" in _tensors(p) and "mask_token_id" not in _cfg(p)
    with pytest.raises(ValueError, match="mask_token_id"):  # default 151669 is outside V=512
        load_family_info(p)
    p = build_tiny_checkpoint("fast_dllm_v2", tmp_path / "fl", small_vocab=True, tokenizer=False, num_hidden_layers=3)
    assert _cfg(p)["layer_types"] == ["full_attention"] * 3
    # float32 weights
    p = build_tiny_checkpoint("sdar", tmp_path / "f32", small_vocab=True, tokenizer=False, dtype=torch.float32)
    assert _tensors(p)["model.norm.weight"].dtype == torch.float32 and _cfg(p)["torch_dtype"] == "float32"
    # generation-config overrides
    p = build_tiny_checkpoint(
        "sdar", tmp_path / "g", small_vocab=True, tokenizer=False, generation_config_overrides={"eos_token_id": 482}
    )
    assert load_family_info(p).stop_token_ids == (482, 480)


def test_build_option_errors(tmp_path):
    with pytest.raises(ValueError, match="family"):
        build_tiny_checkpoint("dream", tmp_path / "x")
    with pytest.raises(ValueError, match="rotary_dim"):
        build_tiny_checkpoint("sdar", tmp_path / "x", rotary_dim=16)
    with pytest.raises(ValueError, match="rotary_dim"):
        build_tiny_checkpoint("llada2", tmp_path / "x", small_vocab=True, rotary_dim=33)
    with pytest.raises(ValueError, match="moe"):
        build_tiny_checkpoint("fast_dllm_v2", tmp_path / "x", moe=True)
    with pytest.raises(ValueError, match="block_size"):
        build_tiny_checkpoint("sdar", tmp_path / "x", block_size=0)
    with pytest.raises(ValueError, match="n_group"):
        build_tiny_checkpoint("llada2", tmp_path / "x", small_vocab=True, n_group=3)


# ---- transformers loads the Qwen-family tiny checkpoints as their AR base ---------------------------------


@pytest.mark.parametrize(
    "family,cls",
    [("sdar", "Qwen3ForCausalLM"), ("sdar_moe", "Qwen3MoeForCausalLM"), ("fast_dllm_v2", "Qwen2ForCausalLM")],
)
def test_transformers_loads_as_ar_base(family, cls, tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(family, tokenizer=False)
    plain = as_plain_ar(src, tmp_path / "plain")
    cfg = _cfg(plain)
    assert cfg["architectures"] == [cls] and "mask_token_id" not in cfg and "block_size" not in cfg
    assert family_of(plain) is None
    model, info = AutoModelForCausalLM.from_pretrained(plain, output_loading_info=True, dtype=torch.float32)
    assert type(model).__name__ == cls
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (k, info.get(k))
    sd = model.state_dict()
    t = _tensors(src)
    assert torch.equal(sd["model.embed_tokens.weight"], t["model.embed_tokens.weight"].float())
    assert torch.equal(sd["lm_head.weight"], t["lm_head.weight"].float())
    k = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(sd[k], t[k].float())
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape == (1, 5, cfg["vocab_size"]) and torch.isfinite(logits).all()


def test_plain_qwen3(tiny_sdar, tiny_plain_qwen3, tmp_path):
    assert _cfg(tiny_plain_qwen3)["architectures"] == ["Qwen3ForCausalLM"]
    assert _cfg(tiny_plain_qwen3)["model_type"] == "qwen3"
    assert family_of(tiny_plain_qwen3) is None
    with pytest.raises(ValueError, match="architectures"):
        load_family_info(tiny_plain_qwen3)
    assert (tiny_plain_qwen3 / "model.safetensors").read_bytes() == (tiny_sdar / "model.safetensors").read_bytes()
    assert (tiny_plain_qwen3 / "tokenizer.json").is_file()
    # build_plain_qwen3_checkpoint == build_tiny_checkpoint("sdar") + plain config
    p = build_plain_qwen3_checkpoint(tmp_path / "pq", small_vocab=True, seed=5, tokenizer=False)
    s = build_tiny_checkpoint("sdar", tmp_path / "sq", small_vocab=True, seed=5, tokenizer=False)
    assert (p / "model.safetensors").read_bytes() == (s / "model.safetensors").read_bytes()
    assert _cfg(p)["architectures"] == ["Qwen3ForCausalLM"] and family_of(p) is None
    pm = build_plain_qwen3_checkpoint(tmp_path / "pqm", small_vocab=True, moe=True, tokenizer=False)
    assert _cfg(pm)["model_type"] == "qwen3_moe"
    with pytest.raises(ValueError, match="SDAR"):
        fast = build_tiny_checkpoint("fast_dllm_v2", tmp_path / "f", small_vocab=True, tokenizer=False)
        as_plain_qwen3(fast, tmp_path / "o")
    with pytest.raises(ValueError, match="architectures"):
        as_plain_ar(build_tiny_checkpoint("llada2", tmp_path / "l", small_vocab=True, tokenizer=False), tmp_path / "o2")


# ---- the Qwen tokenizer -----------------------------------------------------------------------------------------

CHAT_IDS = [151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198, 151669, 151669]

TEXTS = [
    "Hello world!",
    "def f(x):\n\treturn x  # comment\r\n",
    "Café naïve 日本語 😀 emoji ℌ",
    "  multiple   spaces\n\n\nlines   ",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "1234567890 3.14159 ''' 's 'll 'VE I'M",
    "ﬁ Å Å\u00a0nbsp\u200bzero-width",
    "x" * 64,
]


def test_sdar_tokenizer(tiny_sdar):
    tok = AutoTokenizer.from_pretrained(tiny_sdar)
    s = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|MASK|><|MASK|>"
    assert tok(s, add_special_tokens=False)["input_ids"] == CHAT_IDS
    assert tok.decode(CHAT_IDS) == s
    assert tok.mask_token == "<|MASK|>" and tok.mask_token_id == 151669
    assert tok.eos_token_id == 151643 and tok.pad_token_id == 151643 and tok.bos_token is None
    assert tok.convert_tokens_to_ids(["<think>", "</think>", "<|file_sep|>"]) == [151667, 151668, 151664]
    assert len(tok) == 151670
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok(chat + "<|MASK|><|MASK|>", add_special_tokens=False)["input_ids"] == CHAT_IDS
    no_think = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert no_think == chat + "<think>\n\n</think>\n\n"
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


@pytest.mark.skipif(importlib.util.find_spec("tiktoken") is None, reason="tiktoken not installed")
def test_qwen_tokenizer_matches_tiktoken(tiny_sdar):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-72b-instruct")
    tok = AutoTokenizer.from_pretrained(tiny_sdar)
    for text in TEXTS + ["<|im_start|>system\nYou are helpful.<|im_end|>\n"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == ref.encode(text), text


def test_fast_tokenizer(tiny_fast):
    tok = AutoTokenizer.from_pretrained(tiny_fast)
    assert tok.mask_token == "|<MASK>|" and tok.mask_token_id == 151665
    assert tok.convert_tokens_to_ids("|<MASK>|") == 151665
    assert tok.eos_token_id == 151645 and len(tok) == 151666
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|im_start|>system\n")
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok("a|<MASK>|b", add_special_tokens=False)["input_ids"][1] == 151665
    assert load_family_info(tiny_fast).mask_token_id == tok.mask_token_id


def test_sdar_moe_tokenizer_is_sdar(tiny_sdar, tiny_sdar_moe):
    assert (tiny_sdar / "tokenizer.json").read_bytes() == (tiny_sdar_moe / "tokenizer.json").read_bytes()


def test_llada2_synthetic_tokenizer(tiny_llada2):
    tok = AutoTokenizer.from_pretrained(tiny_llada2)
    info = load_family_info(tiny_llada2)
    assert len(tok) == info.vocab_size == 157184
    assert tok.mask_token_id == 156895 == info.mask_token_id
    assert tok.eos_token_id == 156892 and info.stop_token_ids == (156892,)
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False)
    assert chat == (
        "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>2+2?<|role_end|><role>ASSISTANT</role>"
    )
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == chat
    # every id decodes (random-weight generations must detokenize)
    assert tok.decode([157183, 150000]) == "<|t157183|><|t150000|>"


def test_missing_qwen_tokenizer_package(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == "qwen_tokenizer" else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ImportError, match="qwen-tokenizer"):
        qt.qwen_tiktoken_path()
    with pytest.raises(ImportError, match="qwen-tokenizer"):
        qt.write_qwen_tokenizer("/nonexistent/never/written", "sdar")


def test_tokenizer_cache(tmp_path, monkeypatch, tiny_sdar):
    cached = qt.cached_qwen_tokenizer_json("sdar")
    assert cached.is_file() and cached.parent == qt.cache_dir()
    assert "0.3.0" in cached.name or "unknown" in cached.name
    out = qt.write_qwen_tokenizer(tmp_path / "t", "sdar")
    assert (out / "tokenizer.json").read_bytes() == cached.read_bytes()
    # an unwritable cache root falls back to a temp dir
    monkeypatch.setenv("VLLM_S2D2_CACHE", "/proc/definitely/not/writable")
    assert qt.cache_dir().is_dir()
