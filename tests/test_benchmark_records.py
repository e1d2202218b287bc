"""The GPU-free parts of the benchmarks and of the GPU-test records: run metadata, ratios only within one call,
argument handling, profiler summaries, the PNG writers (when matplotlib is installed).  No timings asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import bench_records as rec  # noqa: E402
import gpu_env  # noqa: E402
import gpu_records  # noqa: E402
import offline_throughput as ot  # noqa: E402
import profile_step as ps  # noqa: E402
import serve_bench  # noqa: E402

CALL = "20260101T000000Z-abc123"


def _row(mode, batch, step_ms, tps, call=CALL, **kw):
    return {"mode": mode, "batch": batch, "call_id": call, "step_ms_median": step_ms, "output_tokens_per_s": tps,
            **kw}


# -- metadata ------------------------------------------------------------------------------------------------
def test_run_metadata_names_call_commit_device_and_versions(monkeypatch):
    monkeypatch.setenv("COMMIT", "abc1234")
    m = rec.run_metadata()
    assert set(rec.META_KEYS) <= set(m)
    assert m["commit"] == "abc1234" and m["call_id"] and m["device"]
    assert m["torch"] and m["transformers"]  # installed in the test environment
    assert m["vllm"] is None or isinstance(m["vllm"], str)
    assert rec.run_metadata(call_id=CALL, device="dev")["call_id"] == CALL
    assert rec.run_metadata(device="dev")["device"] == "dev"
    assert rec.new_call_id() != rec.new_call_id()


def test_commit_without_env_comes_from_git_or_is_unknown(monkeypatch, tmp_path):
    monkeypatch.delenv("COMMIT", raising=False)
    c = rec.git_commit()
    assert c == "unknown" or c.split("-")[0].isalnum()
    assert rec.git_commit(tmp_path) == "unknown"  # not a repository (the GPU host's copy of the tree)


def test_gpu_test_records_carry_the_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMIT", "def5678")
    monkeypatch.delenv(gpu_records.LOG_DIR_ENV, raising=False)
    assert gpu_records.write_record("x", "t", {"a": 1}) is None  # nowhere to write
    path = gpu_records.write_record("x", "test_x.py::t", {"a": 1}, directory=str(tmp_path))
    r = json.loads(path.read_text())
    assert r["test"] == "test_x.py::t" and r["a"] == 1
    assert set(rec.META_KEYS) <= set(r["meta"]) and r["meta"]["commit"] == "def5678"
    monkeypatch.setenv(gpu_records.LOG_DIR_ENV, str(tmp_path))
    r2 = json.loads(gpu_records.write_record("y", "t", {}).read_text())
    assert r2["meta"]["call_id"] == r["meta"]["call_id"]  # one id per pytest process
    with pytest.raises(ValueError):
        gpu_records.make_record("t", {"meta": 1})


def test_gpu_workers_sharing_one_gpu_get_own_ports_and_a_fixed_kv_cache(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("S2D2_GPU_WORKER_OFFSET", raising=False)
    assert gpu_env.worker_port(8011) == 8011
    assert gpu_env.llm_memory_kwargs(0.3) == {"gpu_memory_utilization": 0.3}
    assert gpu_env.serve_memory_args(0.3) == ["--gpu-memory-utilization=0.3"]
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    assert gpu_env.worker_port(8011) == 8211
    monkeypatch.setenv("S2D2_GPU_WORKER_OFFSET", "4")  # a second pytest run beside the first
    assert gpu_env.worker_port(8011) == 8611
    monkeypatch.delenv("S2D2_GPU_WORKER_OFFSET")
    kw = gpu_env.llm_memory_kwargs(0.3)
    assert kw["kv_cache_memory_bytes"] == gpu_env.KV_CACHE_BYTES and kw["gpu_memory_utilization"] < 0.3
    assert f"--kv-cache-memory-bytes={gpu_env.KV_CACHE_BYTES}" in gpu_env.serve_memory_args(0.3)


def test_gpu_session_payload_counts_outcomes():
    spec = importlib.util.spec_from_file_location("gpu_conftest", ROOT / "tests" / "gpu" / "conftest.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    reports = [{"test": "a", "when": "call", "outcome": "passed", "seconds": 1.0},
               {"test": "b", "when": "call", "outcome": "failed", "seconds": 1.0},
               {"test": "c", "when": "setup", "outcome": "failed", "seconds": 0.1},
               {"test": "d", "when": "setup", "outcome": "skipped", "seconds": 0.0}]
    p = conf.session_payload(reports, 1, ["-m", "gpu", "tests"], 3.0)
    assert (p["passed"], p["failed"], p["errors"], p["skipped"]) == (1, 1, 1, 1)
    assert p["command"] == "pytest -m gpu tests" and p["exit_code"] == 1 and p["tests"] == reports


# -- ratios only within one call ------------------------------------------------------------------------------
def test_ratios_against_the_baseline_of_the_same_call():
    rows = [_row("a", 1, 2.0, 400.0), _row("a", 16, 2.5, 6000.0), _row("c", 1, 14.0, 60.0),
            _row("c", 16, 20.0, 800.0), _row("d", 64, 20.0, 3000.0)]
    r = rec.ratios_vs_baseline(rows)
    assert r["c"]["1"] == {"step_time_ratio": 7.0, "output_tokens_per_s_ratio": 0.15}
    assert r["c"]["16"]["step_time_ratio"] == 8.0
    assert "d" not in r  # no baseline at batch 64: no ratio
    assert "a" not in r


@pytest.mark.parametrize("rows", [
    [_row("a", 1, 2.0, 400.0), _row("c", 1, 14.0, 60.0, call="20260101T010000Z-ffffff")],
    [_row("a", 1, 2.0, 400.0), _row("a", 1, 2.1, 390.0, call="other"), _row("c", 1, 14.0, 60.0)],
    [_row("a", 1, 2.0, 400.0), {"mode": "c", "batch": 1, "step_ms_median": 14.0}],
], ids=["mode-from-another-call", "two-baselines", "no-call-id"])
def test_ratios_refuse_rows_of_different_calls(rows):
    with pytest.raises(rec.MixedCallsError):
        rec.ratios_vs_baseline(rows)


def test_offline_record_per_batch_summary_and_refusal(monkeypatch):
    monkeypatch.setenv("COMMIT", "abc1234")
    args = ot.build_parser().parse_args(["--batches", "1,16", "--modes", "cd"])
    groups = ot.groups_of(args.modes, args.family)
    record = ot.new_record(args, groups, rec.run_metadata(call_id=CALL, device="test device"))
    for r in (_row("a", 1, 2.0, 400.0, tokens_per_forward=1.0), _row("c", 1, 14.0, 60.0, tokens_per_forward=1.0),
              _row("d", 1, 15.0, 58.0, tokens_per_forward=0.99, verify_rate=0.0)):
        record["results"][f"{r['mode']}/{r['batch']}"] = r
    ot.finish(record)
    assert record["call"]["call_id"] == CALL and record["call"]["device"] == "test device"
    assert record["per_batch"]["1"]["c"]["step_time_ratio"] == 7.0
    assert record["per_batch"]["1"]["d"]["tokens_per_forward"] == 0.99
    assert list(record["per_batch"]["1"]) == ["a", "c", "d"]
    assert record["modes"]["a"]["spec"] is None and record["modes"]["c"]["spec"]["block_size"] == 4
    json.dumps(record)  # serialisable
    record["results"]["c/1"]["call_id"] = "another call"
    with pytest.raises(rec.MixedCallsError):
        ot.finish(record)


def test_profile_record_summary():
    record = {"baseline": "a", "runs": {
        "a/1": _row("a", 1, 2.0, None, gpu_busy_fraction=0.9, launch_calls_per_step=3.0),
        "c/1": _row("c", 1, 12.0, None, gpu_busy_fraction=0.3, launch_calls_per_step=120.0)}}
    ps.finish(record)
    assert record["ratios_vs_baseline"] == {"c": {"1": {"step_time_ratio": 6.0}}}
    assert record["per_batch"]["1"]["c"] == {"step_ms_median": 12.0, "gpu_busy_fraction": 0.3,
                                             "launch_calls_per_step": 120.0, "step_time_ratio": 6.0}


# -- arguments -----------------------------------------------------------------------------------------------
def test_offline_groups_always_include_the_baseline():
    assert ot.groups_of(None, "sdar-1.7b") == ["a", "b", "cd"]
    assert ot.groups_of("cd", "sdar-1.7b") == ["a", "cd"]
    assert ot.groups_of("acd,shumv", "sdar-1.7b") == ["a", "cd", "shumv"]
    assert ot.groups_of(None, "llada2-mini") == ["a", "tsv"]
    for bad in ("bc", "cx", "t"):  # two engine configs in one group; unknown modes
        with pytest.raises(ValueError):
            ot.groups_of(bad, "sdar-1.7b")


def test_offline_merge_is_refused_and_args_parse(capsys):
    with pytest.raises(SystemExit):
        ot.main(["--merge", "--modes", "b"])
    assert "removed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ot.main(["--modes", "a,bz"])
    a = ot.build_parser().parse_args(["--family", "fast-1.5b", "--batches", "1,16,64"])
    assert rec.parse_int_list(a.batches) == [1, 16, 64] and a.family == "fast-1.5b" and a.modes is None


def test_profile_modes_and_args():
    assert ps.modes_list("c,s", "sdar-1.7b") == ["a", "c", "s"]
    assert ps.modes_list("a,cs,c", "sdar-1.7b") == ["a", "c", "s"]
    assert ps.modes_list("t,s", "fast-1.5b") == ["a", "t", "s"]
    with pytest.raises(ValueError):
        ps.modes_list("c,t", "sdar-1.7b")
    a = ps.build_parser().parse_args(["--modes", "a,c", "--batches", "1,64", "--no-attribution"])
    assert a.attribution is False and rec.parse_int_list(a.batches) == [1, 64]


def test_parse_int_list():
    assert rec.parse_int_list("1, 16,64,16") == [1, 16, 64]
    for bad in ("", "0", "1,-2", "x"):
        with pytest.raises(ValueError):
            rec.parse_int_list(bad)


def test_forward_stats_from_per_request_counters():
    from vllm_s2d2.engine.stats import STAT_NAMES

    assert ot.COUNTER_NAMES == STAT_NAMES
    one = {"draft_steps": 150, "verify_steps": 50, "proposed_tokens": 100, "accepted_tokens": 75,
           "committed_blocks": 32, "verify_rate": 1 / 3, "acceptance_rate": 0.75}
    tokens = {"r0": 128, "r1": 128, "r2": 128}
    f = ot.forward_stats(tokens, {"r0": one, "r1": one, "other": one}, plugin=True)
    assert f["requests_with_counters"] == 2  # r2 returned no counters; "other" is not of this run
    assert f["tokens_per_forward"] == 256 / 400 and f["s2d2_counters"]["draft_steps"] == 300
    assert f["verify_rate"] == 100 / 300 and f["acceptance_rate"] == 0.75
    assert ot.forward_stats(tokens, {}, plugin=True)["tokens_per_forward"] is None
    assert ot.forward_stats(tokens, None, plugin=False)["tokens_per_forward"] == 1.0
    err = ot.forward_stats(tokens, "RuntimeError: no extension", plugin=True)
    assert err["tokens_per_forward"] is None and "RuntimeError" in err["s2d2_error"]


# -- profiler summary ----------------------------------------------------------------------------------------
def test_union_and_profile_summary():
    assert rec.union_us([]) == 0.0
    assert rec.union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25.0
    events = [("gemm", 0.0, 400.0), ("attn", 300.0, 500.0), ("Memcpy HtoD (Pinned -> Device)", 900.0, 1000.0)]
    s = rec.profile_summary(events, {"cudaLaunchKernel": 6, "cudaGraphLaunch": 2, "aten::mm": 9}, steps=2,
                            wall_s=0.002)
    assert s["gpu_busy_ms_per_step"] == pytest.approx(0.3) and s["gpu_busy_fraction"] == pytest.approx(0.3)
    assert (s["launch_calls_per_step"], s["graph_launches_per_step"], s["device_kernels_per_step"]) == (4, 1, 1)
    assert s["profiled_step_ms"] == pytest.approx(1.0)


def test_run_worker_process(tmp_path):
    ok = [sys.executable, "-c", "print('noise'); print('BENCH_JSON=' + '{\"x\": 1}')"]
    assert rec.run_worker_process(ok, timeout=60) == ({"x": 1}, None)
    res, err = rec.run_worker_process([sys.executable, "-c", "import sys; sys.exit('boom')"], timeout=60)
    assert res is None and "boom" in err


# -- PNG writers (only with matplotlib) ------------------------------------------------------------------------
def _png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_writers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("COMMIT", "abc1234")
    args = ot.build_parser().parse_args(["--batches", "1,16", "--modes", "c"])
    record = ot.new_record(args, ot.groups_of("c", "sdar-1.7b"), rec.run_metadata(call_id=CALL, device="dev"))
    for r in (_row("a", 1, 2.0, 400.0, tokens_per_forward=1.0), _row("a", 16, 2.5, 6000.0, tokens_per_forward=1.0),
              _row("c", 1, 14.0, 60.0, tokens_per_forward=1.0), _row("c", 16, 20.0, 800.0, tokens_per_forward=None)):
        record["results"][f"{r['mode']}/{r['batch']}"] = r
    ot.finish(record)
    assert ot.plot(record, tmp_path / "offline.png") and _png(tmp_path / "offline.png")
    out = tmp_path / "rec.json"
    out.write_text(json.dumps(record))
    ot.main(["--replot", str(out)])
    assert _png(tmp_path / "rec.png")

    prof = {"benchmark": "profile_step", "call": record["call"], "model": "m", "baseline": "a",
            "modes": {"a": {"label": "vLLM AR"}, "c": {"label": "static"}},
            "runs": {"a/1": _row("a", 1, 2.0, None, gpu_busy_fraction=0.9, launch_calls_per_step=3.0),
                     "c/1": _row("c", 1, 12.0, None, gpu_busy_fraction=0.3, launch_calls_per_step=120.0)}}
    ps.finish(prof)
    assert ps.plot(prof, tmp_path / "profile.png") and _png(tmp_path / "profile.png")

    serve = {"benchmark": "serve_bench", "call": record["call"], "model": "demo",
             "results": {"s2d2": [{"concurrency": 1, "output_tokens_per_s": 100.0, "tpot_s": {"mean": 0.01}},
                                  {"concurrency": 16, "output_tokens_per_s": 900.0, "tpot_s": None}]}}
    serve_bench.plot(serve, tmp_path / "serve.png")
    assert _png(tmp_path / "serve.png")


def test_plot_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert rec.plot_modes(tmp_path / "x.png", "t", [("y", {"m": {1: 1.0}})]) is False
    assert not os.path.exists(tmp_path / "x.png")
