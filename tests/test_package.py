"""Installation surface: the entry point, a cheap import, an idempotent register()."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "s2d2"]
    assert len(ours) == 1 and ours[0].value == "vllm_s2d2:register"


def test_import_is_cheap_and_register_idempotent():
    code = (
        "import sys, vllm_s2d2\n"
        "heavy = [m for m in ('torch', 'transformers', 'vllm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "vllm_s2d2.register(); vllm_s2d2.register()\n"
        "from transformers import AutoConfig\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "assert {'sdar', 'sdar_moe', 'Fast_dLLM_Qwen', 'llada2_moe'} <= set(CONFIG_MAPPING.keys())\n"
        "print('ok')\n"
    )
    _run_prints_ok(code)


def test_request_stats_is_loaded_lazily():
    """``from vllm_s2d2 import request_stats`` works, and the package import alone loads no engine module."""
    code = (
        "import sys, vllm_s2d2\n"
        "eng = [m for m in sys.modules if m.startswith('vllm_s2d2.engine')]\n"
        "assert not eng, eng\n"
        "from vllm_s2d2 import request_stats\n"
        "from vllm_s2d2.engine.stats import request_stats as real\n"
        "assert request_stats is real and vllm_s2d2.request_stats is real\n"
        "assert 'request_stats' in vllm_s2d2.__all__\n"
        "try:\n"
        "    vllm_s2d2.no_such_name\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    _run_prints_ok(code)


def _run_prints_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter; it must exit 0 and print ``ok`` last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
