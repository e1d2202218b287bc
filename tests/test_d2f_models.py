"""The D2F model classes: LLaDA's OLMo tensor names map onto vLLM's Llama names (no GPU needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm_s2d2.configs import llada_to_llama_name  # noqa: E402
from vllm_s2d2.model_executor.models import d2f  # noqa: E402


@pytest.mark.parametrize("name,expected", [
    ("model.transformer.wte.weight", "model.embed_tokens.weight"),
    ("model.transformer.ln_f.weight", "model.norm.weight"),
    ("model.transformer.ff_out.weight", "lm_head.weight"),
    ("model.transformer.blocks.0.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("model.transformer.blocks.3.k_proj.weight", "model.layers.3.self_attn.k_proj.weight"),
    ("model.transformer.blocks.3.v_proj.weight", "model.layers.3.self_attn.v_proj.weight"),
    ("model.transformer.blocks.11.attn_out.weight", "model.layers.11.self_attn.o_proj.weight"),
    ("model.transformer.blocks.2.ff_proj.weight", "model.layers.2.mlp.gate_proj.weight"),
    ("model.transformer.blocks.2.up_proj.weight", "model.layers.2.mlp.up_proj.weight"),
    ("model.transformer.blocks.2.ff_out.weight", "model.layers.2.mlp.down_proj.weight"),
    ("model.transformer.blocks.5.attn_norm.weight", "model.layers.5.input_layernorm.weight"),
    ("model.transformer.blocks.5.ff_norm.weight", "model.layers.5.post_attention_layernorm.weight"),
])
def test_llada_names_map_to_llama(name, expected):
    assert llada_to_llama_name(name) == expected


def test_unknown_llada_tensor_is_an_error():
    with pytest.raises(ValueError, match="no Llama counterpart"):
        llada_to_llama_name("model.transformer.blocks.0.att_proj.weight")


def test_model_classes_build_on_vllm_bases():
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    assert issubclass(d2f.D2FDreamForCausalLM, Qwen2ForCausalLM)
    assert issubclass(d2f.D2FLLaDAForCausalLM, LlamaForCausalLM)
    assert d2f.D2FLLaDAForCausalLM.load_weights is not LlamaForCausalLM.load_weights


@pytest.mark.parametrize("family", ["d2f_dream", "d2f_llada"])
def test_engine_refuses_d2f_with_a_clear_message(tmp_path, family):
    """Until the engine decodes a window of blocks, a D2F checkpoint must not be served as a one-block family."""
    import torch
    from transformers import AutoConfig

    from vllm_s2d2.configs import register_hf_configs
    from vllm_s2d2.engine.settings import resolve_engine_settings
    from vllm_s2d2.testing.checkpoints import build_tiny_checkpoint

    register_hf_configs()
    path = build_tiny_checkpoint(family, tmp_path / family, small_vocab=True, dtype=torch.float32)
    with pytest.raises(ValueError, match="does not serve yet.*reference decoder"):
        resolve_engine_settings(AutoConfig.from_pretrained(path), {"method": "s2d2"})
