"""register(): entry point, idempotence, light package import, behaviour without vLLM."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import vllm_s2d2


def test_entry_point():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "s2d2" and ep.value == "vllm_s2d2:register" for ep in eps)


def test_package_import_is_light():
    code = "import sys, vllm_s2d2; print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_register_without_vllm_only_registers_configs(monkeypatch):
    from transformers import AutoConfig

    monkeypatch.setattr(vllm_s2d2, "_registered", False)
    monkeypatch.setattr(vllm_s2d2, "_vllm_available", lambda: False)
    vllm_s2d2.register()
    vllm_s2d2.register()  # idempotent
    assert vllm_s2d2._registered
    cfg = AutoConfig.for_model("sdar")
    assert type(cfg).__name__ == "SDARConfig"


def test_model_classes_are_lazy_strings():
    for arch, target in vllm_s2d2.MODEL_CLASSES.items():
        module, cls = target.split(":")
        assert cls in (arch, {"DreamModel": "D2FDreamForCausalLM", "LLaDAModelLM": "D2FLLaDAForCausalLM"}.get(arch))
        assert module.startswith("vllm_s2d2.model_executor.models.")
    assert set(vllm_s2d2.MODEL_CLASSES) == {"SDARForCausalLM", "SDARMoeForCausalLM", "Fast_dLLM_QwenForCausalLM",
                                            "LLaDA2MoeModelLM", "DreamModel", "LLaDAModelLM"}
