"""The serving benchmark's client side (TTFT / TPOT / throughput bookkeeping) against a fake streaming client."""

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import serve_bench  # noqa: E402


class _FakeCompletions:
    def create(self, *, max_tokens, stream, stream_options, **kw):
        assert stream and stream_options == {"include_usage": True}
        for i in range(max_tokens):
            time.sleep(0.001)
            yield SimpleNamespace(choices=[SimpleNamespace(text=f"t{i}")], usage=None)
        yield SimpleNamespace(choices=[], usage=SimpleNamespace(completion_tokens=max_tokens))


def test_run_load_counts_tokens_and_latencies():
    client = SimpleNamespace(completions=_FakeCompletions())
    r = serve_bench.run_load(client, ["a", "b", "c", "d", "e"], concurrency=2, max_tokens=6)
    assert r["requests"] == 5 and r["output_tokens"] == 30
    assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
    assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p90"] and r["tpot_s"]["mean"] > 0
    assert set(serve_bench.MODES) == {"ar", "threshold", "s2d2"} and serve_bench.MODES["s2d2"] == "s2d2"


def test_counter_delta_gives_the_runs_rates():
    before = {"draft_steps": 10, "verify_steps": 2, "proposed_tokens": 4, "accepted_tokens": 3, "committed_blocks": 1}
    after = {"draft_steps": 30, "verify_steps": 12, "proposed_tokens": 24, "accepted_tokens": 15,
             "committed_blocks": 6}
    d = serve_bench.counter_delta(before, after)
    assert (d["draft_steps"], d["verify_steps"], d["committed_blocks"]) == (20, 10, 5)
    assert d["verify_rate"] == 0.5 and d["acceptance_rate"] == 0.6
    assert serve_bench.counter_delta(before, {}) == {}  # a server without the counters


# ---- the vLLM AR baseline (vllm-ar) --------------------------------------------------------------------------


def test_vllm_ar_mode_serves_the_same_weights_as_a_plain_ar_model(tmp_path):
    from vllm_s2d2.testing.checkpoints import build_tiny_checkpoint

    src = build_tiny_checkpoint("sdar", tmp_path / "sdar", small_vocab=True, tokenizer=False)
    assert serve_bench.BASELINE == "vllm-ar" and serve_bench.BASELINE not in serve_bench.MODES
    for mode, spec in serve_bench.MODES.items():  # the plugin's modes: the checkpoint itself, a spec config
        assert serve_bench.serve_target(mode, str(src), tmp_path) == (str(src), spec, [])
    model, spec, extra = serve_bench.serve_target("vllm-ar", str(src), tmp_path / "work")
    assert spec is None and extra == ["--generation-config", "vllm"]
    out = Path(model)
    cfg = json.loads((out / "config.json").read_text())
    orig = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert "mask_token_id" not in cfg and "block_size" not in cfg
    assert cfg["hidden_size"] == orig["hidden_size"] and cfg["vocab_size"] == orig["vocab_size"]
    files = sorted(p.name for p in src.iterdir() if p.name != "config.json")
    assert files and sorted(p.name for p in out.iterdir() if p.name != "config.json") == files
    for name in files:  # the same weights (and tokenizer / generation config): links, nothing copied
        assert (out / name).is_symlink() and (out / name).resolve() == (src / name).resolve()
    assert serve_bench.serve_target("vllm-ar", str(src), tmp_path / "work")[0] == model  # again: same view


def test_vllm_ar_mode_refuses_a_family_without_an_ar_twin(tmp_path):
    from vllm_s2d2.testing.checkpoints import build_tiny_checkpoint

    src = build_tiny_checkpoint("llada2", tmp_path / "llada2", small_vocab=True, tokenizer=False)
    with pytest.raises(ValueError, match="no plain AR twin"):
        serve_bench.serve_target("vllm-ar", str(src), tmp_path)


def test_server_command_with_and_without_a_speculative_config(tmp_path, monkeypatch):
    started = []

    class Proc:
        pid = 0

        def poll(self):
            return None

    monkeypatch.setattr(serve_bench.subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or Proc())
    monkeypatch.setattr(serve_bench.urllib.request, "urlopen", lambda *a, **k: None)
    serve_bench.start_server("/m", "s2d2", 8000, tmp_path / "a.log", ["--max-num-seqs", "4"])
    serve_bench.start_server("/m-ar", None, 8000, tmp_path / "b.log", ["--generation-config", "vllm"])
    assert started[0][3:] == ["serve", "/m", "--speculative-config", "s2d2", "--port", "8000",
                              "--served-model-name", "bench", "--max-num-seqs", "4"]
    assert started[1][3:] == ["serve", "/m-ar", "--port", "8000", "--served-model-name", "bench",
                              "--generation-config", "vllm"]


def test_every_mode_against_the_baseline_at_the_same_concurrency():
    def run(c, tps, call="c1"):
        return {"concurrency": c, "output_tokens_per_s": tps, "call_id": call}

    results = {"s2d2": [run(1, 300.0), run(16, 1600.0)], "ar": [run(1, 90.0), run(16, 1200.0)],
               "vllm-ar": [run(1, 150.0), run(16, 2000.0)]}
    r = serve_bench.vs_baseline(results)
    assert set(r) == {"s2d2", "ar"}
    assert r["s2d2"]["1"]["output_tokens_per_s_ratio"] == pytest.approx(2.0)
    assert r["s2d2"]["16"]["output_tokens_per_s_ratio"] == pytest.approx(0.8)
    assert r["ar"]["1"]["output_tokens_per_s_ratio"] == pytest.approx(0.6)
    assert serve_bench.vs_baseline({"s2d2": [run(1, 300.0)]}) == {}  # no baseline run (e.g. its server failed)
    import bench_records

    with pytest.raises(bench_records.MixedCallsError):
        serve_bench.vs_baseline({"s2d2": [run(1, 1.0, "c2")], "vllm-ar": [run(1, 1.0)]})
