"""CPU tests of the vLLM wiring: register(), model registration, config hook, the s2d2 alias and the
sampling-parameter shim, against the real vLLM 0.26 (config level; no model runs on CPU).

Every scenario runs in one subprocess (``tests/engine_cpu_probe.py``) that makes vLLM's CPU-only setup work
(see that file), so the platform override never leaks into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from engine_helpers import build_tiny_checkpoint  # noqa: E402

from vllm_s2d2.testing import build_tiny_checkpoint as build_family_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    sdar = build_tiny_checkpoint(str(root / "sdar"), "sdar")
    qwen3 = build_tiny_checkpoint(str(root / "qwen3"), "qwen3")
    fast = str(build_family_checkpoint("fast_dllm_v2", root / "fast", small_vocab=True, block_size=8,
                                       tokenizer=False))
    llada2 = str(build_family_checkpoint("llada2", root / "llada2", small_vocab=True, block_size=4,
                                         tokenizer=False))
    d2f = str(build_family_checkpoint("d2f_llada", root / "d2f", small_vocab=True, block_size=4, tokenizer=False))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", VLLM_CACHE_ROOT=str(root / "vllm_cache"))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "engine_cpu_probe.py"), sdar, qwen3, fast, llada2,
                           d2f],
                          capture_output=True, text=True, timeout=300, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("S2D2_PROBE_JSON=")]
    assert line, f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(line[-1][len("S2D2_PROBE_JSON="):])
    assert "fatal" not in result, result.get("fatal")
    return result


def test_registration(probe):
    assert probe["vllm"] == "0.26.0"
    assert probe["alias_wrapped"] and probe["validation_wrapped"]
    archs = ["SDARForCausalLM", "SDARMoeForCausalLM", "Fast_dLLM_QwenForCausalLM", "LLaDA2MoeModelLM"]
    assert probe["hooks"] == {a: "S2D2ConfigHook" for a in archs}
    assert probe["supported_archs"] == archs


def test_other_families_build_diffusion_configs(probe):
    """Fast-dLLM v2 and LLaDA2 checkpoints (no trust_remote_code) become S2D2 diffusion engines; without
    cache_ver (their default) prompts are prefilled whole: no chunked prefill, no prefix caching."""
    f = probe["fast"]
    assert f["is_diffusion"] and f["v2"] and f["backend"] == "CUSTOM" and f["arch"] == ["Fast_dLLM_QwenForCausalLM"]
    assert f["canvas"] == 16 and f["s2d2"]["block_size"] == 8 and f["s2d2"]["sub_block_size"] == 4
    assert f["s2d2"]["verify_policy"] == "score_hysteresis" and f["s2d2"]["cache_ver"] is False
    assert f["chunked_prefill"] is False and f["prefix_caching"] is False and f["batched_tokens"] >= 256
    assert probe["fast_cache_ver"]["chunked_prefill"] is True  # token-causal prompts may be chunked
    assert "bd_size=8" in probe["errors_fast"]["block_size"] and "draft_ver" in probe["errors_fast"]["draft_ver"]
    ll = probe["llada2"]
    assert ll["is_diffusion"] and ll["arch"] == ["LLaDA2MoeModelLM"] and ll["canvas"] == 8
    assert ll["s2d2"]["editing_threshold"] == 0.5 and ll["s2d2"]["confidence_threshold"] == 0.7
    assert ll["chunked_prefill"] is False
    assert ll["sliding_window"] is None  # LLaDA2's config default 4096 is unused (use_sliding_window false)
    assert probe["llada2_plain"]["s2d2"]["verify"] is False and probe["llada2_plain"]["canvas"] == 8
    assert "contextual_bandit_ucb" in probe["errors_llada2"]["ucb"]


def test_d2f_builds_a_window_engine(probe):
    """A merged D2F LLaDA checkpoint: canvas 2 x max_active_blocks x B (the 2L verify over the window); its prompt
    is one bidirectional segment, so no chunked prefill and no prefix caching even with cache_ver."""
    d = probe["d2f"]
    assert d["is_diffusion"] and d["v2"] and d["arch"] == ["LLaDAModelLM"] and d["backend"] == "CUSTOM"
    assert d["canvas"] == 2 * 3 * 4 and d["s2d2"]["block_size"] == 4 and d["s2d2"]["max_active_blocks"] == 3
    assert d["s2d2"]["cache_ver"] is True
    assert d["chunked_prefill"] is False and d["prefix_caching"] is False


def test_alias_dict_builds_a_diffusion_v2_config(probe):
    d = probe["dict"]
    assert d["is_diffusion"] and d["v2"] and not d["spec"] and not d["async"]
    assert d["canvas"] == d["num_spec"] == 16  # 2 x block_size 8
    assert d["backend"] == "CUSTOM"  # the plugin's backend: stock Triton + the canvas kernel
    assert d["s2d2"]["block_size"] == 8 and d["s2d2"]["denoising_steps"] == 4 and d["s2d2"]["verify"] is False
    assert d["arch"] == ["SDARForCausalLM"]
    assert d["worker_ext"] == "vllm_s2d2.engine.worker_ext.S2D2WorkerExtension"  # request_stats' RPC


def test_alias_variants(probe):
    assert probe["ar"]["canvas"] == 2 and probe["ar"]["s2d2"]["block_size"] == 1
    assert probe["string_json"]["canvas"] == 8
    # No s2d2 settings at all: an SDAR checkpoint runs plain block diffusion (verify off), checkpoint block 4.
    na = probe["no_alias"]
    assert na["is_diffusion"] and na["canvas"] == 8 and na["s2d2"]["verify"] is False


def test_hook_policies(probe):
    assert probe["blockcausal"]["prefix_caching"] is False  # cache_ver=false -> no prefix caching
    assert probe["dict"]["prefix_caching"] is True
    assert probe["budget"]["batched_tokens"] >= 512 * 8  # max_num_seqs x canvas
    assert probe["dict"]["gen_defaults"] == {}


@pytest.mark.parametrize("case,needle", [
    ("unknown_key", "blok_size"),
    ("bad_value", "remasking='nope'"),
    ("non_diffusion", "Qwen3ForCausalLM"),
    ("flashinfer", "FLASHINFER"),
    ("full_graphs", "cudagraph_mode=FULL is not supported"),
    ("breakable", "VLLM_USE_BREAKABLE_CUDAGRAPH=1 is not supported"),
    ("sliding", "use_sliding_window=true"),
    ("async", "async scheduling"),
])
def test_startup_errors(probe, case, needle):
    err = probe["errors"][case]
    assert err is not None and needle in err, err


def test_cuda_graph_settings(probe):
    """FULL_AND_PIECEWISE by default, capture sizes W x r up to max_num_seqs (W = 8 here), and Model Runner V2
    keeps the mode with the backend's UNIFORM_BATCH support and decode query length W."""
    g = probe["graphs"]
    W = 8
    small = [W * r for r in (1, 2, 4, 8, 16, 24, 32, 40)]
    d = g["default"]  # max_num_seqs 40
    assert (d["mode"], d["sizes"], d["max"]) == ("FULL_AND_PIECEWISE", small, 40 * W)
    assert d["support"] == "UNIFORM_BATCH" and d["runner_mode"] == "FULL_AND_PIECEWISE"
    b = g["big"]  # max_num_seqs 300: steps of 8 below 256, of 16 from 256, and 300
    want = [W * r for r in [1, 2, 4] + list(range(8, 256, 8)) + [256, 272, 288, 300]]
    assert (b["mode"], b["sizes"], b["max"]) == ("FULL_AND_PIECEWISE", want, 300 * W)
    assert b["batched_tokens"] >= 300 * W and b["runner_mode"] == "FULL_AND_PIECEWISE"
    assert (g["piecewise"]["mode"], g["piecewise"]["sizes"], g["piecewise"]["runner_mode"]) == (
        "PIECEWISE", small, "PIECEWISE")
    assert (g["decode_only"]["mode"], g["decode_only"]["sizes"], g["decode_only"]["runner_mode"]) == (
        "FULL_DECODE_ONLY", small, "FULL_DECODE_ONLY")
    assert (g["user_sizes"]["sizes"], g["user_sizes"]["max"]) == ([8, 24], 24)  # the user's sizes are kept
    for case in ("eager", "none"):
        assert (g[case]["mode"], g[case]["sizes"]) == ("NONE", []), case
    assert all(v["sliding_window"] is None for v in g.values())


def test_verify_true(probe):
    err = probe["errors"]["bare_string_verify"]  # speculative_config="s2d2" = S2D2 with verification
    assert err is None, err


def test_sampling_validation(probe):
    s = probe["sampling"]
    for ok in ("greedy_seed_topk", "temperature", "extra_ok", "extra_verify"):
        assert s[ok] is None, s[ok]
    cases = [("n2", "n=2"), ("logprobs", "logprobs"), ("beam_search", "beam search"), ("min_p", "min_p"),
             ("penalty", "penalties"), ("extra_block", "block_size"), ("extra_unknown", "nope")]
    for case, needle in cases:
        assert s[case] is not None and needle in s[case], (case, s[case])
    # other diffusion models keep vLLM's own rejection of greedy sampling
    assert s["other_model"] is not None and "not yet supported with diffusion" in s["other_model"]
