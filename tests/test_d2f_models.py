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


@pytest.mark.parametrize("family,canvas", [("d2f_dream", 4 * 32), ("d2f_llada", 2 * 4 * 32)])
def test_engine_settings_of_d2f(tmp_path, family, canvas):
    """A D2F engine's canvas holds its window of max_active_blocks blocks (Dream: causal verify) or twice that
    (LLaDA: the 2L verify); the block size comes from the merge tool's marker."""
    import torch
    from transformers import AutoConfig

    from vllm_s2d2.configs import register_hf_configs
    from vllm_s2d2.engine.settings import resolve_engine_settings
    from vllm_s2d2.testing.checkpoints import build_tiny_checkpoint

    register_hf_configs()
    path = build_tiny_checkpoint(family, tmp_path / family, small_vocab=True, dtype=torch.float32)
    settings = resolve_engine_settings(AutoConfig.from_pretrained(path), {"method": "s2d2"})
    assert settings.info.pipelined and settings.block_size == 32 and settings.config.max_active_blocks == 4
    assert settings.canvas_length == canvas
